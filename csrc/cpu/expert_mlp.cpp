// Grouped expert MLP on CPU: out = act(x @ w1[e] + b1[e]) @ w2[e] + b2[e] for the rows of
// every expert e, forward and backward, as many single-threaded GEMM tasks run in parallel.
//
// Legend: E experts, N rows (expert-major: expert e owns counts[e] consecutive rows),
// D model width, F hidden units, H = U*F columns of w1 (U = 2 for SwiGLU, unit-major:
// columns 2f and 2f+1 are the gate and the up projection of unit f, else U = 1).
//
// Why: torch's CPU grouped GEMM runs one multi-threaded GEMM per expert, which on a few
// cores spends much of its time splitting small GEMMs and synchronising, and the
// activation is a separate pass over [N, H]. Here one task = one (expert, row tile) in
// the forward (GEMM, activation on the cache-hot tile, GEMM), and tasks are scheduled
// dynamically over the OpenMP threads; a GEMM called inside the parallel region is
// single-threaded (ATen runs nested parallel work inline, and MKL/OpenBLAS do not nest).
//
// Saved for the backward: the pre-activation h[N, H] only (the ideal autograd graph keeps
// h and act(h)); the activation and its derivative are recomputed from h per tile, and
// the backward overwrites h with dh (the op declares h mutated: a second backward through
// the same graph fails autograd's saved-tensor version check instead of reading dh).
// Backward phase A, one task per (expert, hidden-unit chunk) walking the expert's rows in
// tiles: act(h), dA = g @ w2^T, dw2 += act(h)^T @ g, dh = act'(h, dA), dw1 += x^T @ dh,
// db1 += sum dh (the weight gradients of a chunk belong to that task alone: no reduction
// across tasks). Phase B, one task per (expert, row tile): dx = dh @ w1^T.
// The activations are ATen's own kernels (gelu erf form, relu, silu, SwiGLU =
// silu(gate) * up), so results match moe/experts.py to fp32 rounding of the GEMMs.
#include "common.h"
#include "ops.h"

#include <ATen/ThreadLocalState.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/addmv.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/silu_backward.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/threshold_backward.h>

#include <cstring>
#include <exception>
#include <mutex>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace moe {
namespace {

enum Activation : int64_t { kGelu = 0, kRelu = 1, kSilu = 2, kSwiglu = 3 };

struct RowTask {
  int64_t e, r0, m;  // expert, first row, rows
};

struct UnitTask {
  int64_t e, f0, fc;  // expert, first hidden unit, units
};

// Runs body(task index) for every task over the intra-op threads, dynamically scheduled,
// with the caller's thread-local state (grad mode, dispatch keys) in every worker. The
// first exception thrown by a task is rethrown here, after the region.
template <typename Body>
void run_tasks(int64_t num_tasks, const Body& body) {
  if (num_tasks == 0) return;
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), num_tasks));
#ifdef _OPENMP
  if (threads > 1 && !omp_in_parallel()) {
    at::ThreadLocalState state;
    std::exception_ptr error;
    std::mutex error_mutex;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t i = 0; i < num_tasks; ++i) {
      at::ThreadLocalStateGuard guard(state);
      try {
        body(i, omp_get_thread_num());
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#endif
  for (int64_t i = 0; i < num_tasks; ++i) body(i, 0);
}

int64_t workers() {
#ifdef _OPENMP
  if (omp_in_parallel()) return 1;
#endif
  return std::max<int64_t>(1, at::get_num_threads());
}

std::vector<int64_t> check_counts(const at::Tensor& counts, int64_t E, int64_t N) {
  check_cpu(counts, "counts");
  check_dim(counts, 1, "counts", "[E]");
  TORCH_CHECK_VALUE(counts.size(0) == E, "counts has ", counts.size(0), " experts but the weights have ", E);
  auto c = counts.to(at::kLong).contiguous();
  std::vector<int64_t> out(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + E);
  int64_t total = 0;
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK_VALUE(out[e] >= 0, "counts[", e, "] = ", out[e], " is negative; counts must be >= 0");
    total += out[e];
  }
  TORCH_CHECK_VALUE(total == N, "counts sum to ", total, " but x has ", N, " rows; they must be equal");
  return out;
}

