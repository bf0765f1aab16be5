"""Process topology and gradient reduction for dense + expert parallelism.

Legend: W world size; dp/tp/pp dense data/tensor/pipeline sizes; ep/etp/edp
expert parallel / expert tensor parallel / expert data parallel sizes.
"""
from .dims import GROUP_NAMES, ParallelDims, ProcessGroups
from .engine import ReplicatedEngine
from .grads import (allreduce_gradients, clip_gradients, expert_group_name, global_grad_norm, is_expert_param,
                    mark_expert_params, sync_replicas)

__all__ = [
    "GROUP_NAMES",
    "ParallelDims",
    "ProcessGroups",
    "ReplicatedEngine",
    "allreduce_gradients",
    "clip_gradients",
    "global_grad_norm",
    "sync_replicas",
    "expert_group_name",
    "is_expert_param",
    "mark_expert_params",
]
