"""Per-rank memory accounting (``engine.memory()``): the trainer's log / memory.json and tools/memory_report.py.

Oracle: the one-process model of the same config, its parameters split by hand (expert parameters
over ep, everything else replicated); stage 0 keeps a gradient of every parameter and AdamW's
exp_avg + exp_avg_sq (two tensors of the parameter's size) plus a 4-byte fp32 ``step`` per parameter.
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from tests.helpers.layout import ROOT, TINY_LM, run_layout

pytestmark = pytest.mark.distributed


def _expected(config: dict, ep: int) -> dict:
    from moe.trainer.config import from_dict
    from moe.trainer.setup import make_task

    task = make_task(from_dict(copy.deepcopy(config)), None, torch.device("cpu"))
    params = tensors = 0
    for name, p in task.model.named_parameters():
        nbytes = p.numel() * p.element_size()
        params += nbytes // ep if ".experts." in name else nbytes
        tensors += 1
    return {"params": params, "grads": params, "optimizer": 2 * params + 4 * tensors}


def test_the_trainer_reports_every_ranks_memory_after_the_first_step(tmp_path):
    run = run_layout(TINY_LM, 1, tmp_path)
    line = [ln for ln in run.stdout.splitlines() if ln.startswith("memory per rank after step 1")]
    assert line, run.stdout[-1500:]
    with open(os.path.join(tmp_path, "run", "memory.json")) as f:
        saved = json.load(f)
    assert saved["step"] == 1 and saved["bytes_per_rank"] == [_expected(TINY_LM, 1)]


def test_memory_report_splits_the_experts_over_ep_without_training(tmp_path):
    import yaml

    sys_path = os.path.join(ROOT, "tools")
    import sys

    sys.path.insert(0, sys_path)
    try:
        import memory_report
    finally:
        sys.path.remove(sys_path)
    config = copy.deepcopy(TINY_LM)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    from moe.trainer.memory import measure

    rows = measure(str(path), 2, ["parallel.ep=2"])
    assert rows == [_expected(TINY_LM, 2)] * 2
    single = _expected(TINY_LM, 1)
    assert rows[0]["params"] < single["params"]  # the experts really are split
    assert memory_report.main(["--config", str(path), "--world", "2", "--set", "parallel.ep=3"]) == 2
