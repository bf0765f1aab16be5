"""Stop a run cleanly on SIGTERM or SIGINT: finish the step, save, exit with ``EXIT_PREEMPTED``.

Schedulers (SLURM, Kubernetes, ...) send SIGTERM some time before they kill a job;
Ctrl-C sends SIGINT. While ``Trainer.fit`` runs, ``StopSignals.arm()`` replaces the
handlers of both with one that only records the signal, so the step in flight
finishes. After every optimizer step, every rank of the world calls
``should_stop()``: an all-reduce (max) of one integer, the signal number this rank
received (0: none), over the whole world, outside the step's own communication. So a
signal that reached any one rank stops every rank after the same step, whatever the
layout (data, expert, tensor or pipeline parallel) and whichever ranks the scheduler
signalled. The trainer then writes the last (partial) log window, saves a checkpoint
of that step, prints::

    stopping after step 7 of 20: SIGTERM received by rank 1; saving a checkpoint
    stopped by SIGTERM after step 7 of 20; checkpoint: /abs/out/checkpoints/step_00000007; exit code 75; ...

and ``python -m moe.train`` exits with ``EXIT_PREEMPTED`` (75) on every rank: 75 is
``EX_TEMPFAIL`` of sysexits.h ("try again later"), distinct from 0 (the run
finished), 1 (an error), 2 (a config error) and 128 + n (killed by signal n).
``train.resume: auto`` in the same ``train.out_dir`` continues from the checkpoint,
with the same numbers as a run that was never stopped.

More signals while stopping are counted, not obeyed: torchrun forwards the signal it
got to workers that already got it from the terminal or the scheduler, and a second
SIGTERM must not cut the checkpoint short. SIGKILL (or Ctrl-\\, SIGQUIT) stops at
once. A signal during the last step, the final evaluation or the final save changes
nothing: the run ends as usual (exit 0). The previous handlers are back when ``fit``
returns. Signals reach Python in the main thread only: ``fit`` run from another
thread leaves the handlers alone.
"""
from __future__ import annotations

import signal
import threading
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from parallel.objects import all_gather_objects

__all__ = ["EXIT_PREEMPTED", "STOP_SIGNALS", "StopSignals"]

EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _ranks(ranks: List[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"ranks 0-2, 5"``; ``[3]`` -> ``"rank 3"``."""
    spans: List[List[int]] = []
    for r in ranks:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)
    return ("rank " if len(ranks) == 1 else "ranks ") + text


class StopSignals:
    """SIGTERM/SIGINT recorded by a handler, and the world's agreement to stop at a step boundary.

    ``received``: the first stop signal this process got (None: none yet); ``count``: how
    many it got. After ``should_stop()`` returned True: ``stopped_by`` (the signal's name,
    the highest-numbered one when ranks got different ones) and ``receivers`` (the ranks
    that got one).
    """

    def __init__(self, world_size: int = 1):
        self.world = world_size
        self.received: Optional[int] = None
        self.count = 0
        self.stopped_by: Optional[str] = None
        self.receivers: List[int] = []
        self._previous: Dict[int, Any] = {}

    def _record(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum
        self.count += 1

    def arm(self) -> None:
        """Record SIGTERM and SIGINT instead of dying, until ``disarm()`` (main thread only)."""
        if threading.current_thread() is threading.main_thread() and not self._previous:
            self._previous = {s: signal.signal(s, self._record) for s in STOP_SIGNALS}

    def disarm(self) -> None:
        """Put the handlers ``arm()`` replaced back (idempotent)."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def should_stop(self) -> bool:
        """True on every rank when any rank received a stop signal (collective over the world).

        Every rank of the world must call it at the same point of the same step. A signal
        arriving after this rank's contribution counts at the next call, on every rank alike.
        """
        mine = int(self.received or 0)
        agreed = mine
        if self.world > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            flag = torch.tensor([mine], dtype=torch.int64, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            agreed = int(flag.item())
        if agreed and self.stopped_by is None:
            self.stopped_by = signal.Signals(agreed).name
            every = all_gather_objects(mine) if self.world > 1 else [mine]
            self.receivers = [r for r, s in enumerate(every) if s]
        return bool(agreed)

    def _who(self) -> str:
        return "this process" if self.world == 1 else _ranks(self.receivers)

    def stopping_line(self, step: int, steps: int) -> str:
        """What the job prints when the ranks agreed to stop, before the checkpoint is written."""
        return f"stopping after step {step} of {steps}: {self.stopped_by} received by {self._who()}; saving a checkpoint"

    def stopped_line(self, step: int, steps: int, checkpoint: str) -> str:
        """The job's last line after a stop: where the checkpoint is, the exit code, how to continue."""
        return (f"stopped by {self.stopped_by} after step {step} of {steps}; checkpoint: {checkpoint}; "
                f"exit code {EXIT_PREEMPTED}; continue with train.resume: auto in the same train.out_dir")
