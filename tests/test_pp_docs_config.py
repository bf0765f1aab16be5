"""examples/configs/multinode_tp_pp_ep.yaml (docs/pipeline_parallelism.md) validates through a real
``python -m moe.train --print-config`` at the world size its header names (4 nodes x 8 GPUs)."""
from __future__ import annotations

import os
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples", "configs", "multinode_tp_pp_ep.yaml")


def _print_config(path: str, world: int) -> subprocess.CompletedProcess:
    """``moe.train --print-config`` as rank 0 of a launch of ``world`` processes (no process group is made)."""
    launch = {"WORLD_SIZE": str(world), "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost",
              "MASTER_PORT": "29500"}
    env = {**os.environ, **launch, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "moe.train", "--config", path, "--print-config"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def test_multinode_pipeline_example_validates_at_world_32():
    r = _print_config(CONFIG, 32)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["parallel"] == {"ep": 8, "tp": 2, "pp": 2, "etp": 1, "sequence_parallel": True,
                               "pp_schedule": "interleaved_1f1b", "virtual_stages": 2, "pp_blocks": None,
                               "zero_stage": 0, "zero_engine": "auto", "backend": "auto", "timeout_s": 600.0}
    assert cfg["task"] == {"name": "lm"}
    assert (cfg["model"]["n_layers"], cfg["model"]["moe"]["num_experts"]) == (16, 32)
