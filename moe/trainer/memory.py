"""Per-rank memory of a config's layout without training (``tools/memory_report.py`` is its command line).

``measure(config, world, overrides)`` starts ``world`` CPU processes (gloo on loopback), builds
the job as ``python -m moe.train`` would (layout checks, process groups, this rank's stage of
the model, the engine of ``parallel.zero_stage``), runs ONE forward and backward of the first
step and an optimizer step at learning rate 0 (every gradient buffer and optimizer state then
exists; no weight changes, nothing is kept on disk) and returns each rank's
``engine.memory()``: the bytes of the live tensors it holds, the figures the trainer logs after
its first step.
"""
from __future__ import annotations

import tempfile
from typing import Dict, List

from parallel.launch import build_groups
from parallel.spawn import run_distributed

from .config import load_config
from .layout import check_layout
from .loop import Trainer

__all__ = ["measure"]


def _one_rank(rank: int, world: int, config: str, overrides: List[str], out_dir: str) -> Dict[str, int]:
    quiet = ["telemetry.tensorboard=false", "telemetry.plots=false", "telemetry.progress_bar=false",
             "telemetry.gpu_stats=false", "train.device=cpu", f"train.out_dir={out_dir}"]
    cfg = load_config(config, list(overrides) + quiet)
    check_layout(cfg, world)
    p = cfg.parallel
    groups = build_groups(p.ep, tp=p.tp, pp=p.pp, etp=p.etp, sequence_parallel=p.sequence_parallel)
    trainer = Trainer(cfg, groups=groups, device="cpu", log=lambda line: None)
    trainer.model.train()
    trainer._forward_backward()
    trainer.engine.clip_grad_norm(None)
    trainer.engine.step(0.0)
    return {k: int(v) for k, v in trainer.engine.memory().items()}


def measure(config: str, world: int, overrides: List[str]) -> List[Dict[str, int]]:
    """Every rank's ``engine.memory()`` after one step at learning rate 0 (see the module doc)."""
    with tempfile.TemporaryDirectory() as out_dir:
        return run_distributed(_one_rank, world, config, list(overrides), out_dir, timeout=600)
