"""The "triton" backend: Triton kernels from ``moe.kernels``, run through torch.library.

Legend: T tokens, k choices per token, E experts, N rows, D width. Same signatures and
results as ``moe.ops.reference``. Runs on CUDA tensors; on CPU tensors only under the
Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported), which is how
the kernels are tested without a GPU. triton itself is imported lazily, on first use.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

from .library import OpSet

_OPS = OpSet("triton")
router_topk = _OPS.router_topk
assign_slots = _OPS.assign_slots
permute_rows = _OPS.permute_rows
unpermute_rows = _OPS.unpermute_rows

__all__ = ["router_topk", "assign_slots", "permute_rows", "unpermute_rows", "unavailable_reason"]


def unavailable_reason(device_type: Optional[str] = None) -> Optional[str]:
    """None when Triton can run the kernels on ``device_type``, else what to install or set."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed: `pip install triton==3.9.0` (see requirements.txt)"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before importing triton"
    return None
