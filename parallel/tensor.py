"""Tensor parallelism: megatron-core's layers wired to our process groups.

Legend: B batch, L sequence length, D model width, R = tp ranks, r this rank's tp index,
V vocabulary, V_pad = ceil(V / R) * R.

``TensorParallel`` is what a model needs to build its tensor-parallel layers: the tp
group (from ``ParallelDims``, passed explicitly to every megatron-core layer), the etp
group of the experts, and whether sequence parallelism is on. With R == 1 the
factories return plain ``nn.Linear`` / ``nn.Embedding`` (megatron-core is not even
imported); with R > 1 they return subclasses of megatron-core's
``ColumnParallelLinear`` / ``RowParallelLinear`` / ``VocabParallelEmbedding`` with the
SAME parameter names (``weight``, ``bias``), each parameter marked with its
``parallel.shards.TensorShard``. Every layer returns one tensor (megatron's return
``(output, bias)``; the bias is added here).

Data flow (tensors on every rank of the tp group):

    without sequence parallelism (activations replicated over tp):
      column(x[..., D])      -> y[..., out/R]   megatron: backward all-reduces dx
      row(y[..., in/R])      -> z[..., D]       megatron: forward all-reduces the partial sums
    with sequence parallelism (activations split along L: x[B, L/R, D]):
      column(x[B, L/R, D])   -> all-gather L (backward: reduce-scatter) -> y[B, L, out/R]
      row(y[B, L, in/R])     -> partial sums -> reduce-scatter L (backward: all-gather) -> z[B, L/R, D]
      the sequence collectives are ``parallel.comm`` ops (megatron-core's own SP path
      assumes CUDA); megatron's layers run with their reductions turned off
      (``disable_grad_reduce`` on the column layer, the "explicit communication" mode of
      the row layer). Norm weights and row-layer biases then see one sequence piece
      each: they are marked ``partial_grad_group = "tp"`` and their gradients summed.

Vocabulary: ``vocab_embedding`` pads V to V_pad (rows V .. V_pad-1 at the end of the
last pieces, zero, never looked up, never saved); ``vocab_cross_entropy`` masks the
padding logits and calls megatron-core's ``vocab_parallel_cross_entropy``, which reads
the tp group from megatron's ``parallel_state``: ``install_megatron_state`` sets it
from our groups (the one place megatron's global state is touched).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Dict, Optional, Type

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import comm
from .rng import tp_rank_fork
from .dims import ProcessGroups
from .shards import mark_partial_grad, mark_shard, shard_of

SEQ_DIM = 1  # activations are [B, L, D]: sequence parallelism splits dim 1


@dataclass(frozen=True)
class TensorParallel:
    """The tensor-parallel layout a model is built for (see the module docstring).

    ``group``: the tp process group (None: no tensor parallelism); ``etp_group``: the
    expert-tensor-parallel group; ``sequence_parallel``: split activations along L
    between the tensor-parallel layers.
    """

    group: Optional[dist.ProcessGroup] = None
    etp_group: Optional[dist.ProcessGroup] = None
    sequence_parallel: bool = False

    @classmethod
    def from_groups(cls, groups: Optional[ProcessGroups]) -> TensorParallel:
        """From a ``parallel.ProcessGroups`` (None: no tensor parallelism)."""
        if groups is None:
            return cls()
        return cls(groups.tp_group, groups.etp_group, groups.dims.sequence_parallel)

    @property
    def size(self) -> int:
        return 1 if self.group is None else dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return 0 if self.group is None else dist.get_rank(self.group)

    @property
    def etp_size(self) -> int:
        return 1 if self.etp_group is None else dist.get_world_size(self.etp_group)

    @property
    def etp_rank(self) -> int:
        return 0 if self.etp_group is None else dist.get_rank(self.etp_group)

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def sp(self) -> bool:
        """Sequence parallelism in effect (asked for and tp > 1)."""
        return self.sequence_parallel and self.enabled

    # ---- sequence pieces -------------------------------------------------------------
    def scatter_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """Replicated x[B, L, ...] -> this rank's sequence piece (identity without SP)."""
        return comm.split(x, SEQ_DIM, self.group) if self.sp else x

    def gather_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """Sequence piece -> the whole x[B, L, ...], replicated (identity without SP); the
        code after it must compute the same on every rank (its gradient is replicated).
        Sequence parallelism requires L divisible by tp, so the pieces are equal."""
        return comm.gather(x, SEQ_DIM, self.group) if self.sp else x

    def rank_rng(self, active: bool = True) -> contextlib.AbstractContextManager[None]:
        """Context for random draws on tensor-parallel PIECES (attention dropout on this rank's
        heads, dropout on a sequence piece): torch's RNG forked and seeded per tp rank, so the
        pieces get independent masks, while the replicated stream outside stays identical on
        every tp rank (each rank draws the same one number from it to seed the fork).
        A no-op without tp or when ``active`` is False (e.g. no dropout)."""
        if not (active and self.enabled):
            return contextlib.nullcontext()
        return tp_rank_fork(self.rank)

    # ---- layer factories ---------------------------------------------------------------
    def column_linear(self, in_features: int, out_features: int, *, bias: bool = True) -> nn.Module:
        """y = x W^T + b with W's output rows split over tp (``y`` holds this rank's out/R features)."""
        if not self.enabled:
            return nn.Linear(in_features, out_features, bias=bias)
        return _classes()["column"](in_features, out_features, bias=bias, tp=self)

    def row_linear(self, in_features: int, out_features: int, *, bias: bool = True) -> nn.Module:
        """z = y W^T + b with W's input columns split over tp (``y`` holds this rank's in/R features)."""
        if not self.enabled:
            return nn.Linear(in_features, out_features, bias=bias)
        return _classes()["row"](in_features, out_features, bias=bias, tp=self)

    def vocab_embedding(self, vocab_size: int, dim: int) -> nn.Module:
        """Token embedding with rows split over tp (vocabulary padded to a multiple of tp)."""
        if not self.enabled:
            return nn.Embedding(vocab_size, dim)
        return _classes()["vocab"](vocab_size, dim, tp=self)

    def mark_norm(self, norm: nn.Module) -> nn.Module:
        """Mark a norm's parameters as partial-gradient under sequence parallelism (returns it)."""
        if self.sp:
            for p in norm.parameters():
                mark_partial_grad(p, "tp")
        return norm


