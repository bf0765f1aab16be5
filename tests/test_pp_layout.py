"""Pipeline parallelism end to end through ``python -m moe.train``: the layout oracle of the global batch.

Same ``train.global_batch_size`` (8) and ``train.micro_batch_size`` (2), 5 optimizer steps,
fp32, the byte-level LM with 4 blocks (MoE blocks 1 and 3). Under pp=2 with each schedule
(GPipe, 1F1B, interleaved 1F1B with 2 virtual stages), ep=2 x pp=2 (world 4; dropless, and
GShard at capacity factor 1.0 with drops, whose drop rate averages the MoE layers of BOTH
stages) and ep=2 x tp=2 x pp=2 (world 8) it logs the same ``train/loss``, gradient norm,
drop rate and routed-token count at every step as ONE process with gradient accumulation
over the same micro-batches, and ends with the same parameters (from the DCP checkpoint),
within 1e-4 relative. LIMoE at pp=2 equals the run with the same dp size (1) without pp.
A checkpoint saved at pp=2 evaluates the same at pp=1, and one saved at pp=1 the same at pp=2.
"""
from __future__ import annotations

import copy

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

LM = copy.deepcopy(TINY_LM)
LM["model"]["n_layers"] = 4  # MoE blocks 1 and 3: one on each stage at pp=2, every chunk one block when interleaved


@pytest.fixture(scope="module")
def lm_oracle(tmp_path_factory):
    return run_layout(LM, 1, tmp_path_factory.mktemp("lm_single"))


@pytest.mark.parametrize("nproc,overrides", [
    (2, ["parallel.pp=2", "parallel.pp_schedule=gpipe"]),
    (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
    (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.virtual_stages=2"]),
    (4, ["parallel.pp=2", "parallel.ep=2"]),
    (8, ["parallel.pp=2", "parallel.ep=2", "parallel.tp=2"]),
], ids=["pp2-gpipe", "pp2-1f1b", "pp2-interleaved", "ep2-pp2", "ep2-tp2-pp2"])
def test_lm_under_pipeline_parallelism_trains_like_one_process(nproc, overrides, lm_oracle, tmp_path):
    run = run_layout(LM, nproc, tmp_path, overrides=overrides)
    assert " pp=2 (" in run.stdout, run.stdout[:600]  # the trainer's start-up line names the pipeline
    assert_same_training(run, lm_oracle, rtol=1e-4)


def test_limoe_under_pipeline_parallelism_trains_like_no_pp(tmp_path):
    oracle = run_layout(TINY_LIMOE, 1, tmp_path / "single")
    run = run_layout(TINY_LIMOE, 2, tmp_path / "pp2", overrides=["parallel.pp=2"])
    assert_same_training(run, oracle, rtol=1e-4)
    a, b = oracle.evals[-1], run.evals[-1]  # the relayed evaluation scores the same model the same
    for key in ("eval/zero_shot_accuracy", "eval/val_contrastive_loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_ep_pp_with_capacity_drops_trains_like_one_process(tmp_path):
    assert_same_with_drops(LM, 4, ["parallel.pp=2", "parallel.ep=2"], tmp_path)


@pytest.mark.parametrize("save_pp,load_pp", [(2, 1), (1, 2)])
def test_checkpoint_reloads_across_pp_with_equal_evaluation(save_pp, load_pp, tmp_path):
    assert_reload_across(LM, "pp", save_pp, load_pp, tmp_path)


def test_a_non_finite_loss_stops_every_stage_with_a_clear_error(tmp_path):
    """The last stage computes the loss; the logs gathered over the stages let every rank stop, none hangs.
    (The routers skip non-finite logits here, so the loss itself turns non-finite.)"""
    with pytest.raises(AssertionError, match=r"FloatingPointError: loss is (nan|inf) at step \d+ on rank [01]"):
        run_layout(LM, 2, tmp_path / "loss", overrides=[
            "parallel.pp=2", "optim.lr=1e30", "optim.grad_clip=null", "model.moe.router.on_nonfinite=skip"],
                   timeout=120)


def test_an_error_inside_a_stage_is_raised_as_itself(tmp_path):
    """A stage's own error (the router's non-finite guard) surfaces as in one process, not as torch's wrapper."""
    with pytest.raises(AssertionError, match=r"FloatingPointError: blocks\.\d\.moe: router logits are not finite"):
        run_layout(LM, 2, tmp_path / "router", overrides=["parallel.pp=2", "optim.lr=1e30", "optim.grad_clip=null"],
                   timeout=120)