// Row tiles of every expert, the largest first (better dynamic balance), each at most
// `tile` rows; an expert's rows are cut into equal tiles.
std::vector<RowTask> row_tasks(const std::vector<int64_t>& counts, int64_t tile) {
  std::vector<RowTask> tasks;
  int64_t start = 0;
  for (int64_t e = 0; e < static_cast<int64_t>(counts.size()); ++e) {
    const int64_t n = counts[e];
    if (n > 0) {
      const int64_t pieces = (n + tile - 1) / tile;
      const int64_t step = (n + pieces - 1) / pieces;
      for (int64_t r = 0; r < n; r += step) tasks.push_back({e, start + r, std::min(step, n - r)});
    }
    start += n;
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const RowTask& a, const RowTask& b) { return a.m > b.m; });
  return tasks;
}

void check_inputs(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                  const at::Tensor& w2, const std::optional<at::Tensor>& b2, int64_t activation) {
  TORCH_CHECK_VALUE(activation >= kGelu && activation <= kSwiglu, "activation code ", activation,
                    " is not allowed; use 0 (gelu), 1 (relu), 2 (silu) or 3 (swiglu)");
  check_cpu(x, "x");
  check_dim(x, 2, "x", "[N, D]");
  check_dim(w1, 3, "w1", "[E, D, H]");
  check_dim(w2, 3, "w2", "[E, F, D]");
  const auto dtype = x.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16, "x dtype ", dtype,
                    " is not allowed; use float32, float64 or bfloat16");
  const int64_t E = w1.size(0), D = x.size(1), H = w1.size(2), F = w2.size(1);
  const int64_t U = activation == kSwiglu ? 2 : 1;
  TORCH_CHECK_VALUE(w1.size(1) == D && w2.size(0) == E && w2.size(2) == D && H == U * F, "w1 ", w1.sizes(),
                    " and w2 ", w2.sizes(), " do not fit x ", x.sizes(), "; need w1 [E, D, ", U,
                    "*F] and w2 [E, F, D] with D=", D);
  for (const auto* t : {&w1, &w2}) {
    check_cpu(*t, "weight");
    TORCH_CHECK_VALUE(t->scalar_type() == dtype, "weight dtype ", t->scalar_type(), " must match x dtype ", dtype);
  }
  if (b1) {
    TORCH_CHECK_VALUE(b1->sizes() == at::IntArrayRef({E, H}) && b1->scalar_type() == dtype, "b1 must be [", E, ", ",
                      H, "] of dtype ", dtype, ", got ", b1->sizes(), " ", b1->scalar_type());
  }
  if (b2) {
    TORCH_CHECK_VALUE(b2->sizes() == at::IntArrayRef({E, D}) && b2->scalar_type() == dtype, "b2 must be [", E, ", ",
                      D, "] of dtype ", dtype, ", got ", b2->sizes(), " ", b2->scalar_type());
  }
}

// a = act(h) for one tile; h [m, H], a [m, F].
void activate(const at::Tensor& h, at::Tensor& a, int64_t activation) {
  switch (activation) {
    case kGelu: at::gelu_out(a, h); break;
    case kRelu: a.copy_(h).relu_(); break;
    case kSilu: at::silu_out(a, h); break;
    default: {
      at::silu_out(a, h.slice(1, 0, h.size(1), 2));
      a.mul_(h.slice(1, 1, h.size(1), 2));
    }
  }
}

// h <- d act(h) / dh applied to dA, in place (h, [m, H], is read only where it is
// overwritten, element by element); dA [m, F]; s, tmp [m, F] scratch (SwiGLU).
void activate_backward_inplace(const at::Tensor& dA, at::Tensor& h, at::Tensor& s, at::Tensor& tmp,
                               int64_t activation) {
  switch (activation) {
    case kGelu: at::gelu_backward_out(h, dA, h); break;
    case kRelu: at::threshold_backward_out(h, dA, h, 0); break;
    case kSilu: at::silu_backward_out(h, dA, h); break;
    default: {
      auto gate = h.slice(1, 0, h.size(1), 2), up = h.slice(1, 1, h.size(1), 2);
      at::mul_out(tmp, dA, up);               // d silu(gate) = dA * up
      at::silu_out(s, gate);
      at::mul_out(up, dA, s);                 // d up = dA * silu(gate)
      at::silu_backward_out(gate, tmp, gate); // d gate
    }
  }
}

