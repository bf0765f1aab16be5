"""The errors of checkpoint saving and loading (every module of ``moe.trainer.checkpoint`` raises them)."""
from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files are damaged: missing, truncated or with other bytes than at save time."""
