"""``MoELayer``: route -> permute -> [dispatch] -> experts -> [combine exchange] -> unpermute (combine).

Legend: T tokens, k choices, E experts (global), E_l experts on this rank, D width.

``y, aux = layer(x, modality=None)`` for x[..., D]. ``aux`` maps each configured
balancing loss to its value with the coefficient applied (add them to the training
loss). The layer keeps its last step's statistics in ``layer.last_stats``; nothing
is accumulated in module globals.

Capacity is per rank: T is the number of tokens this rank's router sees.

Process groups come in one ``MoEGroups`` (``MoEGroups.from_process_groups(groups)`` from a
``parallel.ProcessGroups``; ``MoELayer(cfg, ep_group=g)`` is short for ``groups=MoEGroups(ep_group=g)``).

Tensor parallelism (``tp_group`` of R ranks): x (and modality) is the same on every
rank of the group, and so are y and aux. Every tp rank routes all T tokens (the
router is replicated: identical choices, capacity, drops and aux losses), then
computes the experts only for its piece of the tokens, rows
``parallel.comm.bounds(T, R, r)`` (``comm.split`` of x and ``Routing.token_piece``:
permute -> [ep dispatch] -> [etp] experts -> [combine] -> unpermute), and
``comm.gather``s the outputs back to [T, D]: each (token, expert) pair is computed
once per tp group. The shared expert and the residual coefficient run on the full x.
Statistics (``last_stats``, the expert-bias load) are those of the full routing, the
same on every tp rank. Random routing draws (Switch jitter, GShard's random 2nd
choice, noisy top-k) must be the same on every tp rank: the same generator state.

Expert tensor parallelism (``etp_group`` of R ranks, holding the same experts): each
expert's hidden units are split over the group (``Experts(etp_rank, etp_size)``);
after the ep dispatch the rows are all-gathered over etp, each rank computes its
units for all of them and the partial outputs are summed back on the rows' owner
(``moe.expert_tp.etp_compute``).

``torch.compile(layer, fullgraph=True)`` traces the forward when a capacity is set
(without expert or tensor parallelism): expert buffers are then padded to the capacity, so
every shape is static, and the host-side checks (non-finite logits, modality id
range) are skipped inside the graph. Dropless routing has data-dependent shapes.
``MoEConfig.pad_to_capacity`` asks for the padded layout in eager mode too (same
output; under expert parallelism the padding rows travel as well).

The expert path (``MoELayer._expert_path``, the one place it is chosen, per forward): ``padded``
(above), ``fused`` (below) or ``grouped`` (permute -> ``Experts`` -> unpermute, unpadded).
Fused path: when the experts' op backend has the token-level fused expert MLP (the C++
backend on CPU: ``moe::expert_mlp_tokens``) and the layer has no expert or expert-tensor
parallelism and no padded layout, permute -> experts -> combine run as that one op: each
expert's rows are read from x in place and combined with the routing weights inside it, so
no [N, D] copy (permuted input, expert output) is kept for the backward. Same numbers as
the permute -> ``Experts`` -> unpermute path (fp32 rounding), which the torch backend runs.

Activation checkpointing (``layer.recompute``, or a checkpointed transformer block; see
``moe.recompute``): ``_compute`` (route -> ... -> combine, aux losses) runs again in the
backward. Its routing is recorded in the forward and replayed there (``Router.route_on_tape``:
the same generator and RNG states and expert bias, decisions checked), and the side effects
(expert-bias load and update, ``last_routing``, byte counts, ``Experts.last_rows``) are those
of the forward alone.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from parallel import comm
from parallel.dims import ProcessGroups
from parallel.grads import mark_expert_params
from parallel.precision import compute_dtype

from . import losses, recompute
from .config import MoEConfig
from .dispatch import AllToAllDispatcher, NodeGroups, build_dispatcher
from .expert_tp import etp_compute
from .experts import Experts
from .ops.registry import TokenExpertOps
from .permute import PermutePlan, make_plan, permute, unpermute
from .router import Router
from .routing import validate_modality
from .routing_types import Routing

__all__ = ["MoELayer", "MoEGroups"]

@dataclass(frozen=True)
class MoEGroups:
    """The process groups an ``MoELayer`` talks over; None: not split that way.

    ``ep_group``: the ranks the experts are split over (E divisible by its size); tokens
    travel by all-to-all. ``dp_group``: the ranks that hold replicas of the router and see
    other tokens; the aux-loss-free expert-bias update sums the load over it (None: the
    ``ep_group``; under tensor parallelism pass the data-parallel group: tp ranks hold the
    same tokens, so their loads must not be summed). ``tp_group``: the tensor-parallel ranks
    holding the same tokens. ``etp_group``: the expert-tensor-parallel ranks holding pieces of
    the same experts (``MoEConfig.d_ffn`` divisible by its size). ``node_groups``: the
    (intra-node, inter-node) groups of the hierarchical dispatcher
    (``moe.dispatch.world_node_groups``).
    """

    ep_group: Optional[dist.ProcessGroup] = None
    dp_group: Optional[dist.ProcessGroup] = None
    tp_group: Optional[dist.ProcessGroup] = None
    etp_group: Optional[dist.ProcessGroup] = None
    node_groups: Optional[NodeGroups] = None

    @classmethod
    def from_process_groups(cls, groups: Optional[ProcessGroups], *,
                            node_groups: Optional[NodeGroups] = None) -> "MoEGroups":
        """This rank's ep / dp / tp / etp groups of a ``parallel.ProcessGroups`` (None: a single process)."""
        if groups is None:
            return cls(node_groups=node_groups)
        return cls(ep_group=groups.ep_group, dp_group=groups.dp_group, tp_group=groups.tp_group,
                   etp_group=groups.etp_group, node_groups=node_groups)