// Where the rows of a GEMM tile come from: rows [r0, r0 + m) of `src` itself (token empty),
// or the rows token[r0 .. r0 + m) of src, copied into the calling thread's buffer (the gather
// of the token-level op: no permuted [N, D] copy is ever materialised).
struct RowSource {
  at::Tensor src;              // contiguous [R, D]
  std::vector<int64_t> token;  // empty, or [N] row -> row of src

  at::Tensor tile(int64_t r0, int64_t m, const at::Tensor& buf) const {
    if (token.empty()) return src.narrow(0, r0, m);
    auto out = buf.narrow(0, 0, m);
    const int64_t bytes = src.size(1) * src.element_size();
    const char* from = static_cast<const char*>(src.data_ptr());
    char* to = static_cast<char*>(out.data_ptr());
    for (int64_t i = 0; i < m; ++i) std::memcpy(to + i * bytes, from + token[r0 + i] * bytes, bytes);
    return out;
  }
  bool gathers() const { return !token.empty(); }
};

// The forward of the grouped MLP over the rows `x` names (expert-major by cnt): writes
// act(x @ w1 + b1) @ w2 + b2 into out[N, D] and returns the pre-activation h[N, H].
at::Tensor mlp_forward(const RowSource& x, const std::vector<int64_t>& cnt, int64_t N, const at::Tensor& w1,
                       const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                       const std::optional<at::Tensor>& b2, int64_t activation, int64_t row_tile, at::Tensor& out) {
  const int64_t D = x.src.size(1), H = w1.size(2), F = w2.size(1);
  const auto opts = x.src.options();
  auto h = at::empty({N, H}, opts);
  const auto tasks = row_tasks(cnt, row_tile);
  int64_t max_m = 1;
  for (const auto& t : tasks) max_m = std::max(max_m, t.m);
  auto scratch = at::empty({workers(), max_m, F}, opts);
  auto xbuf = x.gathers() ? at::empty({workers(), max_m, D}, opts) : at::Tensor();
  run_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t i, int thread) {
    const auto& t = tasks[i];
    const auto xt = x.tile(t.r0, t.m, x.gathers() ? xbuf[thread] : xbuf);
    auto ht = h.narrow(0, t.r0, t.m);
    auto at_ = scratch[thread].narrow(0, 0, t.m);
    auto ot = out.narrow(0, t.r0, t.m);
    if (b1) at::addmm_out(ht, (*b1)[t.e], xt, w1[t.e]);
    else at::mm_out(ht, xt, w1[t.e]);
    activate(ht, at_, activation);
    if (b2) at::addmm_out(ot, (*b2)[t.e], at_, w2[t.e]);
    else at::mm_out(ot, at_, w2[t.e]);
  });
  return h;
}

struct BackwardNeeds {
  bool rows, w1, b1, w2, b2, row_weights;
};

// Hidden units per phase-A task: enough chunks to keep every thread busy, and at most
// kMaxUnitChunk units so the per-thread scratch stays small (3 x tile x chunk).
constexpr int64_t kMaxUnitChunk = 512;

