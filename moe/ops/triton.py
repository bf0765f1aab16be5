"""The "triton" backend: Triton kernels from ``moe.kernels``, run through torch.library.

Legend: T tokens, k choices per token, E experts, N rows, D width. Same signatures and
results as ``moe.ops.reference``. Runs on CUDA tensors; on CPU tensors only under the
Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported), which is how
the kernels are tested without a GPU. triton itself is imported lazily, on first use.
Its ops are ``OpSet("triton")`` (``moe.ops.library``); this module says when they can run.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

__all__ = ["unavailable_reason"]


def unavailable_reason(device_type: Optional[str] = None) -> Optional[str]:
    """None when Triton can run the kernels on ``device_type``, else what to install or set."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed: `pip install triton==3.9.0` (see requirements.txt)"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before importing triton"
    return None
