"""The "cpp" backend: C++ CPU kernels from ``moe._C`` (OpenMP), run through torch.library.

Legend: T tokens, k choices per token, E experts, N rows, D width. Same signatures and
results as ``moe.ops.reference``; float32, float64, bfloat16 and float16 rows (fp32
accumulation for the 16-bit types). A destination row may receive at most one assignment.
Its ops are ``OpSet("cpp")`` (``moe.ops.library``); this module says when they can run.
"""
from __future__ import annotations

from typing import Optional

__all__ = ["unavailable_reason"]


def unavailable_reason(device_type: Optional[str] = None) -> Optional[str]:
    """None when the C++ kernels can run, else what to build."""
    try:
        from moe import _C  # noqa: F401
    except ImportError as exc:
        return f"moe._C was not built ({exc}): run `pip install --no-build-isolation -e .` in the repository root"
    return None
