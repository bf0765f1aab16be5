"""What a job needs before its first step: the task, and the seeds that make every step reproducible.

- ``make_task``: a built-in task, a ``package.module:function`` builder named in the
  config, or a builder passed in by the caller.
- ``micro_batch_seed``: the torch RNG seed of one micro-batch (dropout, random routing,
  jitter). It depends on (seed, step, the micro-batch's index in the GLOBAL batch) only,
  so the same micro-batch draws the same random numbers whichever rank runs it.
"""
from __future__ import annotations

import importlib
import random
from typing import Callable, Optional

import numpy as np
import torch

from .config import TrainConfig

__all__ = ["make_task", "micro_batch_seed", "seed_everything"]


def micro_batch_seed(seed: int, step: int, micro_index: int) -> int:
    """Seed of global micro-batch ``micro_index`` of optimizer step ``step``."""
    return (seed * 1_000_003 + step * 7919 + micro_index * 104_729 + 17) % (2**63 - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def make_task(cfg: TrainConfig, groups, device: torch.device, task_builder: Optional[Callable] = None,
              pipeline=None):
    """Build the task: ``task_builder`` if given, a ``module:function`` name, or ``moe.tasks.build_task``.

    Every builder is called as ``builder(name, model_cfg, data_cfg, groups=..., device=...)``, plus
    ``pipeline=`` (the ``parallel.stages.StagePlan``) under pipeline parallelism.
    """
    name = cfg.task.name
    if task_builder is None:
        if ":" in name:
            module, fn = name.split(":")
            try:
                task_builder = getattr(importlib.import_module(module), fn)
            except (ImportError, AttributeError) as e:
                raise ValueError(f"config key 'task.name': cannot import task builder {name!r} ({e})") from None
        else:
            from moe.tasks import build_task as task_builder
    extra = {} if pipeline is None else {"pipeline": pipeline}
    return task_builder(name, dict(cfg.model), dict(cfg.data), groups=groups, device=str(device), **extra)
