"""Checkpoints with ``torch.distributed.checkpoint`` (DCP), experts by GLOBAL index.

A checkpoint holds the model's and the optimizer's tensors as GLOBAL tensors under
global-expert keys (``model.<name>``, ``model.<experts>.w1.expert_<g>``,
``optim.<name>.<state key>``, ``trainer.step``), so one saved at any expert-,
tensor- or data-parallel layout, pipeline split or ZeRO stage loads at any other.
Saving is atomic (a ``.tmp`` directory renamed, then the ``latest`` pointer moved)
and every file's sha256 is in a manifest checked before a load.

The package, one role per module:

- ``state``: the state dict a checkpoint holds (global-expert keys, tensor-parallel
  pieces and FSDP2 shards as DTensors at their global offsets, AdamW state);
- ``store``: the directory layout (``step_<N>``, ``latest``, ``trainer.json``), the
  manifest and ``verify_checkpoint``;
- ``mismatch``: whether a checkpoint fits the model (layout version, keys, shapes,
  the config keys that differ);
- ``io``: ``save_checkpoint`` and ``load_checkpoint``;
- ``errors``: ``CheckpointError`` and ``CorruptCheckpointError``.

Everything callers use is importable from here (``moe.trainer.checkpoint``).
``moe/trainer/resume.py`` decides which checkpoint a run continues.
"""
from .errors import CheckpointError, CorruptCheckpointError
from .io import load_checkpoint, save_checkpoint
from .mismatch import config_differences
from .state import LAYOUT_VERSION, full_state_dict, model_state_dict, optimizer_state_dict
from .store import (INFO, LATEST, MANIFEST, UNKNOWN_RUN, checkpoint_dirs, checkpoint_info, checkpoint_steps,
                    latest_checkpoint, list_checkpoints, resolve_checkpoint, resume_candidates, run_of, step_dir,
                    step_of, verify_checkpoint)

__all__ = [
    "CheckpointError", "CorruptCheckpointError", "INFO", "LATEST", "LAYOUT_VERSION", "MANIFEST", "UNKNOWN_RUN",
    "checkpoint_dirs", "checkpoint_info", "checkpoint_steps", "config_differences", "full_state_dict", "latest_checkpoint",
    "list_checkpoints", "load_checkpoint", "model_state_dict", "optimizer_state_dict", "resolve_checkpoint",
    "resume_candidates", "run_of", "save_checkpoint", "step_dir", "step_of", "verify_checkpoint",
]
