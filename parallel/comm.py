"""Differentiable collectives over one process group (the tensor-parallel group, mostly).

Legend: n the length of ``dim``; R the group size; piece r = rows ``bounds(n, R, r)``
of ``dim`` (near-equal contiguous pieces, the first ``n % R`` one longer).

Each function is one autograd op whose backward is the collective that makes the
gradients right when the code around it computes the same thing on every rank of
the group (the tensor-parallel convention: the loss, and everything outside the
split layers, is replicated over tp):

    split(x)          fwd: keep piece r              bwd: all-gather the pieces
    gather(x)         fwd: all-gather the pieces     bwd: keep piece r (grads are replicated)
    gather_sum_grad(x)  fwd: all-gather              bwd: reduce-scatter (sum the partial grads)
    reduce_scatter(x)   fwd: reduce-scatter (sum)    bwd: all-gather

``gather_sum_grad`` / ``reduce_scatter`` are the sequence-parallel pair around
megatron-core's column- / row-parallel layers (Megatron-LM's "g" and "g-bar"); they
run on gloo and NCCL alike (megatron-core's own versions assume CUDA). Uneven pieces
travel padded to the longest one. With a group of one rank every op is the identity.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

Group = Optional[dist.ProcessGroup]  # None: no group (one rank), unlike torch's None (the world)


def bounds(n: int, size: int, rank: int) -> Tuple[int, int]:
    """[start, end) of piece ``rank`` when n rows are cut into ``size`` near-equal pieces."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _lengths(n: int, size: int) -> List[int]:
    return [bounds(n, size, r)[1] - bounds(n, size, r)[0] for r in range(size)]


def _piece(x: Tensor, dim: int, group: Group) -> Tensor:
    start, end = bounds(x.shape[dim], _size(group), _rank(group))
    return x.narrow(dim, start, end - start).contiguous()


def _all_gather(x: Tensor, dim: int, group: Group, total: int) -> Tensor:
    """Pieces of every rank (piece r has length ``bounds(total, R, r)``) concatenated along ``dim``."""
    R = _size(group)
    lengths = _lengths(total, R)
    longest = max(lengths)
    moved = x.movedim(dim, 0)
    if moved.shape[0] < longest:
        moved = torch.cat([moved, moved.new_zeros((longest - moved.shape[0], *moved.shape[1:]))])
    out = moved.new_empty((R * longest, *moved.shape[1:]))
    dist.all_gather_single(out, moved.contiguous(), group=group)
    parts = [out[r * longest: r * longest + lengths[r]] for r in range(R)]
    return torch.cat(parts).movedim(0, dim)


def _reduce_scatter(x: Tensor, dim: int, group: Group) -> Tensor:
    """Sum over the group, then keep piece r along ``dim``."""
    R, n = _size(group), x.shape[dim]
    lengths = _lengths(n, R)
    if len(set(lengths)) == 1:
        moved = x.movedim(dim, 0).contiguous()
        out = moved.new_empty((lengths[0], *moved.shape[1:]))
        dist.reduce_scatter_single(out, moved, group=group)
        return out.movedim(0, dim)
    total = x.contiguous().clone()
    dist.all_reduce(total, group=group)
    return _piece(total, dim, group)


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, group: Group) -> Tensor:
        ctx.dim, ctx.group, ctx.n = dim, group, x.shape[dim]
        return _piece(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None, None]:
        return _all_gather(grad, ctx.dim, ctx.group, ctx.n), None, None


class _Gather(torch.autograd.Function):
    """All-gather; backward keeps this rank's piece of the gradient, summed over the
    group first when ``sum_grad`` (the gradients are partial) and as it is otherwise
    (the gradients are replicated)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, group: Group, total: int, sum_grad: bool) -> Tensor:
        ctx.dim, ctx.group, ctx.sum_grad = dim, group, sum_grad
        return _all_gather(x, dim, group, total)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None, None, None, None]:
        piece = _reduce_scatter(grad, ctx.dim, ctx.group) if ctx.sum_grad else _piece(grad, ctx.dim, ctx.group)
        return piece, None, None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, group: Group) -> Tensor:
        ctx.dim, ctx.group, ctx.n = dim, group, x.shape[dim]
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None, None]:
        return _all_gather(grad, ctx.dim, ctx.group, ctx.n), None, None


def split(x: Tensor, dim: int, group: Group) -> Tensor:
    """This rank's piece of ``x`` along ``dim``; backward all-gathers the gradient."""
    return x if _size(group) == 1 else _Split.apply(x, dim, group)


def gather(x: Tensor, dim: int, group: Group, total: int | None = None) -> Tensor:
    """All pieces concatenated along ``dim`` (``total``: the full length, default R * local);
    backward keeps this rank's piece of the (replicated) gradient."""
    if _size(group) == 1:
        return x
    return _Gather.apply(x, dim, group, total if total is not None else x.shape[dim] * _size(group), False)


def gather_sum_grad(x: Tensor, dim: int, group: Group, total: int | None = None) -> Tensor:
    """All pieces concatenated along ``dim``; backward sums the (partial) gradients and keeps this piece."""
    if _size(group) == 1:
        return x
    return _Gather.apply(x, dim, group, total if total is not None else x.shape[dim] * _size(group), True)


def reduce_scatter(x: Tensor, dim: int, group: Group) -> Tensor:
    """Sum of ``x`` over the group, this rank's piece along ``dim``; backward all-gathers."""
    return x if _size(group) == 1 else _ReduceScatter.apply(x, dim, group)
