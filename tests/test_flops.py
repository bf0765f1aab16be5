"""Model FLOPs and MFU (issue 12, throughput part): the formula against a hand count, the metrics row,
the GPU peak lookup, and the trainer's log."""
from __future__ import annotations

import copy

import pytest

from tests.helpers.layout import TINY_LM, run_layout


def _tiny_lm(**moe):
    from moe.models.lm import LMConfig

    d = copy.deepcopy(TINY_LM["model"])
    d["moe"].update(moe)
    return LMConfig.from_dict(d)


def test_lm_forward_flops_equal_a_hand_count():
    """D=32, L=32, V=259; block 0 dense gelu F=64, block 1 MoE top-2 of E=4 experts of F=64."""
    D, L, V, F, E = 32, 32, 259, 64, 4
    dense = 8 * D * D + 4 * L * D + 2 * (2 * D * F)
    moe = 8 * D * D + 4 * L * D + 2 * 2 * (2 * D * F) + 2 * D * E
    assert (dense, moe) == (20480, 28928)
    assert _tiny_lm().flops_per_sample() == L * (dense + moe + 2 * D * V)
    assert _tiny_lm().flops_per_sample(16) == 16 * (dense + moe - 2 * 4 * 16 * D + 2 * D * V)


def test_top_1_routing_counts_one_expert():
    """Active parameters: the MoE FFN term scales with k (top-1 is half of top-2's FFN FLOPs)."""
    top2 = _tiny_lm().transformer.block_flops_per_token(32)[1]
    top1 = _tiny_lm(router={"policy": "topk", "top_k": 1}).transformer.block_flops_per_token(32)[1]
    assert top2 - top1 == 2 * (2 * 32 * 64)


def test_train_row_reports_model_tflops_and_mfu():
    from moe.trainer.sinks import format_train_line, train_row

    row = train_row(3, 1e-3, {"loss": 1.0}, seconds=2.0, samples=100, routing=[], hardware={},
                    flops_per_sample=1e9, samples_per_step=50, peak_flops=1e12)
    assert row["train/model_flops_per_step"] == 3 * 1e9 * 50
    assert row["train/model_tflops_per_s"] == pytest.approx(3 * 1e9 * 100 / 2.0 / 1e12)
    assert row["train/mfu"] == pytest.approx(0.15)
    assert "mfu 15.0%" in format_train_line(row, 10)
    assert "train/mfu" not in train_row(3, 1e-3, {"loss": 1.0}, seconds=2.0, samples=100, routing=[], hardware={},
                                        flops_per_sample=1e9, samples_per_step=50)


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("Tesla V100-SXM2-16GB", 125.0), ("NVIDIA GeForce RTX 4090", 165.0),
    ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0), ("Some Future GPU", None), (None, None),
])
def test_peak_lookup_by_nvml_name(name, peak):
    from moe.trainer.telemetry import peak_tflops_for

    assert peak_tflops_for(name) == peak


def test_peak_tflops_must_be_positive():
    from parallel.checks import ConfigError
    from moe.trainer.config import from_dict

    with pytest.raises(ConfigError, match=r"'telemetry.peak_tflops': got 0.0; it must be > 0, or null"):
        from_dict({**TINY_LM, "telemetry": {"peak_tflops": 0.0}})


@pytest.mark.distributed
def test_the_trainer_logs_mfu_against_the_configured_peak(tmp_path):
    run = run_layout(TINY_LM, 1, tmp_path, overrides=["telemetry.peak_tflops=0.5"])
    assert "MFU against 0.5 TFLOP/s per device (telemetry.peak_tflops) x 1 device(s)" in run.stdout
    per_sample = _tiny_lm().flops_per_sample()
    for row in run.metrics:
        assert row["train/model_flops_per_step"] == 3 * per_sample * TINY_LM["train"]["global_batch_size"]
        assert row["train/mfu"] == pytest.approx(row["train/model_tflops_per_s"] / 0.5)


@pytest.mark.distributed
def test_profile_writes_a_trace_of_the_chosen_steps(tmp_path):
    """telemetry.profile {start_step: 2, steps: 2}: one chrome-trace JSON for rank 0 with the steps' ops."""
    import glob
    import json
    import os

    run = run_layout(TINY_LM, 1, tmp_path, overrides=["telemetry.profile={start_step: 2, steps: 2}"])
    assert "profiler: steps 2-3 traced to" in run.stdout
    traces = glob.glob(os.path.join(tmp_path, "run", "profile", "rank0*.pt.trace.json"))
    assert len(traces) == 1, os.listdir(os.path.join(tmp_path, "run", "profile"))
    with open(traces[0]) as f:
        events = json.load(f)["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert any("aten::mm" in n or "aten::addmm" in n for n in names)  # the steps' matrix products were recorded
