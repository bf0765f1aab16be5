"""Triton slot assignment: one program per expert scans the assignments in service order.

Legend: T tokens, k choices (the constexpr ``K``), N = T*k assignments, E experts.
Program e walks ``order`` in blocks, marks the dispatched assignments of expert e, and gives each its exclusive running
count (a block cumsum plus the carry from earlier blocks) as its position.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _assign_slots(experts_ptr, order_ptr, dispatched_ptr, positions_ptr, tokens_ptr, N, capacity,
                  HAS_CAPACITY: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0)
    seen = tl.zeros([], dtype=tl.int64)
    for start in range(0, N, BLOCK):
        i = start + tl.arange(0, BLOCK)
        m = i < N
        a = tl.load(order_ptr + i, mask=m, other=0)
        m = m & (a >= 0) & (a < N)
        disp = tl.load(dispatched_ptr + a, mask=m, other=0)
        ex = tl.load(experts_ptr + a, mask=m, other=-1)
        hit = m & (disp != 0) & (ex == e)
        h = hit.to(tl.int64)
        pos = seen + tl.cumsum(h, 0) - h
        keep = hit
        if HAS_CAPACITY:
            keep = keep & (pos < capacity)
        tl.store(positions_ptr + a, pos, mask=keep)
        seen += tl.sum(h, 0)
    if HAS_CAPACITY:
        seen = tl.minimum(seen, capacity)
    tl.store(tokens_ptr + e, seen)


def assign_slots(experts: torch.Tensor, order: torch.Tensor, dispatched: torch.Tensor, num_experts: int,
                 capacity: int):
    """(positions[T,k], kept[T,k], tokens_per_expert[E]); capacity < 0 means dropless."""
    experts = experts.long().contiguous()
    order = order.long().contiguous()
    disp = dispatched.to(torch.uint8).contiguous()
    N = experts.numel()
    positions = torch.full(experts.shape, -1, dtype=torch.long, device=experts.device)
    tokens = torch.zeros((num_experts,), dtype=torch.long, device=experts.device)
    if N > 0:
        block = min(triton.next_power_of_2(N), 1024)
        _assign_slots[(num_experts,)](experts, order, disp, positions, tokens, N, max(capacity, 0),
                                      HAS_CAPACITY=capacity >= 0, BLOCK=block)
    return positions, positions >= 0, tokens
