"""Tensor parallelism end to end through ``python -m moe.train``: the layout oracle of the global batch.

Same ``train.global_batch_size`` (8) and ``train.micro_batch_size`` (2), 5 optimizer steps,
fp32. The byte-level LM under tp=2, tp=2 with sequence parallelism, etp=2 (experts only)
and ep=2 x tp=2 (world 4; dropless, and GShard at capacity factor 1.0 with drops) logs the
same ``train/loss`` at every step as ONE process with gradient accumulation and ends with
the same parameters (gathered from the DCP checkpoint), within 1e-4 relative. The dropless
setup clips every step at 0.05, so the global gradient norm (each parameter counted
once) is checked too. LIMoE at tp=2 equals the run with the same dp size (1) and no tp.
A checkpoint saved at tp=2 evaluates the same at tp=1, and one saved at tp=1 the same at tp=2.
"""
from __future__ import annotations


import pytest

from tests.helpers.layout import (
    TINY_LIMOE,
    TINY_LM,
    assert_reload_across,
    assert_same_training,
    assert_same_with_drops,
    run_layout,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LM = TINY_LM


@pytest.fixture(scope="module")
def lm_oracle(tmp_path_factory):
    return run_layout(LM, 1, tmp_path_factory.mktemp("lm_single"))


@pytest.mark.parametrize("nproc,overrides", [
    (2, ["parallel.tp=2"]),
    (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    (2, ["parallel.etp=2"]),
    (4, ["parallel.tp=2", "parallel.ep=2"]),
], ids=["tp2", "tp2-sp", "etp2", "ep2-tp2"])
def test_lm_under_tensor_parallelism_trains_like_one_process(nproc, overrides, lm_oracle, tmp_path):
    run = run_layout(LM, nproc, tmp_path, overrides=overrides)
    for key in ("tp", "etp"):  # the run really used the layout (the trainer's start-up line names it)
        if f"parallel.{key}=2" in overrides:
            assert f" {key}=2" in run.stdout, run.stdout[:400]
    assert_same_training(run, lm_oracle, rtol=1e-4)


def test_ep_tp_with_capacity_drops_trains_like_one_process(tmp_path):
    assert_same_with_drops(LM, 4, ["parallel.tp=2", "parallel.ep=2"], tmp_path)


def test_limoe_under_tensor_parallelism_trains_like_no_tp(tmp_path):
    oracle = run_layout(TINY_LIMOE, 1, tmp_path / "single")
    run = run_layout(TINY_LIMOE, 2, tmp_path / "tp2", overrides=["parallel.tp=2"])
    assert_same_training(run, oracle, rtol=1e-4)


@pytest.mark.parametrize("save_tp,load_tp", [(2, 1), (1, 2)])
def test_checkpoint_reloads_across_tp_with_equal_evaluation(save_tp, load_tp, tmp_path):
    assert_reload_across(LM, "tp", save_tp, load_tp, tmp_path)
