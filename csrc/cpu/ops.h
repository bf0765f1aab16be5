// CPU kernels of the MoE ops (router top-k, slot assignment, permute, unpermute).
//
// Legend: T tokens, k choices per token, E experts, N rows (permuted assignments),
// D row width. A destination (dest) of -1 marks an assignment that is in no row.
// Semantics match moe/ops/reference.py exactly; these are the fast twins.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace moe {

// logits[T,E] (any float dtype) -> {weights[T,k] f32, experts[T,k] i64, scores[T,E] f32,
// counts[E] i64, score_sums[E] f32}. Ties go to the lower expert index.
std::vector<at::Tensor> router_topk_cpu(const at::Tensor& logits, int64_t k, bool sigmoid,
                                        bool normalize, const std::optional<at::Tensor>& bias);

// Gradient of router_topk wrt the fp32 logits, from the gradients of weights[T,k],
// scores[T,E] and score_sums[E] (each may be absent). Returns grad_logits[T,E] f32.
at::Tensor router_topk_backward_cpu(const std::optional<at::Tensor>& grad_weights,
                                    const std::optional<at::Tensor>& grad_scores,
                                    const std::optional<at::Tensor>& grad_score_sums,
                                    const at::Tensor& scores, const at::Tensor& experts,
                                    bool sigmoid, bool normalize);

// experts[T,k], order[N] (flat assignment indices in service order), dispatched[T,k]
// -> {positions[T,k] (-1 where not kept), kept[T,k] bool, tokens_per_expert[E]}.
// capacity < 0 means no capacity (dropless).
std::vector<at::Tensor> assign_slots_cpu(const at::Tensor& experts, const at::Tensor& order,
                                         const at::Tensor& dispatched, int64_t num_experts,
                                         int64_t capacity);

// rows[dest[t,j]] = x[t]; rows no assignment lands in are zero. Returns rows[num_rows,D].
at::Tensor permute_rows_cpu(const at::Tensor& x, const at::Tensor& dest, int64_t num_rows);

// grad_x[t] = sum_j grad_rows[dest[t,j]] (dest >= 0). Returns grad_x[T,D].
at::Tensor permute_rows_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& dest);

// y[t] = sum_j w[t,j] * rows[dest[t,j]], weights cast to the rows dtype first.
at::Tensor unpermute_rows_cpu(const at::Tensor& rows, const at::Tensor& dest,
                              const at::Tensor& weights);

// {grad_rows[N,D] (rows dtype), grad_weights[T,k] (weights dtype)}; either may be
// skipped (returned undefined) through the need_* flags.
std::vector<at::Tensor> unpermute_rows_backward_cpu(const at::Tensor& grad_y, const at::Tensor& rows,
                                                    const at::Tensor& dest, const at::Tensor& weights,
                                                    bool need_rows, bool need_weights);

// Grouped expert MLP (csrc/cpu/expert_mlp.cpp). x[N,D] expert-major by counts[E];
// w1[E,D,H], b1[E,H]?, w2[E,F,D], b2[E,D]?; activation 0 gelu, 1 relu, 2 silu, 3 swiglu
// (H = 2F, unit-major). Returns {out[N,D], h[N,H]} (h: the pre-activation, kept for the
// backward). row_tile: rows per GEMM task.
std::vector<at::Tensor> expert_mlp_forward_cpu(const at::Tensor& x, const at::Tensor& counts,
                                               const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                                               const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                                               int64_t activation, int64_t row_tile);

// {grad_x, grad_w1, grad_b1, grad_w2, grad_b2}; each undefined unless its need_* flag is set.
// h (the forward's second output) is overwritten with the gradient wrt h.
std::vector<at::Tensor> expert_mlp_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                const at::Tensor& h, const at::Tensor& counts,
                                                const at::Tensor& w1, const at::Tensor& w2,
                                                int64_t activation, bool need_x, bool need_w1, bool need_b1,
                                                bool need_w2, bool need_b2, int64_t row_tile);

// The token-level grouped expert MLP: the rows of every expert gathered from x[T, D] in place
// (row dest[t, j] is token t; dest fills the N = sum(counts) rows, -1: dropped), and the
// outputs combined back: y[t] = sum_j weights[t, j] * mlp_{e}(x[t]) over kept j, in the
// promoted dtype of x and weights. Neither the permuted input nor the expert outputs are
// kept for the backward. Returns {y[T, D], h[N, H]}.
std::vector<at::Tensor> expert_mlp_tokens_forward_cpu(const at::Tensor& x, const at::Tensor& dest,
                                                      const at::Tensor& weights, const at::Tensor& counts,
                                                      const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                                                      const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                                                      int64_t activation, int64_t row_tile);

// {grad_x[T, D], grad_weights[T, k], grad_w1, grad_b1, grad_w2, grad_b2}; each undefined unless
// its need_* flag is set. The routing-weight gradient <mlp_e(x[t]), grad_y[t]> is computed from
// h and grad_y @ w2^T (no stored expert output). h is overwritten with the gradient wrt h.
std::vector<at::Tensor> expert_mlp_tokens_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& h, const at::Tensor& dest,
    const at::Tensor& weights, const at::Tensor& counts, const at::Tensor& w1, const at::Tensor& w2,
    const std::optional<at::Tensor>& b2, int64_t activation, bool need_x, bool need_weights, bool need_w1,
    bool need_b1, bool need_w2, bool need_b2, int64_t row_tile);

}  // namespace moe