// The backward of the grouped MLP. g names the gradient rows (of the UNWEIGHTED output when
// row_w is given), x the input rows, row_w[N] (or undefined) each row's combine weight, so
// the loss saw row_w[r] * out[r]. Overwrites h with dh. Returns {grad_rows[N, D] (the
// gradient wrt the rows x names, row order), gw1, gb1, gw2, gb2, grad_row_weights[N] (in
// the op-math dtype)}; each undefined unless needed.
std::vector<at::Tensor> mlp_backward(const RowSource& g, const RowSource& x, at::Tensor h,
                                     const std::vector<int64_t>& cnt, const at::Tensor& w1, const at::Tensor& w2,
                                     const std::optional<at::Tensor>& b2, const at::Tensor& row_w,
                                     int64_t activation, BackwardNeeds need, int64_t row_tile) {
  const int64_t N = h.size(0), D = x.src.size(1), E = w1.size(0), H = w1.size(2), F = w2.size(1);
  const int64_t U = H / std::max<int64_t>(F, 1);
  auto& dh = h;  // h in, dh out: no second [N, H] buffer
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) start[e + 1] = start[e] + cnt[e];
  const bool weighted = row_w.defined();
  const auto opts = x.src.options();
  const auto acc = at::toOpMathType(x.src.scalar_type());
  auto gw1 = need.w1 ? at::empty({E, D, H}, opts) : at::Tensor();
  auto gw2 = need.w2 ? at::empty({E, F, D}, opts) : at::Tensor();
  auto gb1 = need.b1 ? at::empty({E, H}, opts) : at::Tensor();
  auto gb2 = need.b2 ? at::empty({E, D}, opts) : at::Tensor();
  for (int64_t e = 0; e < E; ++e) {
    if (cnt[e] > 0) continue;  // an expert without rows has zero gradients
    for (auto* t : {&gw1, &gw2, &gb1, &gb2}) {
      if (t->defined()) (*t)[e].zero_();
    }
  }

  // Phase A: (expert, unit chunk) tasks, each walking its expert's rows in tiles; the weight
  // gradients of a chunk belong to that task alone (no reduction across tasks).
  const int64_t threads = workers();
  int64_t busy = 0;
  for (int64_t e = 0; e < E; ++e) busy += cnt[e] > 0;
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>(std::max<int64_t>(1, F / 64),
                                                              (4 * threads + busy - 1) / std::max<int64_t>(busy, 1)));
  const int64_t chunks = std::max(want, (F + kMaxUnitChunk - 1) / kMaxUnitChunk);
  const int64_t unit_step = std::max<int64_t>(1, (F + chunks - 1) / chunks);
  std::vector<UnitTask> unit_tasks;
  for (int64_t e = 0; e < E; ++e) {
    if (cnt[e] == 0) continue;
    for (int64_t f0 = 0; f0 < F; f0 += unit_step) unit_tasks.push_back({e, f0, std::min(unit_step, F - f0)});
  }
  std::stable_sort(unit_tasks.begin(), unit_tasks.end(), [&](const UnitTask& a, const UnitTask& b) {
    return cnt[a.e] * a.fc > cnt[b.e] * b.fc;
  });
  // Per-row partial dot products <act(h) chunk, (g @ w2^T) chunk>, one row of partial per
  // chunk, summed in chunk order below (deterministic).
  const int64_t num_chunks = (F + unit_step - 1) / unit_step;
  auto partial = need.row_weights ? at::zeros({std::max<int64_t>(num_chunks, 1), N}, opts.dtype(acc)) : at::Tensor();
  const int64_t tile = std::max<int64_t>(1, std::min<int64_t>(row_tile, N));
  auto scratch = at::empty({threads, 3, tile, unit_step}, opts);
  auto xbuf = x.gathers() && need.w1 ? at::empty({threads, tile, D}, opts) : at::Tensor();
  auto gbuf = g.gathers() ? at::empty({threads, tile, D}, opts) : at::Tensor();
  run_tasks(static_cast<int64_t>(unit_tasks.size()), [&](int64_t i, int thread) {
    const auto& t = unit_tasks[i];
    const int64_t c0 = U * t.f0, cw = U * t.fc;
    const bool first_chunk = t.f0 == 0;
    const auto w2c = w2[t.e].narrow(0, t.f0, t.fc);  // [fc, D]
    auto gw1c = need.w1 ? gw1[t.e].narrow(1, c0, cw) : at::Tensor();
    auto gw2c = need.w2 ? gw2[t.e].narrow(0, t.f0, t.fc) : at::Tensor();
    auto gb1c = need.b1 ? gb1[t.e].narrow(0, c0, cw) : at::Tensor();
    auto gb2e = need.b2 ? gb2[t.e] : at::Tensor();
    const auto buf = scratch[thread];
    for (int64_t r = 0; r < cnt[t.e]; r += tile) {
      const int64_t m = std::min(tile, cnt[t.e] - r), r0 = start[t.e] + r;
      const double beta = r == 0 ? 0.0 : 1.0;
      const auto gt = g.tile(r0, m, g.gathers() ? gbuf[thread] : gbuf);
      const auto wt = weighted ? row_w.narrow(0, r0, m).unsqueeze(1) : at::Tensor();  // [m, 1]
      auto ht = h.narrow(0, r0, m).narrow(1, c0, cw);  // h in, dh out
      auto a = buf[0].narrow(0, 0, m).narrow(1, 0, t.fc);
      auto dA = buf[1].narrow(0, 0, m).narrow(1, 0, t.fc);
      auto tmp = buf[2].narrow(0, 0, m).narrow(1, 0, t.fc);
      if (need.b2 && first_chunk) {  // gb2 = sum over rows of the (weighted) gradient
        if (weighted) at::addmv_out(gb2e, gb2e, gt.t(), wt.squeeze(1), beta, 1.0);
        else if (r == 0) at::sum_out(gb2e, gt, at::IntArrayRef{0});
        else gb2e.add_(gt.sum(0));
      }
      at::mm_out(dA, gt, w2c.t());  // the gradient wrt act(h) of the unweighted output
      if (need.w2 || need.row_weights) activate(ht, a, activation);
      if (need.row_weights) {  // d loss / d row weight = <out row, g row> = <a, dA> (+ <b2, g>)
        auto dst = partial[t.f0 / unit_step].narrow(0, r0, m);
        if (a.scalar_type() == acc) {
          at::mul_out(tmp, a, dA);
          at::sum_out(dst, tmp, at::IntArrayRef{1});
        } else {
          at::sum_out(dst, at::mul(a.to(acc), dA.to(acc)), at::IntArrayRef{1});
        }
        if (b2 && first_chunk) dst.add_(at::mv(gt, (*b2)[t.e]).to(acc));
      }
      if (need.w2) {
        if (weighted) a.mul_(wt);
        at::addmm_out(gw2c, gw2c, a.t(), gt, beta, 1.0);
      }
      if (weighted) dA.mul_(wt);
      activate_backward_inplace(dA, ht, a, tmp, activation);
      const auto& dht = ht;
      if (need.w1) {
        const auto xt = x.tile(r0, m, x.gathers() ? xbuf[thread] : xbuf);
        at::addmm_out(gw1c, gw1c, xt.t(), dht, beta, 1.0);
      }
      if (need.b1) {
        if (r == 0) at::sum_out(gb1c, dht, at::IntArrayRef{0});
        else gb1c.add_(dht.sum(0));
      }
    }
  });

  // Phase B: (expert, row tile) tasks: grad rows = dh @ w1^T.
  auto grows = need.rows ? at::empty({N, D}, opts) : at::Tensor();
  if (need.rows) {
    const auto tasks = row_tasks(cnt, row_tile);
    run_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t i, int) {
      const auto& t = tasks[i];
      auto gxt = grows.narrow(0, t.r0, t.m);
      at::mm_out(gxt, dh.narrow(0, t.r0, t.m), w1[t.e].t());
    });
  }
  auto grw = need.row_weights ? partial.sum(0) : at::Tensor();
  return {grows, gw1, gb1, gw2, gb2, grw};
}

