"""Process topology and gradient reduction for dense + expert parallelism.

Legend: W world size; dp/tp/pp dense data/tensor/pipeline sizes; ep/etp/edp
expert parallel / expert tensor parallel / expert data parallel sizes.
"""
from .dims import GROUP_NAMES, ParallelDims, ProcessGroups
from .grads import allreduce_gradients, expert_group_name, is_expert_param, mark_expert_params

__all__ = [
    "GROUP_NAMES",
    "ParallelDims",
    "ProcessGroups",
    "allreduce_gradients",
    "expert_group_name",
    "is_expert_param",
    "mark_expert_params",
]
