"""ZeRO stages 2 and 3 on FSDP2 (``torch.distributed.fsdp.fully_shard``), composed with expert parallelism.

Legend: dp data-parallel size (= world here: no tp, no pp), ep expert-parallel size,
edp = dp / ep the expert-data-parallel size (ranks holding the same experts).

How the model is cut (bottom-up, one ``fully_shard`` call per unit): the model says which
modules are units in its ``parallel.sharding.ShardingPlan`` (``moe.models.sharding.sharding_plan``
for this project's models); the engine imports no model class.

- every expert unit (``plan.experts``: each expert-parallel ``moe.experts.Experts``, its stacked
  w1 / w2 / b1 / b2) over a 1-D mesh of this rank's **edp** group: each edp rank keeps a dim-0
  slice of the rank's E_l experts (whole experts: a slice of the expert dimension);
- every block unit (``plan.blocks``: each transformer ``Block``: attention, norms, router,
  dense MLP, shared experts) over a 1-D mesh of the **dp** group; a model that runs its blocks
  piecewise instead of through ``Block.forward`` (LIMoE: ``attend`` twice, then
  ``feed_forward``) lists none, and its blocks' dense parameters join the root unit;
- the root model (embeddings, final norm, head, anything left) over the dp mesh.
  0-d parameters (LIMoE's logit scale), which ``fully_shard`` cannot split, stay
  replicated: their gradient is averaged over dp by ``parallel.grads`` and counted once
  in the norm.

Parameters become ``DTensor`` s sharded on dim 0 (their local shard is what this rank
keeps), gradients after backward are the reduce-scattered shards, and the optimizer
``make_optimizer(model)`` builds from them (the trainer's: ``moe.trainer.optim.build_optimizer``'s
AdamW, the same groups, decay on matrices only) holds state shaped like those shards. Stage 2
keeps a unit's gathered parameters from its forward until its backward (``reshard_after_forward=False``);
stage 3 frees them after the forward and gathers them again in the backward
(``True``). FSDP re-gathers parameters per unit before its forward: the expert
all-to-all of ``moe.MoELayer`` runs inside the block's forward, between the
all-gathers, as in the replicated engine.

Gradients: every unit reduce-scatters with a SUM and divides by dp
(``set_gradient_divide_factor(dp)`` with ``set_force_sum_reduction_for_comms(True)``:
gloo has no pre-multiplied sum; on a 1-rank mesh, edp = 1, without it: torch 2.13 would
divide by dp twice there). Dense gradients are thus averaged over dp; an
expert gradient, which already sums the contributions of the ep group's tokens
(the all-to-all backward brings them home), is summed over edp and divided by dp,
the rule of ``parallel.grads.allreduce_gradients``. Each micro-batch's backward
reduce-scatters into the sharded gradient (accumulated there), so a rank never
holds more than its shard of the gradient between micro-batches.

The trainer and the tasks enter the model through ``run_pieces`` (and LIMoE's
``encode_*``), not ``forward``: those methods (``plan.entry_methods``) run FSDP's root
pre/post-forward hooks (``_enter``), once per outermost call.

Mixed precision (``train.precision`` bf16 / fp16, ``parallel.precision``): every unit but the
routers gathers its parameters in the compute dtype and reduce-scatters gradients in fp32
(``MixedPrecisionPolicy(param_dtype, reduce_dtype=fp32, cast_forward_inputs=False)``: the
residual stream stays in the dtype autocast leaves it in, fp32); the sharded parameters, the
gradients and AdamW's state stay fp32. Each router is a unit of its own with the default
(fp32) policy (``plan.fp32_units``), so the router computes from fp32 weights, as in every other
engine.

Parameters created by ``fully_shard`` are new ``nn.Parameter`` objects: the expert
markers of ``parallel.grads`` (``allreduce``, ``group_name``) are set on them again.
Checkpoints (``moe.trainer.checkpoint``) declare dense DTensors at their global
shape and split the expert shards per GLOBAL expert index, so they load at any zero
stage and any ep size.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .checks import check_int
from .dims import ProcessGroups
from .engine import LossEngine, LossFn, MakeOptimizer
from .grads import allreduce_gradients, is_expert_param, mark_expert_params, sync_replicas
from .precision import FP32, Precision
from .sharding import ShardingPlan

__all__ = ["FSDP2Engine"]


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view of its storage), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _enter(model: nn.Module, name: str) -> None:
    """Make ``model.<name>`` run FSDP's pre/post-forward hooks of the root like ``forward`` does (the
    outermost call only: a ``forward`` that calls ``run_pieces`` runs them once). ``model``: the root
    after ``fully_shard`` (its class is then both the model's and ``FSDPModule``)."""
    if not isinstance(model, FSDPModule):
        raise TypeError(f"FSDP2Engine: entry method {name!r}: the root {type(model).__name__} is not a fully_shard "
                        "unit")
    method = getattr(model, name)
    state = model._get_fsdp_state()
    depth = [0]

    @functools.wraps(method)
    def entry(*args: Any, **kwargs: Any) -> Any:
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

        if depth[0] or state._training_state == TrainingState.FORWARD:  # already inside the root's forward
            return method(*args, **kwargs)
        depth[0] += 1
        try:
            args, kwargs = state._pre_forward(model, args, kwargs)
            return state._post_forward(model, args, method(*args, **kwargs))
        finally:
            depth[0] -= 1

    setattr(model, name, entry)


class FSDP2Engine(LossEngine):
    """ZeRO stage 2 or 3 of ``model`` on FSDP2 (see the module doc).

    ``groups``: the rank's ``parallel.ProcessGroups`` (tp = pp = etp = 1); ``make_optimizer``:
    builds the optimizer of the sharded model's parameters; ``plan``: the model's FSDP units and
    entry methods; ``num_micro``: micro-batches per step.
    """

    def __init__(self, model: nn.Module, groups: ProcessGroups, make_optimizer: MakeOptimizer, plan: ShardingPlan,
                 *, stage: int, num_micro: int, device: torch.device | str, precision: Precision = FP32):
        if stage not in (2, 3):
            raise ValueError(f"parallel.zero_stage={stage}: the FSDP2 engine runs stages 2 and 3 "
                             "(stage 1 runs on zero_engine 'deepspeed')")
        check_int("num_micro", num_micro, minimum=1)
        dims = groups.dims
        for key in ("tp", "etp", "pp"):
            if getattr(dims, key) > 1:
                raise ValueError(f"parallel.{key}={getattr(dims, key)}: the FSDP2 engine needs {key}=1 "
                                 "(tensor and pipeline parallelism run with zero_stage 0, or zero 1-2 on deepspeed)")
        self.model, self.groups, self.stage, self.num_micro = model, groups, stage, num_micro
        self.precision = precision
        device_type = torch.device(device).type
        sync_replicas(model, groups)  # every replica shards the same tensors
        reshard = stage == 3
        # bf16/fp16: parameters gathered in the compute dtype, gradients reduced (and kept) in fp32
        mp = MixedPrecisionPolicy()
        if precision.mixed:
            mp = MixedPrecisionPolicy(param_dtype=precision.dtype, reduce_dtype=torch.float32,
                                      cast_forward_inputs=False)
        dp_mesh = DeviceMesh.from_group(groups.dp_group, device_type)
        edp_mesh = DeviceMesh.from_group(groups.edp_group, device_type)
        experts, blocks = list(plan.experts), list(plan.blocks)
        routers = list(plan.fp32_units) if precision.mixed else []
        units: List[FSDPModule] = []
        for m in experts:
            units.append(fully_shard(m, mesh=edp_mesh, reshard_after_forward=reshard, mp_policy=mp))
        for m in routers:  # the router stays fp32 under every precision (parallel.precision)
            units.append(fully_shard(m, mesh=dp_mesh, reshard_after_forward=reshard))
        for m in blocks:
            units.append(fully_shard(m, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp))
        # fully_shard cannot split 0-d parameters (LIMoE's logit scale): they stay replicated, with
        # their gradient averaged over dp here (parallel.grads) and their state on every rank
        self.replicated = [p for p in model.parameters() if p.dim() == 0 and p.requires_grad]
        if any(is_expert_param(p) for p in self.replicated):
            raise ValueError("FSDP2Engine: an expert parameter is 0-d; experts are stacked [E_l, ...] tensors")
        units.append(fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp,
                                 ignored_params=set(self.replicated) or None))
        self.units = units
        for m in experts:  # fully_shard made new Parameters: mark them again
            mark_expert_params(m, dims.ep)
        for unit, mesh in zip(units, [edp_mesh] * len(experts) + [dp_mesh] * (len(units) - len(experts))):
            unit.set_gradient_divide_factor(float(dims.dp))
            # gloo has no pre-multiplied sum: force SUM then divide. Not on a 1-rank mesh (edp = 1): torch
            # 2.13 then divides the local copy by the factor AND post-divides it again (factor squared)
            unit.set_force_sum_reduction_for_comms(mesh.size() > 1)
            unit.set_reduce_scatter_unused_params(True, recurse=False)
        for name in plan.entry_methods:
            _enter(model, name)
        self.optimizer = make_optimizer(model)

    # ---- the verbs ----------------------------------------------------------------------
    def forward_backward(self, num_micro: int, loss_fn: LossFn) -> List[Dict[str, float]]:
        logs = self.accumulate(num_micro, loss_fn)  # each backward reduce-scatters into the sharded gradients
        allreduce_gradients(self.replicated, self.groups)
        return logs

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: Optional[float]) -> float:
        """The global gradient norm from the local gradient shards (dense shards differ over dp, expert
        shards over edp and ep), then every shard scaled when it exceeds ``max_norm``."""
        dense = torch.zeros((), dtype=torch.float64)
        expert = torch.zeros((), dtype=torch.float64)
        replicated = torch.zeros((), dtype=torch.float64)  # equal on every rank: counted once
        grads, alike = [], {id(p) for p in self.replicated}
        for p in self.model.parameters():
            if p.grad is None:
                continue
            g = _local(p.grad)
            grads.append(g)
            square = g.detach().double().pow(2).sum().cpu()
            if id(p) in alike:
                replicated += square
            elif is_expert_param(p):
                expert += square
            else:
                dense += square
        dims, groups = self.groups.dims, self.groups
        sums = self._to_comm(torch.stack([dense, expert]))
        if dims.dp > 1:
            dist.all_reduce(sums[0:1], group=groups.dp_group)
        for name in ("edp", "ep"):
            if getattr(dims, name) > 1:
                dist.all_reduce(sums[1:2], group=getattr(groups, f"{name}_group"))
        norm = float((sums.sum().cpu() + replicated).sqrt())
        if max_norm and norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            for g in grads:
                g.mul_(scale)
        return norm

    def _to_comm(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the device the data-parallel group's backend talks through."""
        if dist.is_initialized() and self.groups.dims.dp > 1 and dist.get_backend(self.groups.dp_group) == "nccl":
            return t.to(torch.device("cuda", torch.cuda.current_device()))
        return t

    def checkpoint_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer itself (its state is per parameter shard); every unit is resharded first, so
        that the model's parameters are the sharded DTensors the optimizer holds."""
        for unit in self.units:
            unit.reshard()
        return self.optimizer

    def after_checkpoint_load(self) -> None:
        """Nothing to push: DCP loaded into the local shards in place. Units stay resharded, so the next
        forward gathers the loaded values."""


def fsdp_units(model: nn.Module) -> List[FSDPModule]:
    """The ``fully_shard`` units of ``model`` (for tests)."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)]
