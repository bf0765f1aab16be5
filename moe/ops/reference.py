"""Reference (plain torch) implementations of the MoE kernels: readable, differentiable.

They are the CPU fallback and the oracle every fast backend is tested against.
Legend: T tokens, k choices per token (``K`` in shape suffixes), E experts, N rows
(permuted assignments), D width.

The four ops:
  router_topk    logits[T,E] -> weights[T,k], experts[T,k], scores[T,E], counts[E], score_sums[E]
  assign_slots   experts[T,k] + service order -> positions[T,k], kept[T,k], tokens_per_expert[E]
  permute_rows   x[T,D] + dest[T,k] -> rows[N,D]        (rows[dest[t,j]] = x[t])
  unpermute_rows rows[N,D] + dest[T,k] + weights[T,k] -> y[T,D]  (y[t] = sum_j w[t,j] rows[dest[t,j]])
A destination of -1 marks an assignment that is not in any row (dropped or not dispatched).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def router_topk(
    logits_TE: torch.Tensor,
    k: int,
    score: str = "softmax",
    normalize: bool = True,
    bias_E: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores, top-k choice, weights and per-expert sums, all in fp32.

    Selection ranks ``scores + bias`` (bias only chooses, never weighs); ties go to the
    lower expert index. Weights are the chosen scores, renormalised to sum to 1 when
    ``normalize``. Returns (weights[T,k], experts[T,k], scores[T,E], counts[E], score_sums[E]).
    """
    logits_TE = logits_TE.float()
    if score == "softmax":
        scores_TE = torch.softmax(logits_TE, dim=-1)
    elif score == "sigmoid":
        scores_TE = torch.sigmoid(logits_TE)
    else:
        raise ValueError(f"score={score!r} is not allowed; choose 'softmax' or 'sigmoid'")
    select_TE = scores_TE if bias_E is None else scores_TE + bias_E.float()
    # A stable descending sort keeps the lower expert index first among equal scores.
    experts_TK = torch.sort(select_TE.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    weights_TK = scores_TE.gather(1, experts_TK)
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    num_experts = logits_TE.shape[1]
    counts_E = torch.bincount(experts_TK.reshape(-1), minlength=num_experts)
    return weights_TK, experts_TK, scores_TE, counts_E, scores_TE.sum(dim=0)


def assign_slots(
    experts_TK: torch.Tensor,
    order_N: torch.Tensor,
    dispatched_TK: torch.Tensor,
    num_experts: int,
    capacity: Optional[int],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give each dispatched assignment its slot in its expert's buffer, in service order.

    ``order_N`` is a permutation of the flat assignment indices ``t * k + j`` (N = T*k):
    the order in which assignments are served. The i-th dispatched assignment that an
    expert receives gets position i; it is kept when ``position < capacity`` (always when
    capacity is None). Returns positions[T,k] (-1 where not kept), kept[T,k],
    tokens_per_expert[E] (kept).
    """
    T, k = experts_TK.shape
    flat_e = experts_TK.reshape(-1)[order_N]
    valid = dispatched_TK.reshape(-1)[order_N]
    one_hot = torch.nn.functional.one_hot(flat_e, num_experts) * valid.unsqueeze(1).long()
    # Running count per expert, read at each assignment's own expert, minus itself.
    pos_in_order = one_hot.cumsum(dim=0).gather(1, flat_e.unsqueeze(1)).squeeze(1) - 1
    kept_in_order = valid if capacity is None else valid & (pos_in_order < capacity)
    positions = torch.full((T * k,), -1, dtype=torch.long, device=experts_TK.device)
    positions[order_N] = torch.where(kept_in_order, pos_in_order, torch.full_like(pos_in_order, -1))
    positions_TK = positions.view(T, k)
    kept_TK = positions_TK >= 0
    tokens_per_expert = torch.bincount(experts_TK[kept_TK], minlength=num_experts)
    return positions_TK, kept_TK, tokens_per_expert


def permute_rows(x_TD: torch.Tensor, dest_TK: torch.Tensor, num_rows: int) -> torch.Tensor:
    """rows[dest[t, j]] = x[t] for every assignment with dest >= 0; other rows are zero."""
    k = dest_TK.shape[1]
    valid = dest_TK.reshape(-1) >= 0
    token_of = torch.arange(dest_TK.shape[0], device=x_TD.device).repeat_interleave(k)[valid]
    rows = x_TD.new_zeros(num_rows, x_TD.shape[1])
    return rows.index_copy(0, dest_TK.reshape(-1)[valid], x_TD[token_of])


def unpermute_rows(rows_ND: torch.Tensor, dest_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """y[t] = sum_j weights[t, j] * rows[dest[t, j]]; assignments with dest < 0 add zero."""
    T, k = dest_TK.shape
    valid = dest_TK.reshape(-1) >= 0
    token_of = torch.arange(T, device=rows_ND.device).repeat_interleave(k)[valid]
    w = weights_TK.reshape(-1)[valid].to(rows_ND.dtype).unsqueeze(1)
    contrib = rows_ND[dest_TK.reshape(-1)[valid]] * w
    return rows_ND.new_zeros(T, rows_ND.shape[1]).index_add(0, token_of, contrib)
