"""The FSDP2 plan of a model built from this package's blocks: its ``parallel.sharding.ShardingPlan``.

The FSDP2 engine (``parallel.zero_fsdp``) knows no model class; this says which modules of
a model are its ``fully_shard`` units, the way torchtitan keeps a model's parallelize plan
beside the model:

- ``experts``: every expert-parallel ``moe.experts.Experts`` (its parameters marked by
  ``parallel.grads.mark_expert_params``; a dense MLP built as one expert is not);
- ``fp32_units``: every ``moe.router.Router`` (fp32 units under mixed precision);
- ``blocks``: every transformer ``Block``, unless the model runs its blocks piecewise instead
  of through ``Block.forward`` and says so with the class attribute ``fsdp_block_units = False``
  (LIMoE: ``attend`` twice, then ``feed_forward``): their parameters then join the root unit;
- ``entry_methods``: the methods of ``ENTRY_METHODS`` the model's class has, through which
  the trainer and the tasks run it besides ``forward``.

Each list follows ``model.modules()`` order, which fixes the order of the units.
"""
from __future__ import annotations

from torch import nn

from parallel.grads import is_expert_param
from parallel.sharding import ShardingPlan

from ..experts import Experts
from ..router import Router
from .transformer import Block

__all__ = ["ENTRY_METHODS", "sharding_plan"]

# Methods of a model through which a task runs it (besides ``forward``): they run FSDP's root hooks.
ENTRY_METHODS = ("run_pieces", "encode_tokens", "encode_image", "encode_text")


def sharding_plan(model: nn.Module) -> ShardingPlan:
    """The FSDP2 units and entry methods of ``model`` (see the module doc)."""
    modules = list(model.modules())
    per_block = getattr(model, "fsdp_block_units", True)
    return ShardingPlan(
        experts=tuple(m for m in modules if isinstance(m, Experts) and is_expert_param(m.w1)),
        fp32_units=tuple(m for m in modules if isinstance(m, Router)),
        blocks=tuple(m for m in modules if isinstance(m, Block)) if per_block else (),
        entry_methods=tuple(name for name in ENTRY_METHODS if hasattr(type(model), name)),
    )
