"""Train a MoE model from a YAML config.

    python -m moe.train --config examples/configs/tiny_switch_lm.yaml --set train.steps=50
    torchrun --standalone --nproc_per_node=4 -m moe.train --config examples/configs/tiny_limoe.yaml
    srun python -m moe.train --config ...        # one task per rank, no torchrun

``--set key.path=value`` (repeatable) overrides a config value; the value is read
as YAML (``3``, ``1.0e-3``, ``true``, ``null``, ``[0.9, 0.99]``). ``--print-config``
prints the validated config, with the model and data sections resolved (preset
expanded, every default shown; the values of secret-looking keys such as ``hf_token``
or ``api_key`` masked, see ``moe/trainer/redact.py``), and exits. A bad value in any section exits with
status 2 and one ``config error:`` line naming its key path, before any process
group or weight exists; so does a parallel layout (``parallel.tp`` / ``ep`` / ``etp``
/ ``sequence_parallel``) that does not fit the launch's world size or the model
(``moe/trainer/layout.py``). See ``moe/trainer/config.py`` for every key.

Exit status: 0 when the run finished its steps; 2 for a config error; 3 for a checkpoint
problem (a fresh run in an out_dir holding another run's checkpoints, a damaged checkpoint,
one that does not fit the model), with one ``checkpoint error:`` line; 75
(``EXIT_PREEMPTED``) on every rank when SIGTERM or SIGINT stopped it after a step and
a checkpoint (``moe/trainer/preemption.py``; ``train.resume: auto`` continues it); 1
(a traceback) for any other error.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

from moe.trainer.checkpoint import CheckpointError
from moe.trainer.config import ConfigError, TrainConfig, load_config, resolved_yaml
from moe.trainer.layout import check_layout
from moe.trainer.loop import run
from moe.trainer.preemption import EXIT_PREEMPTED
from moe.trainer.schedule import StepSchedule
from parallel.launch import LaunchError, detect_launch


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moe.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value (repeatable), e.g. --set train.steps=20")
    p.add_argument("--print-config", action="store_true", help="print the validated config and exit")
    return p.parse_args(argv)


def check_launch_layout(cfg: TrainConfig) -> None:
    """The layout must fit the launch's world size and the model; the global batch must split
    into whole micro-batches on the data-parallel size.

    The world size comes from the launcher's environment (torchrun, SLURM, or 1), so a
    bad combination (``moe.trainer.layout.check_layout``: tp / ep / etp against the world
    size, heads, FFN widths, experts and sequence length) fails here with one line
    instead of on every rank after start-up.
    """
    try:
        world = detect_launch().world_size
    except LaunchError:
        return  # the launch itself is inconsistent: init_distributed reports it
    dims = check_layout(cfg, world)
    StepSchedule.from_config(cfg.train, dims.dp, 0)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:  # every section, before any process group or weight exists
        cfg = load_config(args.config, args.overrides)
        text = resolved_yaml(cfg, redacted=True)
        check_launch_layout(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(text, end="")
        device = cfg.train.device if cfg.train.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        for line in cfg.effective_lines(device):
            print(f"# effective: {line}")
        return 0
    try:
        result = run(cfg)
    except CheckpointError as e:  # refused out_dir, damaged or unfitting checkpoint: the message says why
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 3
    return EXIT_PREEMPTED if result.stopped_by else 0


if __name__ == "__main__":
    sys.exit(main())
