"""How a parameter is split over ranks: the one marker every tensor-parallel tensor carries.

A tensor-parallel parameter is one contiguous piece of a GLOBAL tensor whose layout
does not depend on the parallel layout (the same tensor a one-process model holds):

    param.tensor_shard = TensorShard(dim, rank, size, group, global_len)
    the global tensor cut along ``dim`` into ``size`` equal pieces (each ``param.shape[dim]``
    long); this parameter is piece ``rank``; ``group`` names the ``ParallelDims`` group
    the pieces are spread over ("tp" for dense layers, "etp" for expert weights).
    ``global_len`` <= size * local length: the global tensor's length along ``dim``.
    It is smaller only for a padded vocabulary, whose padding rows sit at the end of
    the last piece(s) and are never saved.

Who reads it: ``moe.models.init_weights`` (draws the global tensor from its seed and
keeps this piece, so every layout starts from the same weights), the checkpoints
(each piece saved at its global offset, so a checkpoint loads at any tp / etp),
and ``parallel.grads`` (the squared norm of a piece is summed over ``group``).

A parameter whose gradient is PARTIAL on each rank of a group (sequence parallelism:
norms, biases added on sequence shards) carries ``param.partial_grad_group = "tp"``;
``parallel.grads`` sums those gradients over that group first.

Global layouts fixed here for fused weights (so one contiguous piece is whole heads
or whole hidden units on every rank):

- attention ``qkv`` rows: head-major ``(head, {q, k, v}, head_dim)``;
- SwiGLU input projections (dense ``w_in`` rows, expert ``w1`` columns): unit-major
  ``(unit, {gate, up})``, i.e. gate and up of hidden unit f side by side.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

SHARD_GROUPS = ("tp", "etp")
# The markers are plain attributes set on the tensor object (torch.Tensor declares neither),
# written by mark_* and read back by shard_of / partial_grad_group under these names.
TENSOR_SHARD_ATTR = "tensor_shard"
PARTIAL_GRAD_ATTR = "partial_grad_group"


@dataclass(frozen=True)
class TensorShard:
    """This parameter is piece ``rank`` of ``size`` along ``dim`` of a global tensor (see the module doc)."""

    dim: int
    rank: int
    size: int
    group: str
    global_len: int

    def __post_init__(self) -> None:
        if self.group not in SHARD_GROUPS:
            raise ValueError(f"TensorShard.group must be one of {SHARD_GROUPS}, got {self.group!r}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"TensorShard.rank={self.rank} must be in [0, size={self.size})")

    def global_shape(self, local_shape) -> tuple:
        shape = list(local_shape)
        shape[self.dim] = self.global_len
        return tuple(shape)

    def offset(self, local_len: int) -> int:
        """Where this piece starts along ``dim`` in the global tensor."""
        return self.rank * local_len

    def real_len(self, local_len: int) -> int:
        """How many of this piece's ``local_len`` entries along ``dim`` are real (not padding)."""
        return max(0, min(local_len, self.global_len - self.offset(local_len)))


def mark_shard(param: torch.Tensor, *, dim: int, rank: int, size: int, group: str = "tp",
               global_len: Optional[int] = None) -> torch.Tensor:
    """Mark ``param`` as piece ``rank`` of ``size`` along ``dim`` (returns it)."""
    if dim < 0:
        dim += param.dim()
    local = param.shape[dim]
    setattr(param, TENSOR_SHARD_ATTR,
            TensorShard(dim, rank, size, group, local * size if global_len is None else global_len))
    return param


def shard_of(param: torch.Tensor) -> Optional[TensorShard]:
    """The ``TensorShard`` of a parameter, or None when it is not split (replicated)."""
    shard = getattr(param, TENSOR_SHARD_ATTR, None)
    return shard if shard is not None and shard.size > 1 else None


def mark_partial_grad(param: torch.Tensor, group: str = "tp") -> torch.Tensor:
    """Mark ``param`` as having a partial gradient on each rank of ``group`` (summed by ``parallel.grads``)."""
    setattr(param, PARTIAL_GRAD_ATTR, group)
    return param


def partial_grad_group(param: torch.Tensor) -> Optional[str]:
    return getattr(param, PARTIAL_GRAD_ATTR, None)


@torch.no_grad()
def take_piece(full: torch.Tensor, shard: Optional[TensorShard]) -> torch.Tensor:
    """This rank's piece of the global tensor ``full`` (padding rows beyond ``global_len`` as zeros)."""
    if shard is None:
        return full
    if full.shape[shard.dim] != shard.global_len:
        raise ValueError(f"take_piece: the global tensor has length {full.shape[shard.dim]} along dim "
                         f"{shard.dim}, the shard expects {shard.global_len}")
    local = -(-shard.global_len // shard.size)  # every piece's length (the last ones padded)
    real = shard.real_len(local)
    piece = full.narrow(shard.dim, shard.offset(local), real)
    if real == local:
        return piece
    pad_shape = list(full.shape)
    pad_shape[shard.dim] = local - real
    return torch.cat([piece, full.new_zeros(pad_shape)], dim=shard.dim)
