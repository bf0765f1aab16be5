"""Triton kernels of the MoE ops (the "triton" backend's raw kernels).

Legend: T tokens, k choices per token, E experts, N rows, D width. Importing this package
imports triton: on a machine without a GPU, set ``TRITON_INTERPRET=1`` before that to run
the kernels on CPU tensors in Triton's interpreter. Use them through ``moe.ops`` (the
"triton" backend) rather than directly: that path adds input checks and autograd.
"""
from .permute import permute_rows, permute_rows_backward, unpermute_rows, unpermute_rows_backward
from .router import router_topk, router_topk_backward
from .slots import assign_slots

__all__ = ["router_topk", "router_topk_backward", "assign_slots", "permute_rows", "permute_rows_backward",
           "unpermute_rows", "unpermute_rows_backward"]
