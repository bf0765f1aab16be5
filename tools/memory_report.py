"""Per-rank memory of a config's layout, without training: parameters, gradients, optimizer state.

    python tools/memory_report.py --config examples/configs/tiny_switch_lm.yaml --world 2 \
        --set parallel.ep=2 [--set parallel.zero_stage=2 ...]

Starts ``--world`` CPU processes (gloo on loopback), builds the job exactly as ``python -m
moe.train`` would (layout checks, process groups, the task's stage of the model, the engine
of ``parallel.zero_stage``), runs ONE forward and backward of the first step and an optimizer
step at learning rate 0 (so every gradient buffer and optimizer state exists; no weight
changes, nothing is written), and prints each rank's ``engine.memory()``: the bytes of the
live tensors it holds, the same figures the trainer logs after its first step (and writes to
``<out_dir>/memory.json``). With ``--json`` it prints them as JSON instead of a table.

It runs the model on this machine's CPU: a config sized for a GPU cluster needs that much
host memory per process (shrink ``model`` with ``--set`` to see how the layout splits it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _table(rows: List[Dict[str, int]]) -> str:
    lines = [f"{'rank':>4}  {'params MiB':>11}  {'grads MiB':>10}  {'optimizer MiB':>13}  {'total MiB':>10}"]
    for r, m in enumerate(rows):
        total = m["params"] + m["grads"] + m["optimizer"]
        lines.append(f"{r:>4}  {m['params'] / 2**20:>11.3f}  {m['grads'] / 2**20:>10.3f}  "
                     f"{m['optimizer'] / 2**20:>13.3f}  {total / 2**20:>10.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="YAML config (as for python -m moe.train)")
    ap.add_argument("--world", type=int, default=1, help="number of processes (the launch's world size)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override a config value (repeatable)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    if args.world < 1:
        ap.error(f"--world must be >= 1, got {args.world}")
    from parallel.checks import ConfigError
    from moe.trainer.config import load_config
    from moe.trainer.layout import check_layout

    try:  # a bad config or layout stops here, before any process starts
        check_layout(load_config(args.config, args.overrides), args.world)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from moe.trainer.memory import measure

    rows = measure(args.config, args.world, args.overrides)
    print(json.dumps(rows) if args.json else _table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
