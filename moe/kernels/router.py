"""Triton router top-k: scores, top-k (ties to the lower expert), renormalisation, counts.

Legend: T tokens, E experts, k choices per token (the constexpr ``K``). One program
handles BLOCK_T tokens with all E experts in registers (E padded to a power of two). Everything is fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_TINY = torch.finfo(torch.float32).tiny


@triton.jit
def _router_topk_fwd(logits_ptr, bias_ptr, weights_ptr, experts_ptr, scores_ptr, counts_ptr, sums_ptr, T, E,
                     K: tl.constexpr, BLOCK_K: tl.constexpr, SIGMOID: tl.constexpr, NORMALIZE: tl.constexpr,
                     HAS_BIAS: tl.constexpr, TINY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < T
    cmask = cols < E
    mask = rmask[:, None] & cmask[None, :]
    logits = tl.load(logits_ptr + rows[:, None] * E + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
    logits = tl.where(rmask[:, None], logits, 0.0)  # padded tokens stay finite
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-logits))
    else:
        ex = tl.exp(logits - tl.max(logits, 1)[:, None])
        scores = ex / tl.sum(ex, 1)[:, None]
    scores = tl.where(mask, scores, 0.0)
    tl.store(scores_ptr + rows[:, None] * E + cols[None, :], scores, mask=mask)
    tl.atomic_add(sums_ptr + cols, tl.sum(scores, 0), mask=cmask)

    select = scores
    if HAS_BIAS:
        select = select + tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    select = tl.where(cmask[None, :], select, float("-inf"))
    kcols = tl.arange(0, BLOCK_K)
    w_tile = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    e_tile = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int64)
    total = tl.zeros([BLOCK_T], dtype=tl.float32)
    for j in tl.static_range(K):
        best = tl.argmax(select, 1, tie_break_left=True)
        hit = cols[None, :] == best[:, None]
        w = tl.sum(tl.where(hit, scores, 0.0), 1)
        total += w
        w_tile = tl.where(kcols[None, :] == j, w[:, None], w_tile)
        e_tile = tl.where(kcols[None, :] == j, best.to(tl.int64)[:, None], e_tile)
        select = tl.where(hit, float("-inf"), select)
        tl.atomic_add(counts_ptr + best, tl.full([BLOCK_T], 1, tl.int64), mask=rmask)
    if NORMALIZE:
        w_tile = w_tile / tl.maximum(total, TINY)[:, None]
    kmask = rmask[:, None] & (kcols[None, :] < K)
    tl.store(weights_ptr + rows[:, None] * K + kcols[None, :], w_tile, mask=kmask)
    tl.store(experts_ptr + rows[:, None] * K + kcols[None, :], e_tile, mask=kmask)


@triton.jit
def _router_topk_bwd(gw_ptr, gs_ptr, gsum_ptr, scores_ptr, experts_ptr, out_ptr, T, E, K: tl.constexpr,
                     HAS_GW: tl.constexpr, HAS_GS: tl.constexpr, HAS_GSUM: tl.constexpr, SIGMOID: tl.constexpr,
                     NORMALIZE: tl.constexpr, TINY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < T
    cmask = cols < E
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * E + cols[None, :]
    s = tl.load(scores_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    if HAS_GS:
        g += tl.load(gs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GSUM:
        g += tl.load(gsum_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_GW:
        z = tl.full([BLOCK_T], 1.0, tl.float32)
        dot = tl.zeros([BLOCK_T], dtype=tl.float32)
        if NORMALIZE:
            total = tl.zeros([BLOCK_T], dtype=tl.float32)
            for j in tl.static_range(K):
                e_j = tl.load(experts_ptr + rows * K + j, mask=rmask, other=0)
                total += tl.sum(tl.where(cols[None, :] == e_j[:, None], s, 0.0), 1)
            z = tl.maximum(total, TINY)
            for j in tl.static_range(K):
                e_j = tl.load(experts_ptr + rows * K + j, mask=rmask, other=0)
                gw_j = tl.load(gw_ptr + rows * K + j, mask=rmask, other=0.0).to(tl.float32)
                dot += gw_j * (tl.sum(tl.where(cols[None, :] == e_j[:, None], s, 0.0), 1) / z)
            dot = tl.where(total >= TINY, dot, 0.0)
        for j in tl.static_range(K):
            e_j = tl.load(experts_ptr + rows * K + j, mask=rmask, other=0)
            gw_j = tl.load(gw_ptr + rows * K + j, mask=rmask, other=0.0).to(tl.float32)
            g += tl.where(cols[None, :] == e_j[:, None], ((gw_j - dot) / z)[:, None], 0.0)
    if SIGMOID:
        grad = g * s * (1.0 - s)
    else:
        grad = s * (g - tl.sum(g * s, 1)[:, None])
    tl.store(out_ptr + offs, grad, mask=mask)


def _blocks(E: int):
    block_e = triton.next_power_of_2(max(E, 1))
    block_t = max(1, min(64, 4096 // block_e))
    return block_t, block_e


def router_topk(logits: torch.Tensor, k: int, sigmoid: bool, normalize: bool, bias):
    """(weights[T,k], experts[T,k], scores[T,E], counts[E], score_sums[E]); see moe.ops.reference."""
    T, E = logits.shape
    logits = logits.contiguous()
    dev = logits.device
    weights = torch.empty((T, k), dtype=torch.float32, device=dev)
    experts = torch.empty((T, k), dtype=torch.long, device=dev)
    scores = torch.empty((T, E), dtype=torch.float32, device=dev)
    counts = torch.zeros((E,), dtype=torch.long, device=dev)
    sums = torch.zeros((E,), dtype=torch.float32, device=dev)
    if T == 0:
        return weights, experts, scores, counts, sums
    has_bias = bias is not None
    bias_arg = bias.float().contiguous() if has_bias else scores
    block_t, block_e = _blocks(E)
    _router_topk_fwd[(triton.cdiv(T, block_t),)](
        logits, bias_arg, weights, experts, scores, counts, sums, T, E, K=k, BLOCK_K=triton.next_power_of_2(k),
        SIGMOID=bool(sigmoid), NORMALIZE=bool(normalize), HAS_BIAS=has_bias, TINY=_TINY, BLOCK_T=block_t,
        BLOCK_E=block_e)
    return weights, experts, scores, counts, sums


def router_topk_backward(grad_weights, grad_scores, grad_score_sums, scores: torch.Tensor, experts: torch.Tensor,
                         sigmoid: bool, normalize: bool) -> torch.Tensor:
    """grad_logits[T,E] fp32 from the gradients of weights, scores and score_sums (each may be None)."""
    T, E = scores.shape
    k = experts.shape[1]
    scores = scores.float().contiguous()
    experts = experts.long().contiguous()
    out = torch.empty_like(scores)
    if T == 0:
        return out

    def prep(t):
        return None if t is None else t.float().contiguous()

    gw, gs, gsum = prep(grad_weights), prep(grad_scores), prep(grad_score_sums)
    block_t, block_e = _blocks(E)
    _router_topk_bwd[(triton.cdiv(T, block_t),)](
        scores if gw is None else gw, scores if gs is None else gs, scores if gsum is None else gsum, scores,
        experts, out, T, E, K=k, HAS_GW=gw is not None, HAS_GS=gs is not None, HAS_GSUM=gsum is not None,
        SIGMOID=bool(sigmoid), NORMALIZE=bool(normalize), TINY=_TINY, BLOCK_T=block_t, BLOCK_E=block_e)
    return out