void check_h(const at::Tensor& h, int64_t N, int64_t H, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(h.sizes() == at::IntArrayRef({N, H}), "h must be [", N, ", ", H, "], got ", h.sizes());
  TORCH_CHECK_VALUE(h.is_contiguous() && h.scalar_type() == dtype,
                    "h must be the contiguous pre-activation of the forward, of dtype ", dtype);
}

// The token-level op's routing: every row's token (dest inverted) and row count N.
struct TokenRows {
  std::vector<int64_t> token, assignment;  // [N] token and flat assignment t*k+j of each row
};

TokenRows token_rows(const at::Tensor& dest_in, const at::Tensor& weights, int64_t T, int64_t N) {
  check_dest(dest_in, T);
  check_cpu(weights, "weights");
  TORCH_CHECK_VALUE(weights.sizes() == dest_in.sizes(), "weights must have the shape of dest ", dest_in.sizes(),
                    ", got ", weights.sizes());
  TORCH_CHECK_VALUE(weights.is_floating_point(), "weights dtype ", weights.scalar_type(),
                    " is not allowed; use a floating-point dtype");
  const auto dest = dest_in.contiguous();
  const int64_t k = dest.size(1);
  TokenRows out;
  out.assignment = row_sources(dest.data_ptr<int64_t>(), T * k, N, /*unique=*/true);
  out.token.resize(N);
  for (int64_t r = 0; r < N; ++r) {
    TORCH_CHECK_VALUE(out.assignment[r] >= 0, "row ", r, " receives no assignment; dest must fill the ", N,
                      " rows the counts give (the unpadded layout)");
    out.token[r] = out.assignment[r] / k;
  }
  return out;
}

