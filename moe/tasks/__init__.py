"""Training tasks: a model, its data stream, its loss and its evaluation.

``build_task("limoe" | "lm", model_cfg, data_cfg, groups=None, device="cpu")``
returns an object following the ``Task`` protocol (see ``moe.tasks.base``).
"""
from .base import TASK_NAMES, Task, build_task
from .limoe import LIMoEDataConfig, LIMoETask
from .lm import LMDataConfig, LMTask

__all__ = ["TASK_NAMES", "Task", "build_task", "LIMoEDataConfig", "LIMoETask", "LMDataConfig", "LMTask"]
