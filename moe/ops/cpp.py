"""The "cpp" backend: C++ CPU kernels from ``moe._C`` (OpenMP), run through torch.library.

Legend: T tokens, k choices per token, E experts, N rows, D width. Same signatures and
results as ``moe.ops.reference``; float32, float64, bfloat16 and float16 rows (fp32
accumulation for the 16-bit types). A destination row may receive at most one assignment.
"""
from __future__ import annotations

from typing import Optional

from .library import OpSet

_OPS = OpSet("cpp")
router_topk = _OPS.router_topk
assign_slots = _OPS.assign_slots
permute_rows = _OPS.permute_rows
unpermute_rows = _OPS.unpermute_rows

__all__ = ["router_topk", "assign_slots", "permute_rows", "unpermute_rows", "unavailable_reason"]


def unavailable_reason(device_type: Optional[str] = None) -> Optional[str]:
    """None when the C++ kernels can run, else what to build."""
    try:
        from moe import _C  # noqa: F401
    except ImportError as exc:
        return f"moe._C was not built ({exc}): run `pip install --no-build-isolation -e .` in the repository root"
    return None