// The checked, detached, contiguous inputs every entry point starts from.
struct Inputs {
  at::Tensor x, w1, w2;
  std::optional<at::Tensor> b1, b2;
};

Inputs prepare(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
               const at::Tensor& w2, const std::optional<at::Tensor>& b2, int64_t activation, int64_t row_tile) {
  check_inputs(x, w1, b1, w2, b2, activation);
  TORCH_CHECK_VALUE(row_tile >= 1, "row_tile=", row_tile, " is not allowed; it must be >= 1");
  auto detached = [](const std::optional<at::Tensor>& t) {
    return t ? std::optional<at::Tensor>(t->detach()) : std::nullopt;
  };
  return {x.detach().contiguous(), w1.detach().contiguous(), w2.detach().contiguous(), detached(b1), detached(b2)};
}

}  // namespace

std::vector<at::Tensor> expert_mlp_forward_cpu(const at::Tensor& x_in, const at::Tensor& counts,
                                               const at::Tensor& w1_in, const std::optional<at::Tensor>& b1_in,
                                               const at::Tensor& w2_in, const std::optional<at::Tensor>& b2_in,
                                               int64_t activation, int64_t row_tile) {
  const auto in = prepare(x_in, w1_in, b1_in, w2_in, b2_in, activation, row_tile);
  const auto &x = in.x, &w1 = in.w1, &w2 = in.w2;
  const auto &b1 = in.b1, &b2 = in.b2;
  const int64_t N = x.size(0);
  const auto cnt = check_counts(counts, w1.size(0), N);
  auto out = at::empty({N, x.size(1)}, x.options());
  auto h = mlp_forward(RowSource{x, {}}, cnt, N, w1, b1, w2, b2, activation, row_tile, out);
  return {out, h};
}

std::vector<at::Tensor> expert_mlp_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                                const at::Tensor& h_in, const at::Tensor& counts,
                                                const at::Tensor& w1_in, const at::Tensor& w2_in,
                                                int64_t activation, bool need_x, bool need_w1, bool need_b1,
                                                bool need_w2, bool need_b2, int64_t row_tile) {
  const auto in = prepare(x_in, w1_in, std::nullopt, w2_in, std::nullopt, activation, row_tile);
  const auto &x = in.x, &w1 = in.w1, &w2 = in.w2;
  const auto g = grad_out_in.detach().contiguous();
  const int64_t N = x.size(0);
  TORCH_CHECK_VALUE(g.sizes() == x.sizes(), "grad_out ", g.sizes(), " must be [", N, ", ", x.size(1), "]");
  check_h(h_in, N, w1.size(2), x.scalar_type());
  const auto cnt = check_counts(counts, w1.size(0), N);
  auto grads = mlp_backward(RowSource{g, {}}, RowSource{x, {}}, h_in.detach(), cnt, w1, w2, std::nullopt,
                            at::Tensor(), activation, {need_x, need_w1, need_b1, need_w2, need_b2, false}, row_tile);
  grads.pop_back();  // no row weights here
  return grads;
}

