// Router top-k on the GPU: one warp per token. Legend: T tokens, E experts, k choices.
// Scores are written to global memory and re-read by the same warp (ordered by
// __syncwarp); top-k takes k warp-wide argmax rounds, each round picking the best
// expert that comes strictly after the previous pick in the order (value desc, index asc),
// so no per-token "already chosen" state is needed and ties go to the lower index.
#include <cfloat>
#include <climits>

#include "common.cuh"
#include "kernels.h"

namespace moe {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

// True when (va, ia) ranks before (vb, ib): higher value, then lower index.
__device__ __forceinline__ bool ranks_before(float va, int ia, float vb, int ib) {
  return va > vb || (va == vb && ia < ib);
}

__global__ void router_topk_kernel(const float* __restrict__ logits, const float* __restrict__ bias,
                                   float* __restrict__ weights, int64_t* __restrict__ experts,
                                   float* __restrict__ scores, int64_t* __restrict__ counts, int64_t T, int E, int k,
                                   bool sigmoid, bool normalize) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t t = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5); t < T; t += warps) {
    const float* l = logits + t * E;
    float* s = scores + t * E;
    if (sigmoid) {
      for (int e = lane; e < E; e += 32) s[e] = 1.0f / (1.0f + expf(-l[e]));
    } else {
      float m = -INFINITY;
      for (int e = lane; e < E; e += 32) m = fmaxf(m, l[e]);
      m = warp_max(m);
      float sum = 0.0f;
      for (int e = lane; e < E; e += 32) {
        const float v = expf(l[e] - m);
        s[e] = v;
        sum += v;
      }
      const float inv = 1.0f / warp_sum(sum);
      for (int e = lane; e < E; e += 32) s[e] *= inv;
    }
    __syncwarp();
    float prev_v = INFINITY, total = 0.0f;
    int prev_i = -1;
    for (int j = 0; j < k; ++j) {
      float best_v = -INFINITY;
      int best_i = INT_MAX;  // none yet
      for (int e = lane; e < E; e += 32) {
        const float v = bias ? s[e] + bias[e] : s[e];
        if (ranks_before(prev_v, prev_i, v, e) && (best_i == INT_MAX || ranks_before(v, e, best_v, best_i))) {
          best_v = v;
          best_i = e;
        }
      }
      for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(kFullMask, best_v, off);
        const int oi = __shfl_xor_sync(kFullMask, best_i, off);
        if (oi != INT_MAX && (best_i == INT_MAX || ranks_before(ov, oi, best_v, best_i))) {
          best_v = ov;
          best_i = oi;
        }
      }
      if (best_i == INT_MAX) best_i = j;  // only with NaN scores: stay in bounds
      prev_v = best_v;
      prev_i = best_i;
      const float w = s[best_i];
      total += w;
      if (lane == 0) {
        experts[t * k + j] = best_i;
        weights[t * k + j] = w;
        atomicAdd(reinterpret_cast<unsigned long long*>(counts + best_i), 1ull);
      }
    }
    if (normalize) {
      const float z = fmaxf(total, FLT_MIN);
      __syncwarp();
      for (int j = lane; j < k; j += 32) weights[t * k + j] /= z;
    }
  }
}

__global__ void router_topk_backward_kernel(const float* __restrict__ gw, const float* __restrict__ gs,
                                            const float* __restrict__ gsum, const float* __restrict__ scores,
                                            const int64_t* __restrict__ experts, float* __restrict__ out, int64_t T,
                                            int E, int k, bool sigmoid, bool normalize) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t t = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5); t < T; t += warps) {
    const float* s = scores + t * E;
    float* g = out + t * E;  // gradient wrt scores first, then wrt logits in place
    for (int e = lane; e < E; e += 32) g[e] = (gs ? gs[t * E + e] : 0.0f) + (gsum ? gsum[e] : 0.0f);
    __syncwarp();
    if (gw) {
      const int64_t* chosen = experts + t * k;
      const float* gwt = gw + t * k;
      float total = 0.0f;
      for (int j = lane; j < k; j += 32) total += s[chosen[j]];
      total = warp_sum(total);
      const float z = normalize ? fmaxf(total, FLT_MIN) : 1.0f;
      float dot = 0.0f;
      if (normalize && total >= FLT_MIN) {
        for (int j = lane; j < k; j += 32) dot += gwt[j] * (s[chosen[j]] / z);
        dot = warp_sum(dot);
      }
      // The k chosen experts of a token are distinct, so these updates never collide.
      for (int j = lane; j < k; j += 32) g[chosen[j]] += (gwt[j] - dot) / z;
      __syncwarp();
    }
    if (sigmoid) {
      for (int e = lane; e < E; e += 32) g[e] = g[e] * s[e] * (1.0f - s[e]);
    } else {
      float dot = 0.0f;
      for (int e = lane; e < E; e += 32) dot += g[e] * s[e];
      dot = warp_sum(dot);
      for (int e = lane; e < E; e += 32) g[e] = s[e] * (g[e] - dot);
    }
  }
}

}  // namespace

cudaError_t router_topk(const float* logits, const float* bias, float* weights, int64_t* experts, float* scores,
                        int64_t* counts, int64_t T, int64_t E, int64_t k, bool sigmoid, bool normalize,
                        cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  router_topk_kernel<<<grid_for(T, kWarpsPerBlock), kWarpsPerBlock * 32, 0, stream>>>(
      logits, bias, weights, experts, scores, counts, T, static_cast<int>(E), static_cast<int>(k), sigmoid,
      normalize);
  return cudaGetLastError();
}

cudaError_t router_topk_backward(const float* grad_weights, const float* grad_scores, const float* grad_score_sums,
                                 const float* scores, const int64_t* experts, float* grad_logits, int64_t T,
                                 int64_t E, int64_t k, bool sigmoid, bool normalize, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  router_topk_backward_kernel<<<grid_for(T, kWarpsPerBlock), kWarpsPerBlock * 32, 0, stream>>>(
      grad_weights, grad_scores, grad_score_sums, scores, experts, grad_logits, T, static_cast<int>(E),
      static_cast<int>(k), sigmoid, normalize);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace moe
