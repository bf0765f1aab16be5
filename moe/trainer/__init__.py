"""The training job: YAML config, loop, DCP checkpoints, telemetry and plots.

Run it with ``python -m moe.train --config CONFIG.yaml [--set key.path=value ...]``
(under ``torchrun`` or ``srun`` for several processes), or from Python::

    from moe.trainer import load_config, run
    result = run(load_config("examples/configs/tiny_switch_lm.yaml", ["train.steps=20"]))
"""
from .checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, model_state_dict,
                         save_checkpoint)
from .config import ConfigError, TrainConfig, apply_overrides, from_dict, load_config
from .loop import Trainer, TrainResult, run
from .optim import build_optimizer, lr_at

__all__ = [
    "CheckpointError", "ConfigError", "TrainConfig", "TrainResult", "Trainer", "apply_overrides", "build_optimizer",
    "from_dict", "latest_checkpoint", "load_checkpoint", "load_config", "lr_at", "model_state_dict",
    "run", "save_checkpoint",
]
