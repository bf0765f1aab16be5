"""The optimizer and its learning-rate schedule: AdamW with decoupled weight decay on matrices only."""
from __future__ import annotations

import math
from typing import Any, Dict, List

import torch
from torch import nn

from ..experts import Experts
from .config import OptimConfig
from .fused import make_adamw

__all__ = ["build_optimizer", "lr_at"]


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return floor + (cfg.lr - floor) * (1.0 - progress)
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _is_matrix(p: torch.Tensor, stacked: bool) -> bool:
    """A weight matrix: >= 2 dims, not counting the leading expert dim of a stacked expert parameter."""
    return p.dim() - (1 if stacked else 0) >= 2


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, kind: str = "torch") -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices, none on biases, norms and scalars.

    Expert parameters are stacks over experts (``moe.experts.Experts``): w1/w2 [E, ., .]
    are matrices, b1/b2 [E, .] are biases, so their leading dim is not counted. ``kind``: which
    implementation (``moe.trainer.fused``: "torch", "torch-fused" or "apex").
    """
    stacked = {id(p) for m in model.modules() if isinstance(m, Experts) for p in m.parameters(recurse=False)}
    decay: List[nn.Parameter] = []
    no_decay: List[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if _is_matrix(p, id(p) in stacked) else no_decay).append(p)
    param_groups: List[Dict[str, Any]] = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        param_groups.append({"params": no_decay, "weight_decay": 0.0})
    return make_adamw(param_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, kind=kind)
