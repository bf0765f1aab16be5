"""How one optimizer step's global batch is spread over the data-parallel ranks (``StepSchedule``).

Its own module so that the layout checks (``moe.trainer.layout``: does the pipeline schedule get
enough micro-batches?) and the loop (``moe.trainer.loop``) both read it, neither importing the other.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import ConfigError, TrainLoopConfig

__all__ = ["StepSchedule"]


@dataclass(frozen=True)
class StepSchedule:
    """How one optimizer step's global batch is spread over the data-parallel ranks.

    ``global_batch``: G samples per step; ``micro``: samples per rank per forward;
    ``accumulation``: A micro-batches per rank per step (G = micro * A * dp);
    ``first_sample``: this rank's first sample index in the global batch.
    """

    global_batch: int
    micro: int
    accumulation: int
    dp_size: int
    dp_rank: int

    @classmethod
    def from_config(cls, train: TrainLoopConfig, dp_size: int, dp_rank: int) -> "StepSchedule":
        G = train.global_batch_size
        if G % dp_size:
            raise ConfigError(f"config key 'train.global_batch_size': got {G}; it must be a multiple of the "
                              f"data-parallel size dp={dp_size} (world size / (tp * pp))")
        micro = train.micro_batch_size if train.micro_batch_size is not None else G // dp_size
        if G % (micro * dp_size):
            raise ConfigError(f"config key 'train.global_batch_size': got {G}; it must be a multiple of "
                              f"train.micro_batch_size x dp = {micro} x {dp_size} = {micro * dp_size} "
                              "(gradient accumulation steps = global / (micro x dp) must be a whole number)")
        return cls(G, micro, G // (micro * dp_size), dp_size, dp_rank)

    @property
    def first_sample(self) -> int:
        return self.dp_rank * self.micro * self.accumulation

    def micro_index(self, m: int) -> int:
        """Index of this rank's micro-batch ``m`` among all micro-batches of the global batch."""
        return self.dp_rank * self.accumulation + m

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = micro {self.micro} x accumulation {self.accumulation} "
                f"x dp {self.dp_size}")