def _size(group: Optional[dist.ProcessGroup]) -> int:
    return dist.get_world_size(group) if group is not None else 1


def _rank(group: Optional[dist.ProcessGroup]) -> int:
    return dist.get_rank(group) if group is not None else 0


@dataclass(frozen=True)
class _ExpertPath:
    """How one forward's tokens reach the experts (chosen by ``MoELayer._expert_path``).

    ``fused``: one token-level op (``token_ops.expert_mlp_tokens``) does permute -> experts ->
    combine; ``padded``: permute into expert buffers padded to the capacity; ``grouped``:
    permute into unpadded expert-major rows.
    """

    kind: str
    token_ops: Optional[TokenExpertOps] = None  # the op set of the fused path (``Experts.token_ops``)


class MoELayer(nn.Module):
    """A Mixture-of-Experts FFN block (without the residual connection around it).

    ``groups``: the process groups (``MoEGroups``; default: none, a single process);
    ``ep_group``: shorthand for ``groups=MoEGroups(ep_group=...)``. ``dispatcher``: a ready
    ``moe.dispatch.AllToAllDispatcher`` (or ``HierarchicalAllToAllDispatcher``) for the ep
    group, to choose chunked overlap (``num_chunks > 1``) or the two-hop multi-node exchange;
    by default one is built as ``MoEConfig.dispatcher`` / ``node_size`` / ``overlap_chunks``
    say (``moe.dispatch.build_dispatcher``, with ``groups.node_groups`` for the hierarchical one).
    """

    def __init__(self, config: MoEConfig, *, groups: Optional[MoEGroups] = None,
                 ep_group: Optional[dist.ProcessGroup] = None, dispatcher: Optional[AllToAllDispatcher] = None,
                 name: str = "moe", dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        self.config, self.name = config, name
        self.groups = groups = self._resolve_groups(groups, ep_group, dispatcher)
        self.ep_size, self.tp_size, self.etp_size = _size(groups.ep_group), _size(groups.tp_group), _size(groups.etp_group)
        if config.num_experts % self.ep_size:
            raise ValueError(f"MoEConfig.num_experts={config.num_experts} is not divisible by the "
                             f"expert-parallel size {self.ep_size}; it must be a multiple of it")
        if config.d_ffn % self.etp_size:
            raise ValueError(f"MoEConfig.d_ffn={config.d_ffn} is not divisible by the expert-tensor-parallel "
                             f"size etp={self.etp_size}; it must be a multiple of it")
        self.num_local_experts = config.num_experts // self.ep_size
        self.router = Router(config, name=name, dtype=dtype, device=device)
        self.experts = Experts(self.num_local_experts, config.d_model, config.d_ffn, config.activation,
                               first_expert=_rank(groups.ep_group) * self.num_local_experts, bias=config.bias,
                               init_std=config.init_std, etp_rank=_rank(groups.etp_group), etp_size=self.etp_size,
                               dtype=dtype, device=device)
        mark_expert_params(self.experts, self.ep_size)
        self.dispatcher = dispatcher
        if dispatcher is None and groups.ep_group is not None:
            self.dispatcher = build_dispatcher(groups.ep_group, config, node_groups=groups.node_groups)
        self.shared = (Experts(1, config.d_model, config.shared_expert_ffn, config.activation, bias=config.bias,
                               init_std=config.init_std, dtype=dtype, device=device)
                       if config.shared_expert_ffn else None)
        for experts in (self.experts, self.shared):  # their fused expert MLP follows the layer's op backend
            if experts is not None:
                experts.backend = config.backend
        self.residual_coef = (nn.Linear(config.d_model, 2, dtype=dtype, device=device)
                              if config.residual_moe else None)
        # The token-level fused op needs the experts' rows on this rank, whole: no ep exchange, no etp gather.
        self._can_fuse = self.dispatcher is None and self.etp_size == 1
        self.last_routing: Optional[Routing] = None
        self._last_bytes = (0, 0)
        # Expert-bias policy: the load of the training forwards since the last update. With
        # ``defer_expert_bias_update`` False (library use) every forward updates the bias; a
        # trainer sets it True and calls ``apply_expert_bias_update()`` once per optimizer step,
        # so the update sees the load of the whole global batch (all micro-batches, all dp ranks).
        self.defer_expert_bias_update = False
        self._pending_load: Optional[torch.Tensor] = None
        # Activation checkpointing of this layer ('moe' mode, set by moe.models.activation_checkpointing):
        # route, dispatch, experts and combine run again in the backward, replaying the routing of the forward.
        self.recompute = False

    def _resolve_groups(self, groups: Optional[MoEGroups], ep_group: Optional[dist.ProcessGroup],
                        dispatcher: Optional[AllToAllDispatcher]) -> MoEGroups:
        """``groups`` (or ``MoEGroups(ep_group=ep_group)``) with the dispatcher's ep group and the
        dp group's default (the ep group) filled in."""
        if groups is not None and ep_group is not None:
            raise ValueError(f"{self.name}: pass ep_group either alone or inside groups=MoEGroups(...), not both")
        if groups is None:
            groups = MoEGroups(ep_group=ep_group)
        elif not isinstance(groups, MoEGroups):
            raise TypeError(f"{self.name}: groups must be a moe.MoEGroups (MoEGroups.from_process_groups for a "
                            f"parallel.ProcessGroups), got {type(groups).__name__}")
        ep = groups.ep_group
        if dispatcher is not None:
            if ep is not None and dispatcher.group is not ep:
                raise ValueError(f"{self.name}: dispatcher was built for another process group than ep_group")
            if dispatcher.num_experts != self.config.num_experts:
                raise ValueError(f"{self.name}: dispatcher has num_experts={dispatcher.num_experts}, "
                                 f"the layer MoEConfig.num_experts={self.config.num_experts}; they must match")
            ep = dispatcher.group
        return MoEGroups(ep_group=ep, dp_group=groups.dp_group if groups.dp_group is not None else ep,
                         tp_group=groups.tp_group, etp_group=groups.etp_group, node_groups=groups.node_groups)

    # ---------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, modality: Optional[torch.Tensor] = None, *,
                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """x[..., D] (modality[...] ids) -> (y[..., D], {loss name: coefficient * loss})."""
        modality_T = self._check_input(x, modality)
        x_TD = x.reshape(-1, self.config.d_model)
        seq_len = x.shape[-2] if x.dim() >= 3 else None
        tape = recompute.current_tape()
        if self.recompute and tape is None:  # activation checkpointing 'moe' (moe.recompute)
            y_TD, aux, routing = recompute.checkpoint(self._compute, x_TD, modality_T, generator, seq_len)
        else:
            y_TD, aux, routing = self._compute(x_TD, modality_T, generator, seq_len)
        if tape is None or not tape.replaying:  # a recompute of a checkpointed block has no side effects
            self._after_forward(routing)
        return y_TD.view(x.shape), aux

    def _compute(self, x_TD: torch.Tensor, modality_T: Optional[torch.Tensor],
                 generator: Optional[torch.Generator], seq_len: Optional[int]
                 ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], Routing]:
        """Route -> the routed experts -> (+ shared expert), and the aux losses: (y[T, D], aux, routing).
        What activation checkpointing runs again; in such a recompute the routing is replayed and the
        statistics the latest forward left are kept."""
        cfg = self.config
        tape = recompute.current_tape()
        with self._statistics_kept(tape is not None and tape.replaying):
            routing = self._route(x_TD, modality_T, generator, tape)
            y_TD = self._add_shared_expert(x_TD, self._routed_experts(x_TD, routing))
            aux = losses.aux_losses(routing, cfg.aux_losses, num_modalities=cfg.num_modalities,
                                    min_experts=cfg.limoe_min_experts, seq_len=seq_len)
        return y_TD, aux, routing

    def _route(self, x_TD: torch.Tensor, modality_T: Optional[torch.Tensor],
               generator: Optional[torch.Generator], tape: Optional[recompute.Tape]) -> Routing:
        """The router; inside a checkpointed region recorded by the forward and replayed by the recompute."""
        if tape is None:
            return self.router(x_TD, modality_T, generator=generator)
        return self.router.route_on_tape(tape, x_TD, modality_T, generator=generator)

    def _routed_experts(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        """permute -> [dispatch] -> experts -> [combine exchange] -> unpermute: y[T, D] of the routed experts.
        Under tp this rank computes its piece of the tokens (x and routing pieces) and gathers y."""
        tp_group, backend = self.groups.tp_group, self.config.backend
        mine = routing.token_piece(tp_group)
        x_mine = comm.split(x_TD, 0, tp_group)
        path = self._expert_path(routing, x_mine)
        if path.kind == "fused":  # permute -> experts -> combine in one op, no [N, D] copies (moe::expert_mlp_tokens)
            assert path.token_ops is not None  # _expert_path: the fused path carries its op set
            plan = make_plan(mine, backend=backend)
            y_mine = self.experts.forward_tokens(path.token_ops, x_mine, plan.dest, mine.weights, plan.rows_per_expert)
        else:
            rows, plan = permute(x_mine, mine, pad_to_capacity=path.kind == "padded", backend=backend)  # permute
            out_rows = self._dispatch_experts(rows, plan)  # [dispatch] -> experts -> [combine exchange]
            y_mine = unpermute(out_rows, plan, mine)  # combine: weighted sum back into token order
        return comm.gather(y_mine, 0, tp_group, total=x_TD.shape[0])

    def _expert_path(self, routing: Routing, x_mine: torch.Tensor) -> _ExpertPath:
        """The one place the expert path is chosen: ``padded`` when a capacity is set and padding is
        asked for (``MoEConfig.pad_to_capacity``) or needed (static shapes under torch.compile);
        else ``fused`` when nothing needs the permuted rows (``self._can_fuse``) and the experts' op
        backend has the token-level fused MLP for x; else ``grouped``."""
        if routing.capacity is not None and (self.config.pad_to_capacity or torch.compiler.is_compiling()):
            return _ExpertPath("padded")
        ops = self.experts.token_ops(x_mine) if self._can_fuse else None
        return _ExpertPath("grouped") if ops is None else _ExpertPath("fused", ops)

    def _dispatch_experts(self, rows: torch.Tensor, plan: PermutePlan) -> torch.Tensor:
        """[ep dispatch] -> local experts -> [ep combine exchange]: permuted rows[N, D] -> outputs[N, D]."""
        if self.dispatcher is None:
            return self._experts(rows, plan.rows_per_expert, plan.padded_capacity)
        return self._exchange(self.dispatcher, rows, plan.rows_per_expert)

    def _exchange(self, dispatcher: AllToAllDispatcher, rows: torch.Tensor,
                  rows_per_expert: torch.Tensor) -> torch.Tensor:
        """The rows to the ranks holding their experts (all-to-all by ``dispatcher``), computed there, and back."""
        dtype = compute_dtype(rows)
        if dtype != rows.dtype and self.etp_size == 1:
            # mixed precision: the experts compute in the autocast dtype anyway, so the all-to-alls can move
            # rows (and, backward, their gradients) in it: half the bytes, the same numbers (the casts are
            # exact where they move; under etp the partial outputs are summed in fp32, so not there)
            return self._exchange(dispatcher, rows.to(dtype), rows_per_expert).to(rows.dtype)
        if dispatcher.num_chunks > 1:  # exchange of chunk c+1 overlaps compute of chunk c
            return dispatcher.dispatch_compute_combine(rows, rows_per_expert, self._experts)
        local_rows, local_counts, ctx = dispatcher.dispatch(rows, rows_per_expert)
        return dispatcher.combine(self._experts(local_rows, local_counts), ctx)

    def _experts(self, rows: torch.Tensor, counts: torch.Tensor,
                 padded_capacity: Optional[int] = None) -> torch.Tensor:
        """The local experts on rows[N, D] (expert-major by counts[E_l]); over etp when split."""
        if self.etp_size > 1:
            return etp_compute(self.experts, rows, counts, self.groups.etp_group, padded_capacity=padded_capacity)
        return self.experts(rows, counts, padded_capacity=padded_capacity)

    def _add_shared_expert(self, x_TD: torch.Tensor, y_TD: torch.Tensor) -> torch.Tensor:
        """y + the shared expert on the full x (mixed by the residual coefficient when configured)."""
        if self.shared is None:
            return y_TD
        dense = self.shared.expert_mlp(0, x_TD)
        if self.residual_coef is not None:
            coef = torch.softmax(self.residual_coef(x_TD).float(), dim=-1).to(x_TD.dtype)
            return y_TD * coef[:, :1] + dense * coef[:, 1:]
        return y_TD + dense

    @contextlib.contextmanager
    def _statistics_kept(self, keep: bool) -> Iterator[None]:
        """With ``keep`` (a recompute), ``Experts.last_rows`` and the dispatcher's statistics stay as the
        latest forward set them (under pipelining other micro-batches ran in between)."""
        if not keep:
            yield
            return
        d = self.dispatcher
        last_rows = self.experts.last_rows
        stats = None if d is None else (d.dispatch_stats, d.combine_stats)
        try:
            yield
        finally:
            self.experts.last_rows = last_rows
            if d is not None and stats is not None:
                d.dispatch_stats, d.combine_stats = stats

    def _after_forward(self, routing: Routing) -> None:
        """The side effects of a forward (never of its recompute): the expert-bias load (and, not
        deferred, the update), ``last_routing`` and the exchange byte counts."""
        cfg = self.config
        if self.training and cfg.router.policy == "expert_bias" and not routing.skipped:
            load = torch.bincount(routing.experts.reshape(-1), minlength=cfg.num_experts)
            self._pending_load = load if self._pending_load is None else self._pending_load + load
            if not self.defer_expert_bias_update:
                self.apply_expert_bias_update()
        self.last_routing = routing
        if self.dispatcher is not None:
            self._last_bytes = (self.dispatcher.bytes_sent, self.dispatcher.bytes_received)

    def _check_input(self, x: torch.Tensor, modality: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """x must be floating [..., D]; modality (ids in range) x.shape[:-1]: returned flat as [T] longs."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.name}: x must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"{self.name}: x has dtype {x.dtype}; it must be a floating-point tensor")
        if x.dim() < 1 or x.shape[-1] != self.config.d_model:
            raise ValueError(f"{self.name}: x has shape {tuple(x.shape)}; its last dimension must be "
                             f"d_model={self.config.d_model}")
        if modality is None:
            return None
        if not isinstance(modality, torch.Tensor) or tuple(modality.shape) != tuple(x.shape[:-1]):
            got = tuple(modality.shape) if isinstance(modality, torch.Tensor) else type(modality).__name__
            raise ValueError(f"{self.name}: modality has shape {got}; it must be x.shape[:-1] = {tuple(x.shape[:-1])}")
        flat = modality.reshape(-1)
        validate_modality(flat, flat.shape[0], self.config.num_modalities)
        return flat.long()

    # ---------------------------------------------------------------------------------- expert bias, statistics
    def discard_expert_bias_update(self) -> None:
        """Forget the load summed since the last update (a skipped optimizer step: fp16 overflow)."""
        self._pending_load = None

    def apply_expert_bias_update(self) -> None:
        """Update the expert bias from the load summed since the last update, over ``groups.dp_group``.

        Collective over ``groups.dp_group`` when the policy is ``expert_bias``: every replica calls it,
        also one that routed nothing since the last update. A no-op for other policies.
        """
        if self.config.router.policy != "expert_bias":
            return
        load = self._pending_load
        if load is None:
            load = torch.zeros(self.config.num_experts, dtype=torch.long, device=self.router.weight.device)
        dp_group = self.groups.dp_group
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(load, group=dp_group)
        self._pending_load = None
        self.router.update_expert_bias(load)  # a zero load changes nothing: sign(0 - 0) = 0

    @property
    def last_stats(self) -> Dict[str, object]:
        """Statistics of the last forward, computed when read (no host sync per step).

        tokens_per_expert LongTensor[E] (kept, this rank's routing: under tp all T tokens,
        the same on every tp rank), dropped_fraction, zero_weight_fraction (kept assignments
        whose combine weight is below ``moe.routing_types.ZERO_WEIGHT``: computed, yet adding
        ~nothing to y), router_entropy (mean per-token entropy of the router distribution),
        capacity, skipped, expert_rows (rows this rank's experts
        computed: after the ep dispatch and, under etp, the etp gather; padding rows
        included), tokens_per_expert_by_modality LongTensor[M, E] when a modality was given,
        bytes_sent / bytes_received under expert parallelism. Empty before the first call.
        """
        return {} if self.last_routing is None else self._stats(self.last_routing)

    @torch.no_grad()
    def _stats(self, routing: Routing) -> Dict[str, object]:
        stats: Dict[str, object] = {
            "tokens_per_expert": routing.tokens_per_expert.detach().cpu(),
            "dropped_fraction": routing.dropped_fraction(),
            "zero_weight_fraction": routing.zero_weight_fraction(),
            "router_entropy": float(routing.entropy()),
            "capacity": routing.capacity,
            "skipped": routing.skipped,
            "expert_rows": self.experts.last_rows,
        }
        by_modality = routing.tokens_by_modality(self.config.num_modalities)
        if by_modality is not None:
            stats["tokens_per_expert_by_modality"] = by_modality.cpu()
        if self.dispatcher is not None:
            stats["bytes_sent"], stats["bytes_received"] = self._last_bytes
        return stats

    def extra_repr(self) -> str:
        rc = self.config.router
        return (f"name={self.name}, d_model={self.config.d_model}, d_ffn={self.config.d_ffn}, "
                f"experts={self.config.num_experts} ({self.num_local_experts} local), tp={self.tp_size}, "
                f"etp={self.etp_size}, policy={rc.policy}, "
                f"k={rc.top_k}, capacity_factor={rc.capacity_factor}, drop_policy={rc.drop_policy}")