def padded_vocab(vocab_size: int, tp: int) -> int:
    """V rounded up to a multiple of tp (each rank holds V_pad / tp rows)."""
    return -(-vocab_size // tp) * tp


def _megatron_config(tp: TensorParallel) -> Any:  # megatron.core.ModelParallelConfig (megatron-core is untyped)
    from megatron.core import ModelParallelConfig

    # Weights are created on the CPU and not initialised by megatron: moe.models.init_weights
    # draws every global tensor from (seed, name) and keeps this rank's piece.
    return ModelParallelConfig(tensor_model_parallel_size=tp.size, use_cpu_initialization=True,
                               perform_initialization=False, sequence_parallel=False)


def _no_init(_weight: torch.Tensor) -> None:
    return None


@functools.cache
def _classes() -> Dict[str, Type[nn.Module]]:
    """The megatron-core subclasses, defined on first use (importing megatron-core takes seconds)."""
    from megatron.core import tensor_parallel as mtp

    class ColumnLinear(mtp.ColumnParallelLinear):
        """megatron-core ``ColumnParallelLinear`` over our tp group; returns y (bias added)."""

        tp_linear = True

        def __init__(self, in_features: int, out_features: int, *, bias: bool, tp: TensorParallel):
            super().__init__(in_features, out_features, config=_megatron_config(tp), init_method=_no_init,
                             bias=bias, gather_output=False, skip_bias_add=False,
                             disable_grad_reduce=tp.sp, tp_group=tp.group)
            self.tp = tp
            mark_shard(self.weight, dim=0, rank=tp.rank, size=tp.size)
            if self.bias is not None:
                mark_shard(self.bias, dim=0, rank=tp.rank, size=tp.size)
                with torch.no_grad():
                    self.bias.zero_()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.tp.sp:  # x is a sequence piece: gather it; dx is partial, so its backward sums
                x = comm.gather_sum_grad(x, SEQ_DIM, self.tp.group)
            return super().forward(x)[0]

    class RowLinear(mtp.RowParallelLinear):
        """megatron-core ``RowParallelLinear`` over our tp group; returns z (bias added once)."""

        tp_linear = True

        def __init__(self, in_features: int, out_features: int, *, bias: bool, tp: TensorParallel):
            # With SP, megatron's "explicit communication" mode (is_expert) leaves the partial
            # sums to us: we reduce-scatter them along the sequence (its own SP path needs CUDA).
            super().__init__(in_features, out_features, config=_megatron_config(tp), init_method=_no_init,
                             bias=bias, input_is_parallel=True, skip_bias_add=tp.sp, is_expert=tp.sp,
                             tp_group=tp.group)
            self.tp = tp
            mark_shard(self.weight, dim=1, rank=tp.rank, size=tp.size)
            if self.bias is not None:
                with torch.no_grad():
                    self.bias.zero_()
                if tp.sp:
                    mark_partial_grad(self.bias, "tp")

        def forward(self, y: torch.Tensor) -> torch.Tensor:
            out, bias = super().forward(y)
            if not self.tp.sp:
                return out
            out = comm.reduce_scatter(out, SEQ_DIM, self.tp.group)
            return out if bias is None else out + bias

    class VocabEmbedding(mtp.VocabParallelEmbedding):
        """megatron-core ``VocabParallelEmbedding`` of V_pad rows; rows >= V are padding."""

        tp_linear = True

        def __init__(self, vocab_size: int, dim: int, *, tp: TensorParallel):
            super().__init__(padded_vocab(vocab_size, tp.size), dim, init_method=_no_init,
                             config=_megatron_config(tp), tp_group=tp.group)
            self.vocab_size, self.tp = vocab_size, tp
            mark_shard(self.weight, dim=0, rank=tp.rank, size=tp.size, global_len=vocab_size)
            with torch.no_grad():
                self.weight.zero_()

    return {"column": ColumnLinear, "row": RowLinear, "vocab": VocabEmbedding}


def _set_megatron_tp_state(parallel_state: Any, group: Optional[dist.ProcessGroup], size: Optional[int],
                           rank: Optional[int]) -> None:
    """Write megatron-core's tensor-parallel globals (``parallel_state``: the module ``megatron.core.parallel_state``,
    typed ``Any``: megatron-core ships no type information)."""
    parallel_state._TENSOR_MODEL_PARALLEL_GROUP = group
    parallel_state._MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE = size
    parallel_state._MPU_TENSOR_MODEL_PARALLEL_RANK = rank


def install_megatron_state(tp_group: Optional[dist.ProcessGroup]) -> None:
    """Point megatron-core's ``parallel_state`` tensor-parallel group at ``tp_group`` (ours).

    megatron's ``vocab_parallel_cross_entropy`` has no group argument; everything else
    gets the group explicitly. Idempotent; ``clear_megatron_state`` undoes it.
    """
    from megatron.core import parallel_state

    _set_megatron_tp_state(parallel_state, tp_group, dist.get_world_size(tp_group), dist.get_rank(tp_group))


def clear_megatron_state() -> None:
    """Undo ``install_megatron_state`` (nothing to do when megatron-core was never imported)."""
    import sys

    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None:
        _set_megatron_tp_state(parallel_state, None, None, None)


def _weight_of(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"vocab_logits: the head {type(module).__name__} has no weight tensor (got "
                        f"{type(weight).__name__})")
    return weight


def vocab_logits(h: torch.Tensor, embedding: nn.Module, tp: TensorParallel) -> torch.Tensor:
    """Tied output head: h[B, L(/R), D] -> logits of this rank's vocabulary piece [B, L, V_pad/R]
    (the whole vocabulary [B, L, V] without tp). Padding logits are set to the dtype's minimum.

    ``embedding``: a module whose ``weight`` is [V, D] (an ``nn.Embedding`` or ``nn.Linear``) without tp,
    a ``vocab_embedding`` with tp (its weight's ``TensorShard`` gives V: ``global_len``)."""
    weight = _weight_of(embedding)
    if not tp.enabled:
        return h @ weight.t()
    shard = shard_of(weight)
    if shard is None:
        raise ValueError(f"vocab_logits: under tensor parallelism the head must be a TensorParallel.vocab_embedding "
                         f"(its weight a marked vocabulary piece), got {type(embedding).__name__}")
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    if tp.sp:  # a sequence piece: gather it; the vocabulary pieces' input gradients are summed
        h = comm.gather_sum_grad(h, SEQ_DIM, tp.group)
    else:
        h = copy_to_tensor_model_parallel_region(h, group=tp.group)
    logits = h @ weight.t()
    per_rank = weight.shape[0]
    real = shard.global_len - tp.rank * per_rank  # V rows in all, the last ones padding
    if real < per_rank:
        pad = torch.arange(per_rank, device=logits.device) >= max(real, 0)
        logits = logits.masked_fill(pad, torch.finfo(logits.dtype).min)
    return logits


def vocab_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Mean cross entropy (fp32) of ``vocab_logits`` output against targets[B, L]."""
    if not tp.enabled:
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    install_megatron_state(tp.group)
    return vocab_parallel_cross_entropy(logits.float(), targets).mean()
