"""Training tasks: a model, its data stream, its loss and its evaluation.

``TASKS`` is the one table of built-in tasks, ``name -> Task class`` (each a
``moe.tasks.base.ModelTask``); ``TASK_NAMES`` are its keys. ``build_task(name,
model_cfg, data_cfg, groups=None, device="cpu")`` returns an object following the
``Task`` protocol (see ``moe.tasks.base``); ``TASKS[name].configs_from_dicts(model_cfg,
data_cfg)`` validates the two YAML sections without building anything.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Type

from parallel.checks import fail
from parallel.dims import ProcessGroups
from .base import ModelTask, Task
from .limoe import LIMoEDataConfig, LIMoETask
from .lm import LMDataConfig, LMTask

TASKS: Dict[str, Type[ModelTask]] = {"lm": LMTask, "limoe": LIMoETask}
TASK_NAMES = tuple(TASKS)

__all__ = ["TASKS", "TASK_NAMES", "Task", "ModelTask", "task_class", "build_task", "LIMoEDataConfig", "LIMoETask",
           "LMDataConfig", "LMTask"]


def task_class(name: str, path: str = "task.name") -> Type[ModelTask]:
    """``TASKS[name]``; an unknown name raises ``ConfigError`` naming ``path`` and the task names."""
    if not isinstance(name, str) or name not in TASKS:
        fail(path, name, f"allowed values: {', '.join(map(repr, TASK_NAMES))}")
    return TASKS[name]


def build_task(name: str, model_cfg: Optional[Mapping[str, Any]], data_cfg: Optional[Mapping[str, Any]], *,
               groups: Optional[ProcessGroups] = None, device="cpu", pipeline=None) -> Task:
    """Build task ``name`` (a key of ``TASKS``) from the ``model`` and ``data`` YAML sections.

    ``model_cfg`` may name a preset: ``{"preset": "tiny_limoe", "n_layers": 2}``.
    ``groups``: None (single process) or this rank's ``parallel.ProcessGroups``.
    ``pipeline``: a ``parallel.stages.StagePlan`` (pp > 1: build only this rank's stage).
    """
    cls = task_class(name)
    if groups is not None and not isinstance(groups, ProcessGroups):
        raise TypeError(f"groups must be a parallel.ProcessGroups (the task reads its ep_group and dp_group), "
                        f"got {type(groups).__name__}")
    return cls.from_dicts(model_cfg or {}, data_cfg or {}, groups=groups, device=device, pipeline=pipeline)