std::vector<at::Tensor> expert_mlp_tokens_forward_cpu(const at::Tensor& x_in, const at::Tensor& dest,
                                                      const at::Tensor& weights, const at::Tensor& counts,
                                                      const at::Tensor& w1_in, const std::optional<at::Tensor>& b1_in,
                                                      const at::Tensor& w2_in, const std::optional<at::Tensor>& b2_in,
                                                      int64_t activation, int64_t row_tile) {
  check_cpu(counts, "counts");
  const int64_t N = counts.to(at::kLong).sum().item<int64_t>();
  const auto in = prepare(x_in, w1_in, b1_in, w2_in, b2_in, activation, row_tile);
  const auto cnt = check_counts(counts, in.w1.size(0), N);
  auto rows = token_rows(dest, weights, in.x.size(0), N);
  // The expert outputs in the compute dtype (a transient [N, D]: not kept for the backward),
  // then y[t] = sum_j weights[t, j] * out[dest[t, j]] in the wider of the two dtypes.
  auto out = at::empty({N, in.x.size(1)}, in.x.options());
  auto h = mlp_forward(RowSource{in.x, std::move(rows.token)}, cnt, N, in.w1, in.b1, in.w2, in.b2, activation,
                       row_tile, out);
  const auto y_type = c10::promoteTypes(in.x.scalar_type(), weights.scalar_type());
  auto y = unpermute_rows_cpu(out.to(y_type), dest.contiguous(), weights.detach());
  return {y, h};
}

std::vector<at::Tensor> expert_mlp_tokens_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& h_in, const at::Tensor& dest,
    const at::Tensor& weights, const at::Tensor& counts, const at::Tensor& w1_in, const at::Tensor& w2_in,
    const std::optional<at::Tensor>& b2_in, int64_t activation, bool need_x, bool need_weights, bool need_w1,
    bool need_b1, bool need_w2, bool need_b2, int64_t row_tile) {
  const auto in = prepare(x_in, w1_in, std::nullopt, w2_in, b2_in, activation, row_tile);
  const auto &x = in.x, &w1 = in.w1, &w2 = in.w2;
  const auto& b2 = in.b2;
  const int64_t T = x.size(0), N = h_in.size(0);
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes(), "grad_y ", grad_y.sizes(), " must be [", T, ", ", x.size(1), "]");
  check_h(h_in, N, w1.size(2), x.scalar_type());
  const auto cnt = check_counts(counts, w1.size(0), N);
  auto rows = token_rows(dest, weights, T, N);
  const auto g = grad_y.detach().to(x.scalar_type()).contiguous();
  // Each row's combine weight, in the compute dtype (the rows were weighted in the forward's combine).
  auto assignment = at::empty({N}, dest.options());
  std::copy(rows.assignment.begin(), rows.assignment.end(), assignment.data_ptr<int64_t>());
  const auto row_w = weights.detach().reshape(-1).index_select(0, assignment).to(x.scalar_type());
  const RowSource g_rows{g, rows.token}, x_rows{x, std::move(rows.token)};
  auto grads = mlp_backward(g_rows, x_rows, h_in.detach(), cnt, w1, w2, b2, row_w, activation,
                            {need_x, need_w1, need_b1, need_w2, need_b2, need_weights}, row_tile);
  // Back to tokens: grad_x[t] = sum_j grad_rows[dest[t, j]] (in j order), and each assignment's
  // weight gradient is its row's (zero where dropped).
  auto gx = need_x ? permute_rows_backward_cpu(grads[0], dest.contiguous()) : at::Tensor();
  at::Tensor gweights;
  if (need_weights) {
    gweights = at::zeros({weights.numel()}, weights.options());
    gweights.index_copy_(0, assignment, grads[5].to(weights.scalar_type()));
    gweights = gweights.view(weights.sizes());
  }
  return {gx, gweights, grads[1], grads[2], grads[3], grads[4]};
}

}  // namespace moe
