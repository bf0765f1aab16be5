"""What a job needs before its first step: the task.

``make_task``: a built-in task, a ``package.module:function`` builder named in the
config, or a builder passed in by the caller. (The seeds that make every step
reproducible live in ``parallel.rng``.)
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch

from parallel.dims import ProcessGroups
from parallel.stages import StagePlan

from ..tasks import build_task
from .config import TrainConfig

__all__ = ["make_task"]


def make_task(cfg: TrainConfig, groups: Optional[ProcessGroups], device: torch.device,
              task_builder: Optional[Callable] = None, pipeline: Optional[StagePlan] = None):
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
            task_builder = build_task
    extra = {} if pipeline is None else {"pipeline": pipeline}
    return task_builder(name, dict(cfg.model), dict(cfg.data), groups=groups, device=str(device), **extra)
