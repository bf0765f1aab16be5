"""What a model tells the FSDP2 engine (``parallel.zero_fsdp``): its ``ShardingPlan``.

The engine knows no model class. The model's side (``moe.models.sharding.sharding_plan``,
beside the models, as torchtitan keeps its parallelize plans) lists the modules that become
``fully_shard`` units and the methods through which a task enters the model; the engine
shards them in a fixed order: the expert units, the fp32 units (under mixed precision),
the block units, then the root model holding everything left.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from torch import nn

__all__ = ["ShardingPlan"]


@dataclass(frozen=True)
class ShardingPlan:
    """The FSDP2 units of a model, each list in the model's module order.

    ``experts``: the expert-parallel modules (parameters stacked over this rank's experts,
    marked by ``parallel.grads.mark_expert_params``), sharded over the expert-data-parallel
    group; ``fp32_units``: modules that compute from fp32 weights under every precision (the
    routers), their own units with the default (fp32) policy when the precision is mixed, and
    left to their block otherwise; ``blocks``: the dense units over the data-parallel group
    (empty when the model runs its blocks piecewise, not through their ``forward``: their
    parameters then join the root unit); ``entry_methods``: the model's methods besides
    ``forward`` through which a task runs it (each then runs FSDP's root hooks, as ``forward``
    does).
    """

    experts: Tuple[nn.Module, ...] = ()
    fp32_units: Tuple[nn.Module, ...] = ()
    blocks: Tuple[nn.Module, ...] = ()
    entry_methods: Tuple[str, ...] = ()
