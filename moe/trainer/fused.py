"""Fused kernels (``train.fused: auto | off``): NVIDIA apex when a cluster built it, torch's own otherwise.

NVIDIA apex is not on the package index (the PyPI package named ``apex`` is an unrelated
web toolkit: never install it by that name). A cluster builds it from source with its
CUDA extensions (docs/precision.md says how); when it is importable WITH those
extensions (``amp_C``, ``fused_layer_norm_cuda``) and the job runs on a GPU, ``auto``
uses its ``FusedAdam`` (AdamW mode) and its ``FusedLayerNorm`` in place of every
``nn.LayerNorm``. Otherwise: torch's fused AdamW (``fused=True``) on CUDA, the plain
(foreach) AdamW and LayerNorm on CPU. ``off``: always the plain ops. ZeRO engines run
their own optimizer path (DeepSpeed / FSDP2 with torch's AdamW), so there ``auto``
changes nothing. The trainer logs the choice and why (``FusedChoice.describe``).

Checkpoints hold AdamW's per-parameter state (``step``, ``exp_avg``, ``exp_avg_sq``);
apex's FusedAdam keeps ``step`` per parameter GROUP, so the engine saves and loads it
through ``parallel.optim_view.AdamView`` (a torch AdamW whose moments are FusedAdam's own tensors).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

__all__ = ["FusedChoice", "apex_status", "choose", "fuse_norms"]

OPTIMIZERS = ("apex", "torch-fused", "torch")


@dataclass(frozen=True)
class FusedChoice:
    """``optimizer``: "apex" (apex FusedAdam), "torch-fused" (AdamW(fused=True)) or "torch" (AdamW);
    ``norm``: "apex" (FusedLayerNorm) or "torch"; ``reason``: why."""

    optimizer: str
    norm: str
    reason: str

    def describe(self) -> str:
        opt = {"apex": "apex FusedAdam", "torch-fused": "torch AdamW(fused=True)", "torch": "torch AdamW"}
        norm = {"apex": "apex FusedLayerNorm", "torch": "torch LayerNorm"}
        return f"fused kernels: {opt[self.optimizer]}, {norm[self.norm]} ({self.reason})"


def apex_status() -> Optional[str]:
    """None when apex's FusedAdam and FusedLayerNorm are usable, else why not."""
    try:
        importlib.import_module("apex.optimizers")
        importlib.import_module("apex.normalization")
    except ImportError as e:
        return f"apex is not importable: {e}"
    missing = []
    for ext in ("amp_C", "fused_layer_norm_cuda"):
        try:
            importlib.import_module(ext)
        except ImportError:
            missing.append(ext)
    if missing:
        return (f"apex is importable but was built without its CUDA extensions ({', '.join(missing)} missing; "
                "build it with --cpp_ext --cuda_ext)")
    return None


def choose(setting: str, device_type: str, *, engine_owns_optimizer: bool = False,
           status: Callable[[], Optional[str]] = apex_status) -> FusedChoice:
    """What ``train.fused`` = ``setting`` gives on ``device_type`` (see the module doc)."""
    if setting not in ("auto", "off"):
        raise ValueError(f"train.fused: got {setting!r}; allowed: 'auto', 'off'")
    if setting == "off":
        return FusedChoice("torch", "torch", "train.fused=off")
    if engine_owns_optimizer:
        return FusedChoice("torch", "torch", "ZeRO engines use their own optimizer path")
    if device_type != "cuda":
        return FusedChoice("torch", "torch", f"fused kernels are CUDA-only; device is {device_type}")
    why_not = status()
    if why_not is None:
        return FusedChoice("apex", "apex", "NVIDIA apex with its CUDA extensions is importable")
    return FusedChoice("torch-fused", "torch", f"{why_not}; torch's fused AdamW instead")


def make_adamw(param_groups, *, lr: float, betas, eps: float, kind: str) -> torch.optim.Optimizer:
    """AdamW over ``param_groups`` (each with its ``weight_decay``) as ``kind`` (``OPTIMIZERS``)."""
    if kind == "apex":
        from apex.optimizers import FusedAdam

        return FusedAdam(param_groups, lr=lr, betas=tuple(betas), eps=eps, adam_w_mode=True)
    if kind == "torch-fused":
        return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)
    if kind == "torch":
        return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), eps=eps)
    raise ValueError(f"optimizer kind {kind!r}; allowed: {', '.join(OPTIMIZERS)}")


def fuse_norms(model: nn.Module) -> int:
    """Replace every affine ``nn.LayerNorm`` by apex's ``FusedLayerNorm`` holding the SAME parameters
    (their values, names and markers unchanged); returns how many."""
    from apex.normalization import FusedLayerNorm

    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.LayerNorm and child.elementwise_affine]
    for parent, name, norm in swaps:
        fused = FusedLayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=True)
        fused.weight, fused.bias = norm.weight, norm.bias
        setattr(parent, name, fused)
    return len(swaps)
