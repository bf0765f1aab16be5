// Router top-k on CPU: scores (softmax | sigmoid), top-k with ties to the lower expert
// index, optional renormalisation, per-expert counts and score sums; and its backward.
// Legend: T tokens, E experts, k choices per token. Everything is computed in fp32.
#include "common.h"
#include "ops.h"

#include <cmath>
#include <limits>
#include <numeric>

namespace moe {
namespace {

// Scores of one row of logits, written to out[E].
inline void row_scores(const float* logit, float* out, int64_t E, bool sigmoid) {
  if (sigmoid) {
    for (int64_t e = 0; e < E; ++e) out[e] = 1.0f / (1.0f + std::exp(-logit[e]));
    return;
  }
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t e = 0; e < E; ++e) m = std::max(m, logit[e]);
  float sum = 0.0f;
  for (int64_t e = 0; e < E; ++e) {
    out[e] = std::exp(logit[e] - m);
    sum += out[e];
  }
  const float inv = 1.0f / sum;
  for (int64_t e = 0; e < E; ++e) out[e] *= inv;
}

}  // namespace

std::vector<at::Tensor> router_topk_cpu(const at::Tensor& logits_in, int64_t k, bool sigmoid,
                                        bool normalize, const std::optional<at::Tensor>& bias_in) {
  check_cpu(logits_in, "logits");
  check_dim(logits_in, 2, "logits", "[T, E]");
  check_float(logits_in, "logits");
  const int64_t T = logits_in.size(0), E = logits_in.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= E, "k=", k, " is not allowed; it must be in [1, ", E, "]");
  const at::Tensor logits = logits_in.to(at::kFloat).contiguous();
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    check_cpu(*bias_in, "bias");
    TORCH_CHECK_VALUE(bias_in->dim() == 1 && bias_in->size(0) == E, "bias must have shape [E] = [", E,
                      "], got ", bias_in->sizes());
    bias = bias_in->to(at::kFloat).contiguous();
  }
  auto f32 = logits.options();
  at::Tensor weights = at::empty({T, k}, f32);
  at::Tensor experts = at::empty({T, k}, f32.dtype(at::kLong));
  at::Tensor scores = at::empty({T, E}, f32);
  const float* lp = logits.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* wp = weights.data_ptr<float>();
  int64_t* xp = experts.data_ptr<int64_t>();
  float* sp = scores.data_ptr<float>();
  const float tiny = std::numeric_limits<float>::min();

  at::parallel_for(0, T, std::max<int64_t>(1, 4096 / E), [&](int64_t begin, int64_t end) {
    std::vector<float> select(E);
    std::vector<int64_t> idx(E);
    // Strict order: higher selection value first, lower expert index among equals.
    auto before = [&](int64_t a, int64_t b) {
      return select[a] > select[b] || (select[a] == select[b] && a < b);
    };
    for (int64_t t = begin; t < end; ++t) {
      float* s = sp + t * E;
      row_scores(lp + t * E, s, E, sigmoid);
      for (int64_t e = 0; e < E; ++e) select[e] = bp ? s[e] + bp[e] : s[e];
      int64_t* chosen = xp + t * k;
      if (k == 1) {
        int64_t best = 0;
        for (int64_t e = 1; e < E; ++e) best = before(e, best) ? e : best;
        chosen[0] = best;
      } else {
        std::iota(idx.begin(), idx.end(), int64_t{0});
        std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), before);
        std::copy(idx.begin(), idx.begin() + k, chosen);
      }
      float* w = wp + t * k;
      float total = 0.0f;
      for (int64_t j = 0; j < k; ++j) {
        w[j] = s[chosen[j]];
        total += w[j];
      }
      if (normalize) {
        const float z = std::max(total, tiny);
        for (int64_t j = 0; j < k; ++j) w[j] /= z;
      }
    }
  });

  at::Tensor counts = at::zeros({E}, f32.dtype(at::kLong));
  int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t a = 0; a < T * k; ++a) ++cp[xp[a]];
  at::Tensor score_sums = scores.sum(0);
  return {weights, experts, scores, counts, score_sums};
}

at::Tensor router_topk_backward_cpu(const std::optional<at::Tensor>& grad_weights_in,
                                    const std::optional<at::Tensor>& grad_scores_in,
                                    const std::optional<at::Tensor>& grad_score_sums_in,
                                    const at::Tensor& scores_in, const at::Tensor& experts_in,
                                    bool sigmoid, bool normalize) {
  check_cpu(scores_in, "scores");
  check_dim(scores_in, 2, "scores", "[T, E]");
  check_dim(experts_in, 2, "experts", "[T, k]");
  const int64_t T = scores_in.size(0), E = scores_in.size(1), k = experts_in.size(1);
  auto as_f32 = [](const std::optional<at::Tensor>& t) {
    return (t.has_value() && t->defined()) ? t->to(at::kFloat).contiguous() : at::Tensor();
  };
  const at::Tensor gw = as_f32(grad_weights_in), gs = as_f32(grad_scores_in), gsum = as_f32(grad_score_sums_in);
  const at::Tensor scores = scores_in.to(at::kFloat).contiguous();
  const at::Tensor experts = experts_in.to(at::kLong).contiguous();
  at::Tensor grad = at::empty({T, E}, scores.options());
  const float* sp = scores.data_ptr<float>();
  const int64_t* xp = experts.data_ptr<int64_t>();
  const float* gwp = gw.defined() ? gw.data_ptr<float>() : nullptr;
  const float* gsp = gs.defined() ? gs.data_ptr<float>() : nullptr;
  const float* gsump = gsum.defined() ? gsum.data_ptr<float>() : nullptr;
  float* out = grad.data_ptr<float>();
  const float tiny = std::numeric_limits<float>::min();

  at::parallel_for(0, T, std::max<int64_t>(1, 4096 / E), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* s = sp + t * E;
      float* g = out + t * E;  // gradient wrt scores first, then wrt logits in place
      for (int64_t e = 0; e < E; ++e) g[e] = (gsp ? gsp[t * E + e] : 0.0f) + (gsump ? gsump[e] : 0.0f);
      if (gwp) {
        const int64_t* chosen = xp + t * k;
        const float* gwt = gwp + t * k;
        if (normalize) {
          float total = 0.0f;
          for (int64_t j = 0; j < k; ++j) total += s[chosen[j]];
          const float z = std::max(total, tiny);
          // w_j = s_j / z  =>  ds_j = (gw_j - sum_i gw_i w_i) / z while z is not clamped.
          float dot = 0.0f;
          if (total >= tiny) {
            for (int64_t j = 0; j < k; ++j) dot += gwt[j] * (s[chosen[j]] / z);
          }
          for (int64_t j = 0; j < k; ++j) g[chosen[j]] += (gwt[j] - dot) / z;
        } else {
          for (int64_t j = 0; j < k; ++j) g[chosen[j]] += gwt[j];
        }
      }
      if (sigmoid) {
        for (int64_t e = 0; e < E; ++e) g[e] = g[e] * s[e] * (1.0f - s[e]);
      } else {
        float dot = 0.0f;
        for (int64_t e = 0; e < E; ++e) dot += g[e] * s[e];
        for (int64_t e = 0; e < E; ++e) g[e] = s[e] * (g[e] - dot);
      }
    }
  });
  return grad;
}

}  // namespace moe
