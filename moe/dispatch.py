"""Expert-parallel exchange of routed rows: dispatch to the experts' ranks, combine back.

Legend: N rows on this rank (expert-major over all experts); D row width (any
trailing shape); E global experts; R expert-parallel group size; E_l = E // R local
experts per rank (``El`` in shape suffixes); N_l rows received for the local experts;
Q chunks; for the hierarchical exchange R = Nn * G (Nn nodes, G ep ranks per node).

Global expert ``g`` lives on ep rank ``g // E_l`` as its local expert ``g % E_l``.
A dispatch is a list of *steps*: permutations of contiguous row blocks and uneven
``all_to_all_single`` exchanges. Combine runs the same steps backwards (inverse
permutation, exchange with the splits swapped), so combine(dispatch(rows)) puts
every row back where it started. Both exchanges are differentiable: the backward
of an all-to-all is the reverse all-to-all.

A single rank (no ep group, or a group of one rank) is one case, decided once by the
dispatcher (``AllToAllDispatcher.ep_size == 1``): its plans hold one ``_Keep`` step,
which moves nothing and counts every row as kept; nothing pretends to communicate.

Traffic statistics (``ExchangeStats``) count rows only, exactly: rows x row
elements x itemsize, no padding and no count messages. Rows a rank keeps for its
own experts ("self-sends", and every row on a single rank) are *not* in ``bytes_sent``
/ ``bytes_received``; they are counted separately in ``bytes_local``. Backward
traffic is not counted.

The all-to-all pieces (``AllToAll``, ``exchange_equal``, ``Permute``, ``is_identity``) are
shared with expert tensor parallelism (``moe.expert_tp``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from parallel.checks import check_int, fail
from parallel.objects import all_gather_objects, group_rank, group_size

from .config import MoEConfig

__all__ = ["AllToAll", "AllToAllDispatcher", "DispatchContext", "ExchangeStats", "HierarchicalAllToAllDispatcher",
           "Permute", "block_permutation", "build_dispatcher", "exchange_equal", "is_identity", "new_node_groups",
           "split_counts", "world_node_groups"]

ExpertFn = Callable[[Tensor, Tensor], Tensor]  # (rows[N_l, D], counts[E_l]) -> out[N_l, D']


# ----------------------------------------------------------------------------- helpers


def block_permutation(counts: Tensor, dims: Sequence[int]) -> Tensor:
    """Index that reorders rows stored as contiguous blocks.

    ``counts`` (any shape, integer, CPU) holds the row count of each block; rows are
    stored block after block in row-major order of ``counts``' indices. Returns
    LongTensor[sum(counts)] ``index`` such that ``rows[index]`` stores the same
    blocks (each block's rows in their original order) in row-major order of
    ``counts.permute(dims)``. Example: counts[R, E_l] with dims (1, 0) turns
    "source-major" into "local-expert-major".
    """
    flat = counts.reshape(-1)
    starts = torch.cumsum(flat, 0) - flat  # where each block starts now
    new_counts = counts.permute(*dims).reshape(-1)
    new_starts = starts.view(counts.shape).permute(*dims).reshape(-1)
    out_starts = torch.cumsum(new_counts, 0) - new_counts  # where it starts after
    total = int(flat.sum())
    shift = torch.repeat_interleave(new_starts - out_starts, new_counts, output_size=total)
    return torch.arange(total, dtype=torch.long) + shift


def is_identity(shape: Sequence[int], dims: Sequence[int]) -> bool:
    """True if permuting axes ``dims`` of blocks shaped ``shape`` moves no block."""
    moved = [d for d in dims if shape[d] > 1]
    return moved == sorted(moved)


def split_counts(counts_E: Tensor, num_chunks: int) -> Tensor:
    """Split each expert's row count into ``num_chunks`` near-equal consecutive parts.

    counts_E: LongTensor[E] -> LongTensor[E, Q]; the first ``counts % Q`` chunks of
    an expert get one row more. Rows ``[0, part_0)`` of the expert go to chunk 0, etc.
    """
    base = counts_E // num_chunks
    extra = (torch.arange(num_chunks) < (counts_E % num_chunks).unsqueeze(1)).long()
    return base.unsqueeze(1) + extra


def exchange_equal(t: Tensor, group: dist.ProcessGroup, device: torch.device) -> Tensor:
    """Equal-split all-to-all along dim 0 over ``group`` (t[R, ...] -> [R, ...]; block i from rank i).

    Travels on ``device`` (the rows' device, which the group's backend handles);
    returns a CPU tensor. Callers exchange over groups of two or more ranks only.
    """
    t = t.to(device).contiguous()
    out = torch.empty_like(t)
    dist.all_to_all_single(out, t, group=group)
    return out.cpu()


class _Pending:
    """An async all-to-all in flight: wait() before reading ``output``."""

    def __init__(self, work: Any, keep_alive: Tensor):
        self.work = work  # torch's Work handle of the async all_to_all_single
        self.keep_alive: Optional[Tensor] = keep_alive

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = self.keep_alive = None


class AllToAll(torch.autograd.Function):
    """Uneven all_to_all_single along dim 0 with autograd.

    x[sum(in_splits), ...] -> out[sum(out_splits), ...]. With ``pending`` (a list)
    the exchange is launched async and a ``_Pending`` is appended to it; the output
    must not be read before it is waited on. Backward is the reverse exchange.
    """

    @staticmethod
    def forward(ctx, x, group, out_splits, in_splits, pending):
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        x = x.contiguous()
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        work = dist.all_to_all_single(
            out, x, out_splits, in_splits, group=group, async_op=pending is not None
        )
        if pending is not None:
            pending.append(_Pending(work, x))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = AllToAll.apply(grad_out, ctx.group, ctx.in_splits, ctx.out_splits, None)
        return grad_in, None, None, None, None


# ----------------------------------------------------------------------------- steps


@dataclass
class Permute:
    """rows -> rows[index] (index LongTensor[n] on the rows' device)."""

    index: Tensor

    def apply(self, x: Tensor, pending: Optional[List[_Pending]] = None) -> Tensor:
        return x.index_select(0, self.index)

    def reverse(self) -> "Permute":
        inverse = torch.empty_like(self.index)
        inverse[self.index] = torch.arange(self.index.numel(), device=self.index.device)
        return Permute(inverse)

    def count(self, stats: "ExchangeStats", x: Tensor) -> None:
        """A permutation moves no row between ranks: nothing to count."""


@dataclass
class _Exchange:
    """An uneven all-to-all in ``group`` (two or more ranks); ``me`` is this rank's index in it."""

    group: dist.ProcessGroup
    out_splits: List[int]
    in_splits: List[int]
    me: int

    def apply(self, x: Tensor, pending: Optional[List[_Pending]] = None) -> Tensor:
        return AllToAll.apply(x, self.group, self.out_splits, self.in_splits, pending)

    def reverse(self) -> "_Exchange":
        return _Exchange(self.group, self.in_splits, self.out_splits, self.me)

    def count(self, stats: "ExchangeStats", x: Tensor) -> None:
        stats.add(self, _row_bytes(x))


@dataclass
class _Keep:
    """The exchange of a single rank: every row stays where it is (no communication), counted as
    kept (``bytes_local``). The plans' only step when the ep group has one rank."""

    def apply(self, x: Tensor, pending: Optional[List[_Pending]] = None) -> Tensor:
        return x

    def reverse(self) -> "_Keep":
        return self

    def count(self, stats: "ExchangeStats", x: Tensor) -> None:
        stats.keep(x.shape[0], _row_bytes(x))


_Step = Union[Permute, _Exchange, _Keep]


@dataclass
class ExchangeStats:
    """Rows and bytes one dispatch (or combine) moved, summed over its exchanges.

    ``*_sent`` / ``*_received``: to / from other ranks; ``*_local``: rows a rank
    sent to itself (never on the wire). A row crossing two hops (hierarchical)
    counts once per hop.
    """

    rows_sent: int = 0
    rows_received: int = 0
    rows_local: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_local: int = 0

    def add(self, step: _Exchange, row_bytes: int) -> None:
        """An exchange of rows of ``row_bytes`` bytes: its self-sends count as local."""
        local = step.in_splits[step.me]
        self.rows_sent += sum(step.in_splits) - local
        self.rows_received += sum(step.out_splits) - step.out_splits[step.me]
        self.rows_local += local
        self._bytes(row_bytes)

    def keep(self, rows: int, row_bytes: int) -> None:
        """``rows`` rows of ``row_bytes`` bytes kept on a single rank (``_Keep``)."""
        self.rows_local += rows
        self._bytes(row_bytes)

    def _bytes(self, row_bytes: int) -> None:
        self.bytes_sent = self.rows_sent * row_bytes
        self.bytes_received = self.rows_received * row_bytes
        self.bytes_local = self.rows_local * row_bytes


@dataclass
class _Plan:
    """How one batch of rows travels: steps, and the local counts at the end."""

    steps: List[_Step]
    local_counts: Tensor  # LongTensor[E_l]
    num_rows: int  # N, rows before dispatch
    num_local_rows: int  # N_l, rows after dispatch

    def reversed_steps(self) -> List[_Step]:
        return [s.reverse() for s in reversed(self.steps)]


@dataclass
class DispatchContext:
    """What ``combine`` needs to undo a ``dispatch`` (opaque to callers)."""

    plan: _Plan
    stats: ExchangeStats = field(default_factory=ExchangeStats)


def _row_bytes(x: Tensor) -> int:
    return math.prod(x.shape[1:]) * x.element_size()


def _run(steps: List[_Step], x: Tensor, stats: ExchangeStats) -> Tensor:
    """Apply ``steps`` to ``x`` synchronously, recording what each one moves or keeps in ``stats``."""
    for step in steps:
        step.count(stats, x)
        x = step.apply(x)
    return x


class _InFlight:
    """Steps applied up to (and including) an async exchange; ``finish`` runs the rest."""

    def __init__(self, steps: List[_Step], x: Tensor, stats: ExchangeStats):
        self.stats = stats
        self.pending: List[_Pending] = []
        self.rest: List[_Step] = []
        for i, step in enumerate(steps):
            step.count(stats, x)
            if isinstance(step, _Exchange):
                x = step.apply(x, self.pending)
                self.rest = steps[i + 1 :]
                break
            x = step.apply(x)
        self.x = x

    def finish(self) -> Tensor:
        for p in self.pending:
            p.wait()
        return _run(self.rest, self.x, self.stats)


# ----------------------------------------------------------------------------- dispatchers


class AllToAllDispatcher:
    """Sends each routed row to the rank holding its expert and brings results back.

    ``ep_group``: the expert-parallel process group (``None``: no expert
    parallelism). ``num_experts`` (E) must be a multiple of the group size R.
    ``num_chunks`` (Q) is used by ``dispatch_compute_combine``.

    A single rank (``ep_group`` None or of one rank, ``ep_size == 1``) is decided here,
    once: nothing travels, every row stays and counts as kept (``bytes_local``); the
    contract (row order, counts, chunking, statistics) is the same.

    After every call the dispatcher keeps ``dispatch_stats`` / ``combine_stats``
    (``ExchangeStats``); ``bytes_sent``, ``bytes_received`` and ``bytes_local`` are
    those of the last dispatch.
    """

    def __init__(self, ep_group: Optional[dist.ProcessGroup], num_experts: int, *, num_chunks: int = 1):
        self.group = ep_group
        self.ep_size = 1 if ep_group is None else group_size(ep_group)
        self.ep_rank = 0 if ep_group is None else group_rank(ep_group)
        check_int("num_experts", num_experts, minimum=1)
        if num_experts % self.ep_size != 0:
            raise ValueError(
                f"num_experts={num_experts} must be a multiple of the expert-parallel "
                f"group size {self.ep_size}"
            )
        check_int("num_chunks", num_chunks, minimum=1)
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size
        self.num_chunks = num_chunks
        self.dispatch_stats = ExchangeStats()
        self.combine_stats = ExchangeStats()

    # -- stats of the last dispatch
    @property
    def bytes_sent(self) -> int:
        return self.dispatch_stats.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.dispatch_stats.bytes_received

    @property
    def bytes_local(self) -> int:
        return self.dispatch_stats.bytes_local

    # -- planning (subclasses change how rows travel between two or more ranks)
    def _plans(self, send_QREl: Tensor, device: torch.device) -> List[_Plan]:
        """One plan per chunk. send_QREl: LongTensor[Q, R, E_l] (CPU), rows this rank sends per
        chunk, dst rank and local expert. A single rank keeps its rows (``_Keep``); otherwise
        ``_exchange_plans``."""
        if self.ep_size == 1:
            return [_Plan([_Keep()], send_REl.sum(0), int(send_REl.sum()), int(send_REl.sum()))
                    for send_REl in send_QREl]
        return self._exchange_plans(send_QREl, device)

    def _exchange_plans(self, send_QREl: Tensor, device: torch.device) -> List[_Plan]:
        """Exchange counts and build one plan per chunk (R >= 2).

        All chunks' counts travel in one exchange (on ``device``, the rows' device);
        permutation indices are put on ``device``.
        """
        assert self.group is not None, "ep_size > 1 comes from a process group"
        Q, R, El = send_QREl.shape
        recv_RQEl = exchange_equal(send_QREl.transpose(0, 1), self.group, device)  # [src, Q, E_l]
        plans = []
        for c in range(Q):
            send_REl, recv_REl = send_QREl[c], recv_RQEl[:, c]
            steps: List[_Step] = [_Exchange(self.group, recv_REl.sum(1).tolist(), send_REl.sum(1).tolist(),
                                            self.ep_rank)]
            if not is_identity(recv_REl.shape, (1, 0)):
                steps.append(Permute(block_permutation(recv_REl, (1, 0)).to(device)))
            plans.append(_Plan(steps, recv_REl.sum(0), int(send_REl.sum()), int(recv_REl.sum())))
        return plans

    def _check(self, rows: Tensor, tokens_per_expert: Tensor) -> Tensor:
        """Validate inputs; return the counts as a CPU LongTensor[E]."""
        if not isinstance(rows, Tensor) or rows.dim() < 1:
            raise ValueError(f"rows must be a Tensor [N, D], got {type(rows).__name__}")
        if tokens_per_expert.shape != (self.num_experts,) or tokens_per_expert.is_floating_point():
            raise ValueError(
                f"tokens_per_expert must be an integer tensor of shape ({self.num_experts},), got "
                f"{tuple(tokens_per_expert.shape)} {tokens_per_expert.dtype}"
            )
        counts = tokens_per_expert.detach().to("cpu", torch.long)
        if int(counts.sum()) != rows.shape[0] or bool((counts < 0).any()):
            raise ValueError(
                f"tokens_per_expert must be non-negative and sum to rows.shape[0]={rows.shape[0]}, "
                f"got sum {int(counts.sum())}"
            )
        return counts

    def _send_counts(self, counts_E: Tensor, num_chunks: int) -> Tensor:
        return split_counts(counts_E, num_chunks).T.reshape(num_chunks, self.ep_size, self.num_local_experts)

    # -- public API
    def dispatch(self, rows: Tensor, tokens_per_expert: Tensor) -> Tuple[Tensor, Tensor, DispatchContext]:
        """Send rows to their experts' ranks.

        rows[N, D]: expert-major over all E experts; tokens_per_expert: LongTensor[E].
        Returns ``(local_rows[N_l, D], local_counts LongTensor[E_l], ctx)``: the rows of
        this rank's E_l experts from every source rank, local-expert-major (local
        expert 0 from src 0, src 1, ..., then local expert 1, ...), and their counts.
        """
        counts = self._check(rows, tokens_per_expert)
        (plan,) = self._plans(self._send_counts(counts, 1), rows.device)
        ctx = DispatchContext(plan)
        local_rows = _run(plan.steps, rows, ctx.stats)
        self.dispatch_stats = ctx.stats
        return local_rows, plan.local_counts.to(tokens_per_expert.device), ctx

    def combine(self, out: Tensor, ctx: DispatchContext) -> Tensor:
        """Bring expert outputs back: out[N_l, D'] (ordered like ``local_rows``) ->
        rows_back[N, D'] in the order of the ``rows`` given to ``dispatch``."""
        if out.shape[0] != ctx.plan.num_local_rows:
            raise ValueError(
                f"combine: out must have the {ctx.plan.num_local_rows} rows dispatch returned, "
                f"got {out.shape[0]}"
            )
        stats = ExchangeStats()
        back = _run(ctx.plan.reversed_steps(), out, stats)
        self.combine_stats = stats
        return back

    def dispatch_compute_combine(self, rows: Tensor, tokens_per_expert: Tensor, expert_fn: ExpertFn) -> Tensor:
        """``combine(expert_fn(*dispatch(rows)))`` in ``num_chunks`` pipelined chunks.

        Each expert's rows are split into Q near-equal parts; chunk c holds part c
        of every expert. The exchange of chunk c+1 and the combine of chunk c run
        async while ``expert_fn(local_rows_c, local_counts_c)`` computes, so
        communication overlaps compute (on GPUs; on CPU it is simply correct).
        ``expert_fn`` must treat rows independently (true of expert FFNs); the
        result equals the unchunked path. Backward exchanges are not overlapped.
        """
        counts = self._check(rows, tokens_per_expert)
        Q = self.num_chunks
        parts_EQ = split_counts(counts, Q)
        plans = self._plans(parts_EQ.T.reshape(Q, self.ep_size, self.num_local_experts), rows.device)
        # Gather rows chunk-major: blocks (expert, chunk) -> (chunk, expert).
        to_chunks = Permute(block_permutation(parts_EQ, (1, 0)).to(rows.device))
        chunks = to_chunks.apply(rows).split(parts_EQ.sum(0).tolist())
        d_stats, c_stats = ExchangeStats(), ExchangeStats()
        device = tokens_per_expert.device
        outs: List[_InFlight] = []
        flight = _InFlight(plans[0].steps, chunks[0], d_stats)
        for c in range(Q):
            local_rows = flight.finish()
            if c + 1 < Q:
                flight = _InFlight(plans[c + 1].steps, chunks[c + 1], d_stats)
            y = expert_fn(local_rows, plans[c].local_counts.to(device))
            if y.shape[0] != local_rows.shape[0]:
                raise ValueError(f"expert_fn returned {y.shape[0]} rows for {local_rows.shape[0]}")
            outs.append(_InFlight(plans[c].reversed_steps(), y, c_stats))
        back = torch.cat([o.finish() for o in outs])
        self.dispatch_stats, self.combine_stats = d_stats, c_stats
        return to_chunks.reverse().apply(back)


# ----------------------------------------------------------------------------- multi-node


NodeGroups = Tuple[Optional[dist.ProcessGroup], Optional[dist.ProcessGroup]]  # (intra-node, inter-node)


def new_node_groups(ep_groups_ranks: Sequence[Sequence[int]], ranks_per_node: int, *,
                    timeout: Optional[timedelta] = None) -> NodeGroups:
    """Create the intra-node and inter-node groups of every ep group; return this rank's.

    ``ep_groups_ranks``: the global ranks of *every* ep group in the job (e.g.
    ``ParallelDims.group_ranks("ep")``), identical on all ranks; consecutive ep
    ranks ``[n*G, (n+1)*G)`` share node n. Must be called on every rank (torch's
    ``new_group`` rule); creates all groups in the same order everywhere. Returns
    ``(intra_group, inter_group)`` for the calling rank (``(None, None)`` if it is
    in no ep group). ``timeout``: the groups' collective timeout, the job's (``ProcessGroups.timeout``);
    None: torch's default.
    """
    me = dist.get_rank()
    mine: NodeGroups = (None, None)
    for ranks in ep_groups_ranks:
        ranks = list(ranks)
        if ranks_per_node < 1 or len(ranks) % ranks_per_node != 0:
            raise ValueError(
                f"ranks_per_node={ranks_per_node} must be positive and divide the ep group size {len(ranks)}"
            )
        G = ranks_per_node
        intra = [dist.new_group(ranks[n * G : (n + 1) * G], timeout=timeout) for n in range(len(ranks) // G)]
        inter = [dist.new_group(ranks[g::G], timeout=timeout) for g in range(G)]
        if me in ranks:
            i = ranks.index(me)
            mine = (intra[i // G], inter[i % G])
    return mine


class HierarchicalAllToAllDispatcher(AllToAllDispatcher):
    """Two-hop exchange for multi-node expert parallelism; same results as the flat one.

    The R = Nn * G ep ranks form Nn nodes of G consecutive ranks. Hop 1 (intra-node
    all-to-all): rank (n, g) hands each node peer (n, g') the rows bound for local
    index g' on *every* node. Hop 2 (inter-node all-to-all among ranks with the
    same local index): (n, g') sends each node n' the rows for (n', g'). Every
    rank thus talks to Nn - 1 remote peers with G-times larger messages instead
    of R - G small ones; the slow inter-node links see the same bytes. (A
    gather-to-one-leader variant moves the same data but funnels it through one
    rank per node; this spreads it over all G.)

    ``node_groups``: ``(intra_group, inter_group)`` from ``new_node_groups``; if
    omitted, ``ep_group`` must span the whole world and the groups are created
    here (so the constructor then has to run on every rank). A single rank
    (``ep_size == 1``) makes no hops and needs no node groups.
    """

    def __init__(self, ep_group: Optional[dist.ProcessGroup], num_experts: int, ranks_per_node: int, *,
                 num_chunks: int = 1, node_groups: Optional[NodeGroups] = None):
        super().__init__(ep_group, num_experts, num_chunks=num_chunks)
        check_int("ranks_per_node", ranks_per_node, minimum=1)
        if self.ep_size % ranks_per_node != 0:
            fail("ranks_per_node", ranks_per_node, f"it must divide the ep group size {self.ep_size}")
        self.ranks_per_node = ranks_per_node
        self.num_nodes = self.ep_size // ranks_per_node
        self.intra_group: Optional[dist.ProcessGroup] = None  # None on a single rank: no hops
        self.inter_group: Optional[dist.ProcessGroup] = None
        if self.ep_size == 1 or ep_group is None:
            return
        if node_groups is None:
            if self.ep_size != dist.get_world_size():
                raise ValueError(
                    "HierarchicalAllToAllDispatcher: ep_group is not the whole world, so pass "
                    "node_groups=new_node_groups(<every ep group's ranks>, ranks_per_node), called on all ranks"
                )
            node_groups = new_node_groups([dist.get_process_group_ranks(ep_group)], ranks_per_node)
        for name, group, size in (("intra", node_groups[0], ranks_per_node), ("inter", node_groups[1], self.num_nodes)):
            if group is None or group_size(group) != size:
                got = "no group" if group is None else f"a group of {group_size(group)} ranks"
                raise ValueError(f"node_groups: the {name}-node group is {got}, expected {size} ranks "
                                 "(moe.dispatch.new_node_groups)")
        self.intra_group, self.inter_group = node_groups

    def _exchange_plans(self, send_QREl: Tensor, device: torch.device) -> List[_Plan]:
        intra, inter = self.intra_group, self.inter_group
        assert intra is not None and inter is not None, "node groups are set whenever ep_size > 1"
        Q, R, El = send_QREl.shape
        Nn, G = self.num_nodes, self.ranks_per_node
        send = send_QREl.view(Q, Nn, G, El)  # [Q, dst node, dst local, E_l]
        # Counts follow the rows' two hops (all chunks at once); a hop within one rank moves nothing.
        recv1 = send.permute(2, 0, 1, 3)  # [src local, Q, dst node, E_l]
        if G > 1:
            recv1 = exchange_equal(recv1, intra, device)
        recv2 = recv1.permute(2, 1, 0, 3)  # [src node, Q, src local, E_l]
        if Nn > 1:
            recv2 = exchange_equal(recv2, inter, device)
        intra_me, inter_me = group_rank(intra), group_rank(inter)
        plans = []
        for c in range(Q):
            s, r1, r2 = send[c], recv1[:, c], recv2[:, c]  # [Nn, G, E_l], [G, Nn, E_l], [Nn, G, E_l]
            steps: List[_Step] = []
            if not is_identity(s.shape, (1, 0, 2)):
                steps.append(Permute(block_permutation(s, (1, 0, 2)).to(device)))  # -> [dst local, dst node, E_l]
            if G > 1:
                steps.append(_Exchange(intra, r1.sum((1, 2)).tolist(), s.sum((0, 2)).tolist(), intra_me))
            if not is_identity(r1.shape, (1, 0, 2)):
                steps.append(Permute(block_permutation(r1, (1, 0, 2)).to(device)))  # -> [dst node, src local, E_l]
            if Nn > 1:
                steps.append(_Exchange(inter, r2.sum((1, 2)).tolist(), r1.sum((0, 2)).tolist(), inter_me))
            r2_REl = r2.reshape(R, El)  # [src ep rank, E_l]
            if not is_identity(r2_REl.shape, (1, 0)):
                steps.append(Permute(block_permutation(r2_REl, (1, 0)).to(device)))
            plans.append(_Plan(steps, r2_REl.sum(0), int(s.sum()), int(r2.sum())))
        return plans


def world_node_groups(ep_group: dist.ProcessGroup, ranks_per_node: int, *,
                      timeout: Optional[timedelta] = None) -> NodeGroups:
    """``new_node_groups`` for every ep group of the job, learnt from ``ep_group`` alone.

    Each rank all-gathers its ep group's ranks over the default (world) group, so the
    call is collective: every rank of the world makes it, in the same order (once per
    model, not per layer). Returns this rank's ``(intra_group, inter_group)``, created
    with the collective ``timeout`` (None: torch's default).
    """
    everyone = all_gather_objects(list(dist.get_process_group_ranks(ep_group)))
    return new_node_groups(sorted({tuple(r) for r in everyone}), ranks_per_node, timeout=timeout)


def build_dispatcher(ep_group: Optional[dist.ProcessGroup], config: MoEConfig, *,
                     node_groups: Optional[NodeGroups] = None) -> AllToAllDispatcher:
    """The dispatcher ``config`` (a ``moe.MoEConfig``) asks for on ``ep_group``.

    ``config.dispatcher``: "flat" -> ``AllToAllDispatcher``; "hierarchical" ->
    ``HierarchicalAllToAllDispatcher`` with ``config.node_size`` ranks per node and
    ``node_groups`` (from ``world_node_groups``; None only when ep_group is the
    world). ``config.overlap_chunks`` is the chunk count of the overlapped exchange.
    """
    if config.dispatcher == "hierarchical":
        if config.node_size is None:  # MoEConfig refuses it; a config changed after its check
            fail("node_size", None, "set it (ep ranks per node, dividing the ep size) when dispatcher='hierarchical'")
        return HierarchicalAllToAllDispatcher(ep_group, config.num_experts, config.node_size,
                                              num_chunks=config.overlap_chunks, node_groups=node_groups)
    return AllToAllDispatcher(ep_group, config.num_experts, num_chunks=config.overlap_chunks)
