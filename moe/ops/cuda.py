"""The "cuda" backend: CUDA kernels from ``moe._C`` (built with a CUDA torch), via torch.library.

Legend: T tokens, k choices per token, E experts, N rows, D width. Same signatures and
results as ``moe.ops.reference`` on CUDA tensors; float32, float64, bfloat16 and float16
rows with fp32 accumulation for the 16-bit types. A destination row may receive at most
one assignment (not checked on the GPU: it would cost a device sync).
Its ops are ``OpSet("cuda")`` (``moe.ops.library``); this module says when they can run.
"""
from __future__ import annotations

from typing import Optional

from . import cpp

__all__ = ["unavailable_reason"]


def unavailable_reason(device_type: Optional[str] = None) -> Optional[str]:
    """None when the CUDA kernels were built into ``moe._C``, else what to build."""
    reason = cpp.unavailable_reason(device_type)
    if reason is not None:
        return reason
    from moe import _C

    if not getattr(_C, "has_cuda", False):
        return ("moe._C was built without CUDA kernels: they need a CUDA build of torch and CUDA_HOME "
                "at build time (and MOE_SKIP_CUDA unset); then rerun `pip install --no-build-isolation -e .`")
    return None
