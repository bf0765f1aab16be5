"""Backend registry: which implementation of the MoE ops runs for a given device.

A backend is a small object with the four ops of ``moe.ops.reference``
(router_topk, assign_slots, permute_rows, unpermute_rows: the ``MoEOps`` protocol).
``auto`` picks the fastest available backend for the device type (cpu: cpp > torch;
cuda: cuda > triton > torch); an explicitly requested backend that is not available raises a
``RuntimeError`` saying what to build or install. Fallback is automatic only by
device type, never silent on a missing fast kernel.

Registered here: "torch" (``moe.ops.reference``), "cpp" (``moe._C`` CPU kernels),
"cuda" (``moe._C`` CUDA kernels) and "triton" (``moe.kernels``; on CPU tensors only
under ``TRITON_INTERPRET=1``, and never chosen by ``auto`` there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Protocol, Tuple, TypeGuard

import torch
from torch import Tensor

from . import cpp, cuda, reference, triton
from parallel.checks import check_choice
from .library import OpSet


class MoEOps(Protocol):
    """The four MoE ops a backend provides, with the signatures of ``moe.ops.reference``
    (the module itself is one; ``OpSet(impl)`` of ``moe.ops.library`` is the other kind)."""

    def router_topk(self, logits_TE: Tensor, k: int, score: str = "softmax", normalize: bool = True,
                    bias_E: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]: ...

    def assign_slots(self, experts_TK: Tensor, order_N: Tensor, dispatched_TK: Tensor, num_experts: int,
                     capacity: Optional[int]) -> Tuple[Tensor, Tensor, Tensor]: ...

    def permute_rows(self, x_TD: Tensor, dest_TK: Tensor, num_rows: int) -> Tensor: ...

    def unpermute_rows(self, rows_ND: Tensor, dest_TK: Tensor, weights_TK: Tensor) -> Tensor: ...


class FusedExpertOps(Protocol):
    """The fused expert MLP an op set may have beside the four ops (``OpSet`` of ``moe.ops.library``
    has it; the torch backend has not): ``moe.experts.Experts`` runs ``expert_mlp`` on the inputs
    ``expert_mlp_supported`` accepts. ``has_fused_expert_mlp(ops)`` tells."""

    def expert_mlp_supported(self, rows_ND: Tensor, w1: Tensor, w2: Tensor) -> bool: ...

    def expert_mlp(self, rows_ND: Tensor, counts_El: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                   b2: Optional[Tensor], activation: str) -> Tensor: ...


class TokenExpertOps(FusedExpertOps, Protocol):
    """A ``FusedExpertOps`` with the token-level fused expert MLP too (rows read from x in place,
    outputs combined with the routing weights inside the op; ``moe.layer``'s fused path).
    ``has_token_expert_mlp(ops)`` tells."""

    def expert_mlp_tokens(self, x_TD: Tensor, dest_TK: Tensor, weights_TK: Tensor, counts_El: Tensor, w1: Tensor,
                          b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], activation: str) -> Tensor: ...


# Plain attribute look-ups, not isinstance on runtime-checkable protocols: these run in every
# MoE forward, and a protocol isinstance costs ~100x more.
def has_fused_expert_mlp(ops: object) -> TypeGuard[FusedExpertOps]:
    """Whether the op set ``ops`` has the fused expert MLP (``FusedExpertOps``)."""
    return hasattr(ops, "expert_mlp_supported")


def has_token_expert_mlp(ops: FusedExpertOps) -> TypeGuard[TokenExpertOps]:
    """Whether the fused op set ``ops`` has the token-level one too (``TokenExpertOps``)."""
    return hasattr(ops, "expert_mlp_tokens")


def _always_available(device_type: Optional[str] = None) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Backend:
    """One implementation of the four MoE ops.

    name: the ``MoEConfig.backend`` value that selects it.
    ops: the ops (``MoEOps``): a module or object with router_topk, assign_slots, permute_rows,
        unpermute_rows.
    device_types: device types it runs on when asked for by name.
    priority: higher wins under "auto".
    unavailable_reason: ``f(device_type) -> None`` when usable on that device type (or
        in general for ``None``), else a message saying what to build or install.
    auto_device_types: device types on which "auto" may choose it (default: device_types).
    """

    name: str
    ops: MoEOps
    device_types: Tuple[str, ...]
    priority: int
    unavailable_reason: Callable[[Optional[str]], Optional[str]] = _always_available
    auto_device_types: Optional[Tuple[str, ...]] = None

    def auto_for(self, device_type: str) -> bool:
        allowed = self.device_types if self.auto_device_types is None else self.auto_device_types
        return device_type in allowed


_BACKENDS: Dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend under ``backend.name``."""
    _BACKENDS[backend.name] = backend


def available_backends(device_type: Optional[str] = None) -> List[str]:
    """Names of the usable backends, best first (only those ``auto`` may pick for ``device_type``)."""
    ranked = sorted(_BACKENDS.values(), key=lambda b: -b.priority)
    return [b.name for b in ranked
            if (device_type is None or b.auto_for(device_type)) and b.unavailable_reason(device_type) is None]


def get_backend(name: str, device) -> Backend:
    """The backend called ``name`` for ``device`` ("auto": the best available one)."""
    device_type = torch.device(device).type
    if name == "auto":
        names = available_backends(device_type)
        if not names:
            raise RuntimeError(f"no MoE op backend is available for device type {device_type!r}")
        return _BACKENDS[names[0]]
    check_choice("backend", name, ("auto", *sorted(_BACKENDS)))
    backend = _BACKENDS[name]
    if device_type not in backend.device_types:
        raise RuntimeError(f"backend={name!r} runs on device types {backend.device_types}, "
                           f"not on {device_type!r}; use backend='auto' or one of "
                           f"{[b for b in sorted(_BACKENDS) if device_type in _BACKENDS[b].device_types]}")
    reason = backend.unavailable_reason(device_type)
    if reason is not None:
        raise RuntimeError(f"backend={name!r} is not available: {reason}")
    return backend


register_backend(Backend("torch", reference, ("cpu", "cuda", "meta"), priority=0))
register_backend(Backend("cpp", OpSet("cpp"), ("cpu", "meta"), priority=10,
                         unavailable_reason=cpp.unavailable_reason, auto_device_types=("cpu",)))
register_backend(Backend("triton", OpSet("triton"), ("cuda", "cpu"), priority=20,
                         unavailable_reason=triton.unavailable_reason, auto_device_types=("cuda",)))
register_backend(Backend("cuda", OpSet("cuda"), ("cuda",), priority=30, unavailable_reason=cuda.unavailable_reason))
