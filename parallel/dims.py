"""Process topology: the validated layout of every parallel dimension and its groups.

Legend: W world size; dense part pp x dp x tp; expert part pp x edp x ep x etp
(per pipeline stage dp * tp == edp * ep * etp; the expert part reuses the same
ranks as the dense part).

Rank layout (innermost / fastest-varying first):
    dense:  rank = ((pp_i * dp) + dp_i) * tp + tp_i
    expert: rank = (((pp_i * edp) + edp_i) * ep + ep_i) * etp + etp_i
so tensor-parallel ranks are contiguous, then expert-parallel ranks. World 4 with
ep=2, dp=2 gives ep groups [0, 1], [2, 3] and edp groups [0, 2], [1, 3].

``ParallelDims`` is pure (no processes needed): it validates the sizes and computes
the rank lists. ``ParallelDims.build(timeout=...)`` creates the torch process groups after
``torch.distributed.init_process_group`` and returns a ``ProcessGroups`` for this
rank; it is passed explicitly to whatever needs it, and carries the collective timeout
its groups were created with (``ProcessGroups.timeout``) for whoever creates groups later.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

from .checks import check_bool, check_int

# Axis names in layout order (outermost first) for each view of the ranks.
DENSE_AXES = ("pp", "dp", "tp")
EXPERT_AXES = ("pp", "edp", "ep", "etp")
GROUP_NAMES = ("dp", "tp", "pp", "ep", "etp", "edp")


def _axis_groups(world_size: int, sizes: dict[str, int], axes: tuple[str, ...], axis: str) -> list[list[int]]:
    """Rank lists of every group along ``axis`` when ranks 0..W-1 are laid out
    row-major over ``axes`` (outermost first) with the given sizes.

    Each group holds the ranks that differ only in their ``axis`` index, in
    increasing order; groups are ordered by their smallest rank.
    """
    stride = 1
    for name in reversed(axes):
        if name == axis:
            break
        stride *= sizes[name]
    size = sizes[axis]
    groups = []
    for first in range(world_size):
        # ``first`` starts a group iff its own index along ``axis`` is 0.
        if (first // stride) % size == 0:
            groups.append([first + i * stride for i in range(size)])
    return groups


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of each parallel dimension, validated on construction.

    Fields: ``world_size`` (W), ``dp`` (dense data parallel), ``ep`` (expert
    parallel), ``tp`` (tensor parallel), ``pp`` (pipeline stages), ``etp`` (expert
    tensor parallel), ``sequence_parallel`` (split activations along the sequence
    between tensor-parallel layers; only meaningful with tp > 1). Requires
    ``dp * tp * pp == W`` and ``ep * etp`` dividing ``dp * tp``;
    ``edp = dp * tp // (ep * etp)`` is derived.
    """

    world_size: int
    dp: int
    ep: int = 1
    tp: int = 1
    pp: int = 1
    etp: int = 1
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        for name in ("world_size", "dp", "ep", "tp", "pp", "etp"):
            check_int(f"ParallelDims.{name}", getattr(self, name), minimum=1)
        check_bool("ParallelDims.sequence_parallel", self.sequence_parallel)
        if self.dp * self.tp * self.pp != self.world_size:
            raise ValueError(
                f"ParallelDims: dp * tp * pp must equal world_size={self.world_size}, "
                f"got dp={self.dp} * tp={self.tp} * pp={self.pp} = {self.dp * self.tp * self.pp}"
            )
        stage = self.dp * self.tp
        if stage % (self.ep * self.etp) != 0:
            allowed = [k for k in range(1, stage + 1) if stage % (k * self.etp) == 0]
            raise ValueError(
                f"ParallelDims.ep={self.ep} (with etp={self.etp}) must divide the ranks per "
                f"pipeline stage dp * tp = {stage}; allowed ep values: {allowed}"
            )

    @classmethod
    def from_world(cls, world_size: int, *, ep: int = 1, tp: int = 1, pp: int = 1, etp: int = 1,
                   sequence_parallel: bool = False) -> ParallelDims:
        """Derive ``dp = world_size // (tp * pp)`` and validate the rest."""
        for name, value in (("world_size", world_size), ("tp", tp), ("pp", pp)):
            check_int(f"ParallelDims.{name}", value, minimum=1)
        if world_size % (tp * pp) != 0:
            raise ValueError(
                f"ParallelDims.from_world: tp * pp = {tp * pp} must divide world_size={world_size}"
            )
        return cls(world_size=world_size, dp=world_size // (tp * pp), ep=ep, tp=tp, pp=pp, etp=etp,
                   sequence_parallel=sequence_parallel)

    @property
    def edp(self) -> int:
        """Expert data-parallel size: replicas of each expert shard per stage."""
        return self.dp * self.tp // (self.ep * self.etp)

    def sizes(self) -> dict[str, int]:
        """Every dimension's size by name (``dp tp pp ep etp edp``)."""
        return {"dp": self.dp, "tp": self.tp, "pp": self.pp, "ep": self.ep, "etp": self.etp, "edp": self.edp}

    def group_ranks(self, name: str) -> list[list[int]]:
        """All groups of dimension ``name`` (one of ``dp tp pp ep etp edp``) as
        rank lists; their union is every rank exactly once."""
        if name not in GROUP_NAMES:
            raise ValueError(f"ParallelDims.group_ranks: name must be one of {GROUP_NAMES}, got {name!r}")
        axes = EXPERT_AXES if name in ("ep", "etp", "edp") else DENSE_AXES
        return _axis_groups(self.world_size, self.sizes(), axes, name)

    def group_of(self, name: str, rank: int) -> list[int]:
        """The ranks of the ``name`` group that contains ``rank``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"ParallelDims.group_of: rank must be in [0, {self.world_size}), got {rank}")
        for ranks in self.group_ranks(name):
            if rank in ranks:
                return ranks
        raise AssertionError("unreachable: groups cover every rank")

    def build(self, rank: Optional[int] = None, *, timeout: Optional[timedelta] = None) -> ProcessGroups:
        """Create every group of every dimension and return this rank's.

        Call on all ranks after ``torch.distributed.init_process_group`` with
        ``world_size == self.world_size``: torch requires each ``new_group`` call
        on every rank in the same order, which this does (dimensions in
        ``GROUP_NAMES`` order, groups by smallest rank). ``rank`` defaults to
        ``torch.distributed.get_rank()``. ``timeout``: the collective timeout of every
        group (the job's ``parallel.timeout_s``, as ``parallel.launch.init_distributed``
        gave the world group: ``DistContext.timeout``); None: torch's default for new groups.
        """
        if not dist.is_initialized():
            raise RuntimeError("ParallelDims.build: call torch.distributed.init_process_group first")
        if dist.get_world_size() != self.world_size:
            raise ValueError(
                f"ParallelDims.world_size={self.world_size} does not match the process group's "
                f"world size {dist.get_world_size()}"
            )
        rank = dist.get_rank() if rank is None else rank
        groups: dict[str, dist.ProcessGroup] = {}
        ranks: dict[str, list[int]] = {}
        for name in GROUP_NAMES:
            for members in self.group_ranks(name):
                handle = dist.new_group(members, timeout=timeout)
                if rank in members:
                    groups[name], ranks[name] = handle, members
        ends = None
        if self.pp > 1:  # the first and last stage of every pipeline (a tied embedding lives on both)
            for members in self.group_ranks("pp"):
                handle = dist.new_group([members[0], members[-1]], timeout=timeout)
                if rank in members:
                    ends = handle
        return ProcessGroups(
            dims=self,
            rank=rank,
            group_ranks=ranks,
            dp_group=groups["dp"],
            tp_group=groups["tp"],
            pp_group=groups["pp"],
            ep_group=groups["ep"],
            etp_group=groups["etp"],
            edp_group=groups["edp"],
            pp_ends_group=ends,
            timeout=timeout,
        )


@dataclass(frozen=True)
class ProcessGroups:
    """This rank's process groups, built by ``ParallelDims.build``.

    ``<name>_group`` is the torch group of dimension ``name``; ``<name>_rank`` is
    this rank's index in it and ``group_ranks[name]`` its global member ranks.
    ``pp_ends_group`` (pp > 1 only): the first and the last rank of this rank's pp group.
    ``timeout``: the collective timeout the groups were created with (None: torch's
    default); a module that creates more groups later (the hierarchical dispatcher's
    node groups) gives them the same.
    """

    dims: ParallelDims
    rank: int
    group_ranks: dict[str, list[int]] = field(repr=False)
    dp_group: dist.ProcessGroup = field(repr=False)
    tp_group: dist.ProcessGroup = field(repr=False)
    pp_group: dist.ProcessGroup = field(repr=False)
    ep_group: dist.ProcessGroup = field(repr=False)
    etp_group: dist.ProcessGroup = field(repr=False)
    edp_group: dist.ProcessGroup = field(repr=False)
    pp_ends_group: Optional[dist.ProcessGroup] = field(repr=False, default=None)
    timeout: Optional[timedelta] = None

    def _index(self, name: str) -> int:
        return self.group_ranks[name].index(self.rank)

    @property
    def dp_rank(self) -> int:
        return self._index("dp")

    @property
    def tp_rank(self) -> int:
        return self._index("tp")

    @property
    def pp_rank(self) -> int:
        return self._index("pp")

    @property
    def ep_rank(self) -> int:
        return self._index("ep")

    @property
    def etp_rank(self) -> int:
        return self._index("etp")

    @property
    def edp_rank(self) -> int:
        return self._index("edp")
