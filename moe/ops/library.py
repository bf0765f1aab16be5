"""torch.library custom ops for the fast MoE kernels, with fake impls and autograd.

Legend: T tokens, k choices per token, E experts, N rows (permuted assignments), D width.

Every op takes a trailing ``impl`` string naming the kernel family that runs it:
"cpp" (``moe._C`` CPU kernels), "cuda" (``moe._C`` CUDA kernels) or "triton"
(``moe.kernels``). The ops are opaque to ``torch.compile``: the fake impls give the
output shapes (data-dependent sizes such as ``num_rows`` come in as ints), so
``torch.compile(fullgraph=True)`` traces straight through them.

  moe::router_topk(logits[T,E], k, score, normalize, bias[E]?, impl)
      -> weights[T,k] f32, experts[T,k] i64, scores[T,E] f32, counts[E] i64, score_sums[E] f32
  moe::router_topk_backward(grad_weights?, grad_scores?, grad_score_sums?, scores, experts,
      score, normalize, impl) -> grad_logits[T,E] f32
  moe::assign_slots(experts[T,k], order[N], dispatched[T,k], num_experts, capacity?, impl)
      -> positions[T,k], kept[T,k], tokens_per_expert[E]
  moe::permute_rows(x[T,D], dest[T,k], num_rows, impl) -> rows[num_rows,D]
  moe::permute_rows_backward(grad_rows[N,D], dest[T,k], impl) -> grad_x[T,D]
  moe::unpermute_rows(rows[N,D], dest[T,k], weights[T,k], impl) -> y[T,D]
  moe::unpermute_rows_backward(grad_y, rows, dest, weights, need_rows, need_weights, impl)
      -> grad_rows[N,D] (or [0]), grad_weights[T,k] (or [0])
  moe::expert_mlp(x[N,D], counts[E], w1[E,D,H], b1?, w2[E,F,D], b2?, activation, impl)
      -> out[N,D], h[N,H] (pre-activation, kept for the backward; impl "cpp" only)
  moe::expert_mlp_backward(grad_out, x, h, counts, w1, w2, activation, need_x, need_w1, need_b1,
      need_w2, need_b2, impl) -> grad_x, grad_w1, grad_b1, grad_w2, grad_b2 (each [0] when not
      needed); overwrites h with the gradient wrt h
  moe::expert_mlp_tokens(x[T,D], dest[T,k], weights[T,k], counts[E], w1, b1?, w2, b2?, activation, impl)
      -> y[T,D] (= unpermute_rows(expert_mlp(permute_rows(x))), rows gathered in place), h[N,H]
  moe::expert_mlp_tokens_backward(grad_y, x, h, dest, weights, counts, w1, w2, b2?, activation, need_x,
      need_weights, need_w1, need_b1, need_w2, need_b2, impl) -> grad_x, grad_weights, grad_w1, grad_b1,
      grad_w2, grad_b2; overwrites h

Differentiable: permute_rows wrt x (and its backward wrt grad_rows, so double backward
works), unpermute_rows wrt rows and weights, router_topk wrt logits through weights,
scores and score_sums. ``OpSet(impl)`` wraps the ops with the signatures of
``moe.ops.reference`` and checks user input there.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from parallel.checks import check_choice, check_int, fail

IMPLS = ("cpp", "cuda", "triton")
SCORES = ("softmax", "sigmoid")


def _kernel(impl: str, name: str):
    """The raw kernel ``name`` of the kernel family ``impl``."""
    if impl == "cpp":
        from moe import _C

        return getattr(_C, name + "_cpu")
    if impl == "cuda":
        from moe import _C

        if not getattr(_C, "has_cuda", False):
            raise RuntimeError("moe._C was built without CUDA kernels: rebuild with a CUDA build of torch "
                               "and CUDA_HOME set (`pip install --no-build-isolation -e .`)")
        return getattr(_C, name + "_cuda")
    if impl == "triton":
        from moe import kernels  # deferred: the triton kernels (an optional heavy engine), loaded on first use

        return getattr(kernels, name)
    raise ValueError(f"impl={impl!r} is not allowed; choose one of {IMPLS}")


def _empty_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


# ---------------------------------------------------------------- router_topk
@torch.library.custom_op("moe::router_topk", mutates_args=())
def _router_topk(logits: Tensor, k: int, score: str, normalize: bool, bias: Optional[Tensor],
                 impl: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    out = _kernel(impl, "router_topk")(logits, k, score == "sigmoid", normalize, bias)
    return tuple(out)


@_router_topk.register_fake
def _(logits, k, score, normalize, bias, impl):
    T, E = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    i64 = dict(dtype=torch.long, device=logits.device)
    return (logits.new_empty((T, k), **f32), logits.new_empty((T, k), **i64), logits.new_empty((T, E), **f32),
            logits.new_empty((E,), **i64), logits.new_empty((E,), **f32))


@torch.library.custom_op("moe::router_topk_backward", mutates_args=())
def _router_topk_backward(grad_weights: Optional[Tensor], grad_scores: Optional[Tensor],
                          grad_score_sums: Optional[Tensor], scores: Tensor, experts: Tensor, score: str,
                          normalize: bool, impl: str) -> Tensor:
    return _kernel(impl, "router_topk_backward")(grad_weights, grad_scores, grad_score_sums, scores, experts,
                                                 score == "sigmoid", normalize)


@_router_topk_backward.register_fake
def _(grad_weights, grad_scores, grad_score_sums, scores, experts, score, normalize, impl):
    return scores.new_empty(scores.shape)


def _router_setup(ctx, inputs, output):
    logits, k, score, normalize, bias, impl = inputs
    _, experts, scores, _, _ = output
    ctx.save_for_backward(scores, experts)
    ctx.score, ctx.normalize, ctx.impl, ctx.logits_dtype = score, normalize, impl, logits.dtype


def _router_backward(ctx, grad_weights, grad_experts, grad_scores, grad_counts, grad_score_sums):
    scores, experts = ctx.saved_tensors
    grad = torch.ops.moe.router_topk_backward(grad_weights, grad_scores, grad_score_sums, scores, experts,
                                              ctx.score, ctx.normalize, ctx.impl)
    return grad.to(ctx.logits_dtype), None, None, None, None, None


_router_topk.register_autograd(_router_backward, setup_context=_router_setup)


# ---------------------------------------------------------------- assign_slots
@torch.library.custom_op("moe::assign_slots", mutates_args=())
def _assign_slots(experts: Tensor, order: Tensor, dispatched: Tensor, num_experts: int, capacity: Optional[int],
                  impl: str) -> Tuple[Tensor, Tensor, Tensor]:
    cap = -1 if capacity is None else capacity
    return tuple(_kernel(impl, "assign_slots")(experts, order, dispatched, num_experts, cap))


@_assign_slots.register_fake
def _(experts, order, dispatched, num_experts, capacity, impl):
    return (experts.new_empty(experts.shape, dtype=torch.long), experts.new_empty(experts.shape, dtype=torch.bool),
            experts.new_empty((num_experts,), dtype=torch.long))


# ---------------------------------------------------------------- permute_rows
@torch.library.custom_op("moe::permute_rows", mutates_args=())
def _permute_rows(x: Tensor, dest: Tensor, num_rows: int, impl: str) -> Tensor:
    return _kernel(impl, "permute_rows")(x, dest, num_rows)


@_permute_rows.register_fake
def _(x, dest, num_rows, impl):
    return x.new_empty((num_rows, x.shape[1]))


@torch.library.custom_op("moe::permute_rows_backward", mutates_args=())
def _permute_rows_backward(grad_rows: Tensor, dest: Tensor, impl: str) -> Tensor:
    return _kernel(impl, "permute_rows_backward")(grad_rows, dest)


@_permute_rows_backward.register_fake
def _(grad_rows, dest, impl):
    return grad_rows.new_empty((dest.shape[0], grad_rows.shape[1]))


def _permute_setup(ctx, inputs, output):
    _, dest, _, impl = inputs
    ctx.save_for_backward(dest)
    ctx.impl = impl


def _permute_backward(ctx, grad_rows):
    (dest,) = ctx.saved_tensors
    return torch.ops.moe.permute_rows_backward(grad_rows.contiguous(), dest, ctx.impl), None, None, None


def _permute_bwd_setup(ctx, inputs, output):
    grad_rows, dest, impl = inputs
    ctx.save_for_backward(dest)
    ctx.impl, ctx.num_rows = impl, grad_rows.shape[0]


def _permute_bwd_backward(ctx, grad_grad_x):
    # permute_rows_backward is linear in grad_rows; its adjoint is permute_rows itself.
    (dest,) = ctx.saved_tensors
    return torch.ops.moe.permute_rows(grad_grad_x.contiguous(), dest, ctx.num_rows, ctx.impl), None, None


_permute_rows.register_autograd(_permute_backward, setup_context=_permute_setup)
_permute_rows_backward.register_autograd(_permute_bwd_backward, setup_context=_permute_bwd_setup)


# ---------------------------------------------------------------- unpermute_rows
@torch.library.custom_op("moe::unpermute_rows", mutates_args=())
def _unpermute_rows(rows: Tensor, dest: Tensor, weights: Tensor, impl: str) -> Tensor:
    return _kernel(impl, "unpermute_rows")(rows, dest, weights)


@_unpermute_rows.register_fake
def _(rows, dest, weights, impl):
    return rows.new_empty((dest.shape[0], rows.shape[1]))


@torch.library.custom_op("moe::unpermute_rows_backward", mutates_args=())
def _unpermute_rows_backward(grad_y: Tensor, rows: Tensor, dest: Tensor, weights: Tensor, need_rows: bool,
                             need_weights: bool, impl: str) -> Tuple[Tensor, Tensor]:
    grad_rows, grad_weights = _kernel(impl, "unpermute_rows_backward")(grad_y, rows, dest, weights, need_rows,
                                                                       need_weights)
    return _empty_if_none(grad_rows, rows), _empty_if_none(grad_weights, weights)


@_unpermute_rows_backward.register_fake
def _(grad_y, rows, dest, weights, need_rows, need_weights, impl):
    return (rows.new_empty(rows.shape if need_rows else (0,)),
            weights.new_empty(weights.shape if need_weights else (0,)))


def _unpermute_setup(ctx, inputs, output):
    rows, dest, weights, impl = inputs
    ctx.save_for_backward(rows, dest, weights)
    ctx.impl = impl


def _unpermute_backward(ctx, grad_y):
    rows, dest, weights = ctx.saved_tensors
    need_rows, _, need_weights, _ = ctx.needs_input_grad
    if not (need_rows or need_weights):
        return None, None, None, None
    grad_rows, grad_weights = torch.ops.moe.unpermute_rows_backward(
        grad_y.contiguous(), rows, dest, weights, need_rows, need_weights, ctx.impl)
    return (grad_rows if need_rows else None), None, (grad_weights if need_weights else None), None


_unpermute_rows.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


# ---------------------------------------------------------------- expert_mlp
# The grouped expert MLP (CPU kernels only): out = act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]
# over the rows of each expert; h (the pre-activation) is its second output, kept for
# the backward (which recomputes the activation from it).
ACTIVATION_CODES = {"gelu": 0, "relu": 1, "silu": 2, "swiglu": 3}
EXPERT_MLP_IMPLS = ("cpp",)
EXPERT_MLP_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# Rows per GEMM task: big enough for an efficient single-threaded GEMM, small enough that
# the activation tile stays in cache and the tasks balance over the threads.
EXPERT_MLP_ROW_TILE = 256


@torch.library.custom_op("moe::expert_mlp", mutates_args=())
def _expert_mlp(x: Tensor, counts: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                activation: str, impl: str) -> Tuple[Tensor, Tensor]:
    out, h = _kernel(impl, "expert_mlp_forward")(x, counts, w1, b1, w2, b2, ACTIVATION_CODES[activation],
                                                 EXPERT_MLP_ROW_TILE)
    return out, h


@_expert_mlp.register_fake
def _(x, counts, w1, b1, w2, b2, activation, impl):
    return x.new_empty(x.shape), x.new_empty((x.shape[0], w1.shape[2]))


# It overwrites h with d loss / d h (no second [N, H] buffer); declared mutated, so a second
# backward through the same graph fails autograd's saved-tensor check instead of reading dh.
@torch.library.custom_op("moe::expert_mlp_backward", mutates_args=("h",))
def _expert_mlp_backward(grad_out: Tensor, x: Tensor, h: Tensor, counts: Tensor, w1: Tensor, w2: Tensor,
                         activation: str, need_x: bool, need_w1: bool, need_b1: bool, need_w2: bool,
                         need_b2: bool, impl: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _kernel(impl, "expert_mlp_backward")(grad_out, x, h, counts, w1, w2, ACTIVATION_CODES[activation],
                                                 need_x, need_w1, need_b1, need_w2, need_b2, EXPERT_MLP_ROW_TILE)
    gx, gw1, gb1, gw2, gb2 = (_empty_if_none(g, x) for g in grads)
    return gx, gw1, gb1, gw2, gb2


@_expert_mlp_backward.register_fake
def _(grad_out, x, h, counts, w1, w2, activation, need_x, need_w1, need_b1, need_w2, need_b2, impl):
    E, D, H = w1.shape
    shapes = ((x.shape, need_x), ((E, D, H), need_w1), ((E, H), need_b1), (w2.shape, need_w2), ((E, D), need_b2))
    return tuple(x.new_empty(shape if need else (0,)) for shape, need in shapes)


def _expert_mlp_setup(ctx, inputs, output):
    x, counts, w1, b1, w2, b2, activation, impl = inputs
    ctx.save_for_backward(x, output[1], counts, w1, w2)
    ctx.activation, ctx.impl = activation, impl
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # h has no gradient: no [N, H] of zeros in the backward


def _expert_mlp_backward_fn(ctx, grad_out, grad_h):
    x, h, counts, w1, w2 = ctx.saved_tensors
    need_x, _, need_w1, need_b1, need_w2, need_b2, _, _ = ctx.needs_input_grad
    if grad_out is None:
        grad_out = torch.zeros_like(x)
    grads = torch.ops.moe.expert_mlp_backward(grad_out.contiguous(), x, h, counts, w1, w2, ctx.activation,
                                              need_x, need_w1, need_b1, need_w2, need_b2, ctx.impl)
    gx, gw1, gb1, gw2, gb2 = (g if need else None
                              for g, need in zip(grads, (need_x, need_w1, need_b1, need_w2, need_b2)))
    return gx, None, gw1, gb1, gw2, gb2, None, None


_expert_mlp.register_autograd(_expert_mlp_backward_fn, setup_context=_expert_mlp_setup)


# ---------------------------------------------------------------- expert_mlp_tokens
# The token-level twin: the rows are gathered from x[T, D] in place through dest[T, k] and the
# outputs combined with the routing weights inside the op, so neither the permuted input nor
# the expert outputs exist as [N, D] tensors kept for the backward (ScatterMoE-style).
@torch.library.custom_op("moe::expert_mlp_tokens", mutates_args=())
def _expert_mlp_tokens(x: Tensor, dest: Tensor, weights: Tensor, counts: Tensor, w1: Tensor, b1: Optional[Tensor],
                       w2: Tensor, b2: Optional[Tensor], activation: str, impl: str) -> Tuple[Tensor, Tensor]:
    y, h = _kernel(impl, "expert_mlp_tokens_forward")(x, dest, weights, counts, w1, b1, w2, b2,
                                                      ACTIVATION_CODES[activation], EXPERT_MLP_ROW_TILE)
    return y, h


@_expert_mlp_tokens.register_fake
def _(x, dest, weights, counts, w1, b1, w2, b2, activation, impl):
    num_rows = torch.library.get_ctx().new_dynamic_size()
    y_dtype = torch.promote_types(x.dtype, weights.dtype)
    return x.new_empty(x.shape, dtype=y_dtype), x.new_empty((num_rows, w1.shape[2]))


@torch.library.custom_op("moe::expert_mlp_tokens_backward", mutates_args=("h",))
def _expert_mlp_tokens_backward(grad_y: Tensor, x: Tensor, h: Tensor, dest: Tensor, weights: Tensor, counts: Tensor,
                                w1: Tensor, w2: Tensor, b2: Optional[Tensor], activation: str, need_x: bool,
                                need_weights: bool, need_w1: bool, need_b1: bool, need_w2: bool, need_b2: bool,
                                impl: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _kernel(impl, "expert_mlp_tokens_backward")(
        grad_y, x, h, dest, weights, counts, w1, w2, b2, ACTIVATION_CODES[activation], need_x, need_weights,
        need_w1, need_b1, need_w2, need_b2, EXPERT_MLP_ROW_TILE)
    gx, gweights, gw1, gb1, gw2, gb2 = (_empty_if_none(g, x) for g in grads)
    return gx, gweights, gw1, gb1, gw2, gb2


@_expert_mlp_tokens_backward.register_fake
def _(grad_y, x, h, dest, weights, counts, w1, w2, b2, activation, need_x, need_weights, need_w1, need_b1, need_w2,
      need_b2, impl):
    E, D, H = w1.shape
    shapes = ((x.shape, need_x, x.dtype), (weights.shape, need_weights, weights.dtype), ((E, D, H), need_w1, x.dtype),
              ((E, H), need_b1, x.dtype), (w2.shape, need_w2, x.dtype), ((E, D), need_b2, x.dtype))
    return tuple(x.new_empty(shape if need else (0,), dtype=dtype) for shape, need, dtype in shapes)


def _expert_mlp_tokens_setup(ctx, inputs, output):
    x, dest, weights, counts, w1, b1, w2, b2, activation, impl = inputs
    ctx.save_for_backward(x, output[1], dest, weights, counts, w1, w2, b2)
    ctx.activation, ctx.impl = activation, impl
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _expert_mlp_tokens_backward_fn(ctx, grad_y, grad_h):
    x, h, dest, weights, counts, w1, w2, b2 = ctx.saved_tensors
    need_x, _, need_weights, _, need_w1, need_b1, need_w2, need_b2, _, _ = ctx.needs_input_grad
    if grad_y is None:
        return (None,) * 10
    grads = torch.ops.moe.expert_mlp_tokens_backward(
        grad_y.contiguous(), x, h, dest, weights, counts, w1, w2, b2, ctx.activation, need_x, need_weights,
        need_w1, need_b1, need_w2, need_b2, ctx.impl)
    gx, gweights, gw1, gb1, gw2, gb2 = (g if need else None for g, need in zip(
        grads, (need_x, need_weights, need_w1, need_b1, need_w2, need_b2)))
    return gx, None, gweights, None, gw1, gb1, gw2, gb2, None, None


_expert_mlp_tokens.register_autograd(_expert_mlp_tokens_backward_fn, setup_context=_expert_mlp_tokens_setup)


# ---------------------------------------------------------------- user-facing wrappers
def _check_int(name: str, value, minimum: int) -> None:
    # Under torch.compile with dynamic shapes a size arrives as a torch.SymInt, which check_int
    # (plain ints only) rejects as a wrong type; a SymInt is an int here, so only its range is checked.
    if isinstance(value, torch.SymInt):
        if value < minimum:
            fail(name, value, f"it must be >= {minimum}")
        return
    check_int(name, value, minimum=minimum)


def _check_2d(name: str, t: Tensor, shape: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor of shape {shape}, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


class OpSet:
    """The four MoE ops, with the signatures of ``moe.ops.reference``, run by ``impl``."""

    def __init__(self, impl: str) -> None:
        self.impl = check_choice("impl", impl, IMPLS)

    def router_topk(self, logits_TE: Tensor, k: int, score: str = "softmax", normalize: bool = True,
                    bias_E: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """See ``moe.ops.reference.router_topk``."""
        _check_2d("logits", logits_TE, "[T, E]")
        check_choice("score", score, SCORES)
        _check_int("k", k, 1)
        if k > logits_TE.shape[1]:
            fail("k", k, f"it must be in [1, {logits_TE.shape[1]}] (E={logits_TE.shape[1]} experts)")
        return torch.ops.moe.router_topk(logits_TE, k, score, bool(normalize), bias_E, self.impl)

    def assign_slots(self, experts_TK: Tensor, order_N: Tensor, dispatched_TK: Tensor, num_experts: int,
                     capacity: Optional[int]) -> Tuple[Tensor, Tensor, Tensor]:
        """See ``moe.ops.reference.assign_slots``."""
        _check_2d("experts", experts_TK, "[T, k]")
        _check_int("num_experts", num_experts, 1)
        if capacity is not None:
            _check_int("capacity", capacity, 0)
        return torch.ops.moe.assign_slots(experts_TK.long(), order_N.long(), dispatched_TK.bool(), num_experts,
                                          capacity, self.impl)

    def permute_rows(self, x_TD: Tensor, dest_TK: Tensor, num_rows: int) -> Tensor:
        """See ``moe.ops.reference.permute_rows``."""
        _check_2d("x", x_TD, "[T, D]")
        _check_2d("dest", dest_TK, "[T, k]")
        _check_int("num_rows", num_rows, 0)
        return torch.ops.moe.permute_rows(x_TD, dest_TK.long(), num_rows, self.impl)

    def expert_mlp_supported(self, rows_ND: Tensor, w1: Tensor, w2: Tensor) -> bool:
        """Whether ``expert_mlp`` runs these inputs (else the caller keeps its torch path)."""
        return (self.impl in EXPERT_MLP_IMPLS and rows_ND.device.type == "cpu" and rows_ND.dim() == 2
                and rows_ND.dtype in EXPERT_MLP_DTYPES and w1.dtype == rows_ND.dtype and w2.dtype == rows_ND.dtype)

    def expert_mlp(self, rows_ND: Tensor, counts_El: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                   b2: Optional[Tensor], activation: str) -> Tensor:
        """act(rows @ w1[e] + b1[e]) @ w2[e] + b2[e] over the rows of each expert e (rows
        expert-major by ``counts``); the fused twin of ``moe.experts.Experts.forward_loop``.

        w1[E_l, D, H] (H = F, SwiGLU: 2F unit-major), w2[E_l, F, D], biases optional.
        Differentiable wrt rows, weights and biases.
        """
        if self.impl not in EXPERT_MLP_IMPLS:
            raise NotImplementedError(f"expert_mlp has kernels for impl in {EXPERT_MLP_IMPLS}, not {self.impl!r}")
        check_choice("activation", activation, tuple(ACTIVATION_CODES))
        _check_2d("rows", rows_ND, "[N, D]")
        out, _ = torch.ops.moe.expert_mlp(rows_ND, counts_El.long(), w1, b1, w2, b2, activation, self.impl)
        return out

    def expert_mlp_tokens(self, x_TD: Tensor, dest_TK: Tensor, weights_TK: Tensor, counts_El: Tensor, w1: Tensor,
                          b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], activation: str) -> Tensor:
        """y[t] = sum_j weights[t, j] * mlp_e(x[t]) over the kept choices j (e: the expert owning row
        dest[t, j]); the fused twin of ``permute_rows`` -> ``expert_mlp`` -> ``unpermute_rows``, with
        the rows read from x in place and nothing [N, D] kept for the backward.

        dest[T, k]: the unpadded plan of ``moe.permute.make_plan`` (rows expert-major by ``counts``,
        -1 where dropped). y has the promoted dtype of x and weights. Differentiable wrt x, the
        weights, w1, b1, w2 and b2.
        """
        if self.impl not in EXPERT_MLP_IMPLS:
            raise NotImplementedError(f"expert_mlp_tokens has kernels for impl in {EXPERT_MLP_IMPLS}, "
                                      f"not {self.impl!r}")
        check_choice("activation", activation, tuple(ACTIVATION_CODES))
        _check_2d("x", x_TD, "[T, D]")
        _check_2d("dest", dest_TK, "[T, k]")
        if weights_TK.shape != dest_TK.shape:
            raise ValueError(f"weights must have the shape of dest {tuple(dest_TK.shape)}, "
                             f"got {tuple(weights_TK.shape)}")
        y, _ = torch.ops.moe.expert_mlp_tokens(x_TD, dest_TK.long(), weights_TK, counts_El.long(), w1, b1, w2, b2,
                                               activation, self.impl)
        return y

    def unpermute_rows(self, rows_ND: Tensor, dest_TK: Tensor, weights_TK: Tensor) -> Tensor:
        """See ``moe.ops.reference.unpermute_rows``."""
        _check_2d("rows", rows_ND, "[N, D]")
        _check_2d("dest", dest_TK, "[T, k]")
        if weights_TK.shape != dest_TK.shape:
            raise ValueError(f"weights must have the shape of dest {tuple(dest_TK.shape)}, "
                             f"got {tuple(weights_TK.shape)}")
        return torch.ops.moe.unpermute_rows(rows_ND, dest_TK.long(), weights_TK, self.impl)
