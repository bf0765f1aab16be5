"""ZeRO engines: which one runs a ``parallel.zero_stage`` (the seam; the engines live in their own modules).

- stage 0: ``parallel.engine.ReplicatedEngine`` (replicated optimizer; not built here);
- stages 1 and 2 on DeepSpeed: ``parallel.zero_deepspeed.DeepSpeedEngine``;
- stages 2 and 3 on FSDP2: ``parallel.zero_fsdp.FSDP2Engine``.

Every engine has the verbs of ``parallel.engine`` (``forward_backward``, ``clip_grad_norm``,
``step``, ``checkpoint_optimizer``, ``after_checkpoint_load``; and for mixed precision
``loss_scale``, ``unscale_grads``, ``skip_step``) and is built as
``Engine(model, groups, optim_cfg, stage=..., num_micro=..., device=..., precision=...)``: ``optim_cfg`` is
the job's ``moe.trainer.config.OptimConfig`` (AdamW, betas, eps, weight decay on matrices only
as in ``moe.trainer.optim``, ``grad_clip``), ``num_micro`` the gradient accumulation count.
"""
from __future__ import annotations

from .precision import FP32, Precision

__all__ = ["build_zero_engine"]


def build_zero_engine(engine: str, model, groups, optim_cfg, *, stage: int, num_micro: int, device,
                      precision: Precision = FP32):
    """The ZeRO engine ``engine`` ("deepspeed" or "fsdp2") for ``stage`` (see the module doc)."""
    kw = dict(stage=stage, num_micro=num_micro, device=device, precision=precision)
    if engine == "deepspeed":
        from .zero_deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, groups, optim_cfg, **kw)
    if engine == "fsdp2":
        from .zero_fsdp import FSDP2Engine

        return FSDP2Engine(model, groups, optim_cfg, **kw)
    raise ValueError(f"build_zero_engine: engine must be 'deepspeed' or 'fsdp2', got {engine!r}")
