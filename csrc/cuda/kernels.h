// Launchers of the MoE CUDA kernels: plain C++ over raw device pointers, no torch types.
//
// Legend: T tokens, k choices per token, E experts, N rows (permuted assignments), D width.
// The .cu files that define these include only CUDA headers, so they compile-check with
// nvcc alone; csrc/cuda/bindings.cpp turns torch tensors into these calls.
// Every launcher enqueues on `stream` and returns cudaGetLastError().
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace moe {
namespace cuda {

// Element type of the row tensors. 16-bit types accumulate in fp32, fp64 in fp64.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// logits[T,E] f32, bias[E] f32 or null -> weights[T,k] f32, experts[T,k] i64, scores[T,E] f32;
// counts[E] i64 must be zeroed by the caller (atomically incremented here).
cudaError_t router_topk(const float* logits, const float* bias, float* weights, int64_t* experts, float* scores,
                        int64_t* counts, int64_t T, int64_t E, int64_t k, bool sigmoid, bool normalize,
                        cudaStream_t stream);

// grad_logits[T,E] f32 from grad_weights[T,k], grad_scores[T,E], grad_score_sums[E] (each may be null).
cudaError_t router_topk_backward(const float* grad_weights, const float* grad_scores, const float* grad_score_sums,
                                 const float* scores, const int64_t* experts, float* grad_logits, int64_t T,
                                 int64_t E, int64_t k, bool sigmoid, bool normalize, cudaStream_t stream);

// positions[N] must be filled with -1 by the caller; capacity < 0 means dropless.
cudaError_t assign_slots(const int64_t* experts, const int64_t* order, const bool* dispatched, int64_t* positions,
                         int64_t* tokens_per_expert, int64_t N, int64_t num_experts, int64_t capacity,
                         cudaStream_t stream);

// rows[dest[a]] = x[a / k] for each of the T*k assignments with dest in [0, N); a byte copy of
// row_bytes per row. rows must be zeroed by the caller.
cudaError_t permute_rows(const void* x, const int64_t* dest, void* rows, int64_t T, int64_t k, int64_t N,
                         int64_t row_bytes, cudaStream_t stream);

// out[t] = sum_j (w[t,j] *) src[dest[t,j]]; w (acc type: f32, or f64 for fp64 rows) may be null.
cudaError_t gather_sum(DType dtype, const void* src, const int64_t* dest, const void* w, void* out, int64_t T,
                       int64_t k, int64_t N, int64_t D, cudaStream_t stream);

// grad_rows[dest[a]] = w[a] * grad_y[a / k] (grad_rows zeroed by the caller, may be null);
// grad_w[a] = <grad_y[a / k], rows[dest[a]]> in the acc type (may be null).
cudaError_t unpermute_rows_backward(DType dtype, const void* grad_y, const void* rows, const int64_t* dest,
                                    const void* w, void* grad_rows, void* grad_w, int64_t T, int64_t k, int64_t N,
                                    int64_t D, cudaStream_t stream);

}  // namespace cuda
}  // namespace moe
