"""Permute kept assignments into expert-major rows, and combine them back.

Legend: T tokens, k choices, E experts, N rows, D width.

Row layout: expert e's rows start at ``offsets[e]`` and hold its kept assignments in
slot order (``Routing.positions``). Compact layout (default): ``offsets`` is the
exclusive cumulative sum of ``tokens_per_expert`` and N = number of kept
assignments. Padded layout (``pad_to_capacity=True``, needs a capacity): expert e
owns rows ``[e*C, (e+1)*C)``; unused rows are zero, so shapes are static.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .ops import get_backend
from .routing_types import Routing


@dataclass
class PermutePlan:
    """Where each assignment went: ``dest[T, k]`` row index (-1: not in any row)."""

    dest: torch.Tensor
    num_rows: int
    rows_per_expert: torch.Tensor  # LongTensor[E] rows each expert owns (C each when padded)
    offsets: torch.Tensor  # LongTensor[E] first row of each expert
    padded_capacity: Optional[int]
    backend: str = "auto"


def make_plan(routing: Routing, *, pad_to_capacity: bool = False, backend: str = "auto") -> PermutePlan:
    E = routing.num_experts
    device = routing.experts.device
    counts = routing.tokens_per_expert
    if pad_to_capacity:
        if routing.capacity is None:
            raise ValueError("pad_to_capacity=True needs a capacity; this routing is dropless (capacity=None)")
        C = routing.capacity
        offsets = torch.arange(E, device=device) * C
        num_rows = E * C
        rows_per_expert = torch.full_like(counts, C)
    else:
        C = None
        offsets = torch.cumsum(counts, 0) - counts
        num_rows = int(counts.sum())
        rows_per_expert = counts
    dest = torch.where(routing.kept, offsets[routing.experts] + routing.positions, torch.full_like(routing.positions, -1))
    return PermutePlan(dest, num_rows, rows_per_expert, offsets, C, backend)


def permute(x: torch.Tensor, routing: Routing, *, pad_to_capacity: bool = False,
            backend: str = "auto") -> Tuple[torch.Tensor, PermutePlan]:
    """Gather each kept assignment's token row into expert-major order.

    x[T, D] -> (rows[N, D], plan). Differentiable with respect to ``x``.
    """
    if x.dim() != 2 or x.shape[0] != routing.num_tokens:
        raise ValueError(f"x has shape {tuple(x.shape)}; permute needs [T, D] with T={routing.num_tokens}")
    plan = make_plan(routing, pad_to_capacity=pad_to_capacity, backend=backend)
    rows = get_backend(backend, x.device).ops.permute_rows(x, plan.dest, plan.num_rows)
    return rows, plan


def unpermute(rows: torch.Tensor, plan: PermutePlan, routing: Routing) -> torch.Tensor:
    """Combine expert outputs back into token order, weighted by the routing weights.

    rows[N, D] -> y[T, D] with y[t] = sum_j weights[t, j] * rows[dest[t, j]]; a dropped
    assignment adds zero. Differentiable with respect to ``rows`` and the weights.
    """
    if rows.dim() != 2 or rows.shape[0] != plan.num_rows:
        raise ValueError(f"rows has shape {tuple(rows.shape)}; unpermute needs [{plan.num_rows}, D]")
    return get_backend(plan.backend, rows.device).ops.unpermute_rows(rows, plan.dest, routing.weights)
