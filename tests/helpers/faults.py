"""``python -m moe.train`` with a fault injected at a chosen step, for the preemption tests.

    MOE_TEST_FAULT="SIGTERM@3:1" python -m tests.helpers.faults --config run.yaml [--set ...]

runs ``moe.train.main`` (same arguments, same exit status) in a process that, on
the listed ranks, acts while optimizer step 3 (1-based) runs, before its forward:

- ``SIGTERM@3:1`` / ``SIGINT@3:0,1``: the rank sends itself that signal (the
  trainer's handler records it; the step goes on);
- ``SIGKILL@3:1:/path/marker``: the rank kills itself with SIGKILL, once: only when
  ``marker`` does not exist yet (it is created first), so a restarted job runs through;
- ``HANG@3:1``: the rank sleeps for an hour (its peers wait in a collective).

The hook wraps ``Trainer._forward_backward``, which every layout calls once per step
on every rank; nothing in the trainer knows about it.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional, Tuple

ENV = "MOE_TEST_FAULT"


@dataclass(frozen=True)
class Fault:
    action: str  # SIGTERM | SIGINT | SIGKILL | HANG
    step: int  # 1-based optimizer step during which it happens
    ranks: Tuple[int, ...]
    marker: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> "Fault":
        action, _, rest = text.partition("@")
        step, _, rest = rest.partition(":")
        ranks, _, marker = rest.partition(":")
        if action not in ("SIGTERM", "SIGINT", "SIGKILL", "HANG") or not step.isdigit() or not ranks:
            raise ValueError(f"{ENV}={text!r}: expected ACTION@STEP:RANK[,RANK...][:MARKER]")
        if action == "SIGKILL" and not marker:
            raise ValueError(f"{ENV}={text!r}: SIGKILL needs a marker file (it must happen once)")
        return cls(action, int(step), tuple(int(r) for r in ranks.split(",")), marker or None)

    def fire(self) -> None:
        if self.action == "HANG":
            time.sleep(3600)
        elif self.action == "SIGKILL":
            if os.path.exists(self.marker):
                return
            with open(self.marker, "w") as f:
                f.write(f"rank {os.environ.get('RANK', '0')} killed itself\n")
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            os.kill(os.getpid(), getattr(signal, self.action))


def install(fault: Fault) -> None:
    from moe.trainer.loop import Trainer

    original = Trainer._forward_backward

    def forward_backward(self):
        if self.step + 1 == fault.step and self.rank in fault.ranks:
            fault.fire()
        return original(self)

    Trainer._forward_backward = forward_backward


def main() -> int:
    from moe.train import main as train_main

    if os.environ.get(ENV):
        install(Fault.parse(os.environ[ENV]))
    return train_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
