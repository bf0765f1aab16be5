"""``telemetry.profile``: a torch profiler trace of a few training steps.

``StepProfiler(profile_cfg, out_dir, rank, device)``; the loop calls ``begin(step)`` before
optimizer step ``step`` (1-based) runs and ``end(step)`` after it. Steps ``start_step ..
start_step + steps - 1`` are recorded (CPU activity, and CUDA kernels on a GPU) and written
when the last one ends, one file per rank, to ``<out_dir>/profile/`` by
``torch.profiler.tensorboard_trace_handler`` (``rank<r>.<...>.pt.trace.json``): open it with
TensorBoard's profiler plugin (``tensorboard --logdir <out_dir>/profile``) or
chrome://tracing / Perfetto. A run that ends or stops inside the window writes what it
recorded (``close``).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

__all__ = ["StepProfiler"]


class StepProfiler:
    """Records steps ``cfg.start_step .. cfg.start_step + cfg.steps - 1`` (see the module doc); ``cfg`` None: off."""

    def __init__(self, cfg, out_dir: str, rank: int, device: torch.device):
        self.cfg, self.rank, self.device = cfg, rank, device
        self.dir = os.path.join(out_dir, "profile")
        self._prof: Optional[torch.profiler.profile] = None

    @property
    def last_step(self) -> int:
        return self.cfg.start_step + self.cfg.steps - 1

    def begin(self, step: int) -> None:
        """Before optimizer step ``step`` (1-based): start recording at ``start_step``."""
        if self.cfg is None or self._prof is not None or step != self.cfg.start_step:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        handler = torch.profiler.tensorboard_trace_handler(self.dir, worker_name=f"rank{self.rank}")
        self._prof = torch.profiler.profile(activities=activities, on_trace_ready=handler, record_shapes=True)
        self._prof.start()

    def end(self, step: int) -> Optional[str]:
        """After optimizer step ``step``: at the window's last step, write the trace; returns a log line then."""
        if self._prof is None or step < self.last_step:
            return None
        return self.close()

    def close(self) -> Optional[str]:
        """Stop and write what was recorded (if recording); returns a log line then."""
        if self._prof is None:
            return None
        prof, self._prof = self._prof, None
        prof.stop()
        return (f"profiler: steps {self.cfg.start_step}-{self.last_step} traced to {os.path.abspath(self.dir)} "
                f"(tensorboard --logdir {os.path.abspath(self.dir)}, or chrome://tracing)")
