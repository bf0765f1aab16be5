"""ZeRO stages 2 and 3 on FSDP2 (``parallel.zero_fsdp``) end to end through ``python -m moe.train``.

The layout oracle of the global batch: same ``train.global_batch_size`` (8) and
``train.micro_batch_size`` (2), 5 optimizer steps, fp32, the tiny byte-level LM clipped at
0.05 every step (so the global gradient norm counts). Under zero 2 and zero 3 at world 2
and world 4, and ep=2 x zero 3 at world 4 (experts sharded over the expert-data-parallel
ranks, dense parameters over the data-parallel ones), it logs the same ``train/loss`` and
gradient norm at every step as ONE process with gradient accumulation and ends with the
same parameters (from the DCP checkpoint), within 1e-4 relative. LIMoE (a 0-d logit scale
kept replicated, blocks run piecewise) under ep=2 x zero 3 equals zero 0 at the same dp.

Checkpoints: every run also saves at step 3. A zero-3 checkpoint loads at zero 0 (one
process) with the same parameters and evaluation, and its step-3 checkpoint continues at
zero 0 to the oracle's steps 4-5 and final parameters (the sharded optimizer state was
saved whole); a zero-0 checkpoint continues under zero 3 at ep=2 (a 1-rank expert mesh)
likewise.

Memory: at world 4 with ep=2 (dp 4, edp 2) the bytes of dense parameters, gradients and
AdamW moments on each rank are the stage-0 figure / dp, those of experts the stage-0 figure
/ edp (exactly over the ranks together; per rank within the rounding of pieces of
ceil(dim0 / size) rows), counted from the live tensors of the stage-0 and the ZeRO engines
in one run; ``engine.memory()`` reports those figures.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.layout import (
    TINY_LIMOE,
    TINY_LM,
    assert_same_training,
    final_eval,
    relative_error,
    run_layout,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LM = copy.deepcopy(TINY_LM)
LM["train"]["checkpoint_every"] = 3  # a checkpoint at step 3 to continue from, and the final one at 5
ZERO3 = ["parallel.zero_stage=3"]  # zero_engine auto: FSDP2


@pytest.fixture(scope="module")
def lm_oracle(tmp_path_factory):
    return run_layout(LM, 1, tmp_path_factory.mktemp("lm_single"))


@pytest.fixture(scope="module")
def zero3_w2(tmp_path_factory):
    return run_layout(LM, 2, tmp_path_factory.mktemp("zero3_w2"), overrides=ZERO3)


@pytest.mark.parametrize("nproc,overrides", [
    (2, ["parallel.zero_stage=2", "parallel.zero_engine=fsdp2"]),
    (2, ZERO3),
    (4, ["parallel.zero_stage=2", "parallel.zero_engine=fsdp2"]),
    (4, ZERO3),
    (4, ZERO3 + ["parallel.ep=2"]),
], ids=["zero2-w2", "zero3-w2", "zero2-w4", "zero3-w4", "ep2-zero3-w4"])
def test_lm_under_fsdp2_trains_like_one_process(nproc, overrides, lm_oracle, request, tmp_path):
    run = request.getfixturevalue("zero3_w2") if (nproc, overrides) == (2, ZERO3) else \
        run_layout(LM, nproc, tmp_path, overrides=overrides)
    stage = overrides[0].split("=")[1]
    assert f"ZeRO stage {stage} on fsdp2" in run.stdout, run.stdout[:600]  # the start-up line names it
    assert_same_training(run, lm_oracle, rtol=1e-4)


def _continue(config, nproc: int, checkpoint: str, overrides, out_dir):
    """``config`` resumed from ``checkpoint`` (step 3) up to step 5."""
    resumed = copy.deepcopy(dict(config))
    resumed["train"] = {**resumed["train"], "resume": checkpoint}
    run = run_layout(resumed, nproc, out_dir, overrides=overrides)
    assert f"resumed from {checkpoint} at step 3" in run.stdout, run.stdout[-2000:]
    return run


def _assert_continues_like(run, oracle) -> None:
    """``run`` (resumed at step 3) trained steps 4 and 5 like ``oracle`` and ended with its parameters."""
    assert [r["step"] for r in run.metrics] == [4, 5]
    for a, b in zip(run.metrics, oracle.metrics[3:]):
        for key in ("train/loss", "train/grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-4 * abs(b[key]), (a["step"], key, a[key], b[key])
    for name, want in oracle.params.items():
        assert relative_error(run.params[name], want) <= 1e-4, name


def _step3(run) -> str:
    path = os.path.join(os.path.dirname(run.checkpoint), "step_00000003")
    assert os.path.isdir(path), path
    return path


def test_zero3_checkpoint_loads_and_continues_at_zero0(zero3_w2, lm_oracle, tmp_path):
    # the final checkpoint: nothing left to train, the same parameters and evaluation at zero 0
    final = copy.deepcopy(LM)
    final["train"]["resume"] = zero3_w2.checkpoint
    loaded = run_layout(final, 1, tmp_path / "final")
    assert f"resumed from {zero3_w2.checkpoint} at step 5" in loaded.stdout
    assert loaded.metrics == []
    a, b = final_eval(zero3_w2, 5), final_eval(loaded, 5)
    assert abs(b["eval/val_loss"] - a["eval/val_loss"]) <= 1e-5 * abs(a["eval/val_loss"])
    for name in zero3_w2.params:
        assert loaded.params[name].equal(zero3_w2.params[name]), name
    # step 3: the sharded AdamW moments were saved whole, so zero 0 continues like the oracle
    _assert_continues_like(_continue(LM, 1, _step3(zero3_w2), [], tmp_path / "continued"), lm_oracle)


def test_zero0_checkpoint_continues_under_ep2_zero3(lm_oracle, tmp_path):
    run = _continue(LM, 2, _step3(lm_oracle), ZERO3 + ["parallel.ep=2"], tmp_path)  # edp = 1
    _assert_continues_like(run, lm_oracle)


def test_limoe_under_ep2_zero3_trains_like_zero0(tmp_path):
    oracle = run_layout(TINY_LIMOE, 2, tmp_path / "zero0")
    run = run_layout(TINY_LIMOE, 2, tmp_path / "zero3", overrides=ZERO3 + ["parallel.ep=2"])
    assert_same_training(run, oracle, rtol=1e-4)
    a, b = oracle.evals[-1], run.evals[-1]
    for key in ("eval/zero_shot_accuracy", "eval/val_contrastive_loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


# ---- memory ---------------------------------------------------------------------------------
def _held(engine) -> dict:
    """Bytes of the live tensors this rank holds (a DTensor's local shard), dense and expert apart."""
    from parallel.grads import is_expert_param

    def nbytes(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    out = {f"{kind}_{what}": 0 for kind in ("dense", "expert") for what in ("params", "grads", "moments")}
    steps = 0
    for p in engine.model.parameters():
        kind = "expert" if is_expert_param(p) else "dense"
        out[f"{kind}_params"] += nbytes(p)
        out[f"{kind}_grads"] += nbytes(p.grad)
        state = engine.optimizer.state[p]
        out[f"{kind}_moments"] += nbytes(state["exp_avg"]) + nbytes(state["exp_avg_sq"])
        steps += nbytes(state["step"])
    out["steps"] = steps
    return out


def _shard_bounds(engine, dp: int, edp: int) -> dict:
    """The fewest and the most parameter bytes a rank can hold when every tensor of the (stage-0) model is
    cut along dim 0 into ``size`` pieces of ceil(dim0 / size) rows (dense: size dp, experts: edp)."""
    from parallel.grads import is_expert_param

    out = {f"{kind}_{end}": 0 for kind in ("dense", "expert") for end in ("lo", "hi")}
    for p in engine.model.parameters():
        kind, size = ("expert", edp) if is_expert_param(p) else ("dense", dp)
        rows, row_bytes = p.shape[0], p[0].numel() * p.element_size()
        chunk = -(-rows // size)
        out[f"{kind}_hi"] += chunk * row_bytes
        out[f"{kind}_lo"] += max(0, rows - chunk * (size - 1)) * row_bytes
    return out


def _memory_on_rank(rank: int, world: int, out_dir: str) -> dict:
    from moe.trainer.config import from_dict
    from moe.trainer.loop import Trainer
    from parallel.launch import build_groups

    figures = {}
    for stage in (0, 2, 3):
        raw = copy.deepcopy(LM)
        raw["parallel"] = {"ep": 2, "zero_stage": stage, **({"zero_engine": "fsdp2"} if stage else {})}
        raw["train"]["out_dir"] = os.path.join(out_dir, f"zero{stage}")
        cfg = from_dict(raw)
        trainer = Trainer(cfg, groups=build_groups(2), device="cpu", log=lambda line: None)
        trainer.model.train()
        trainer._forward_backward()  # one step at learning rate 0: every gradient and moment exists
        trainer.engine.clip_grad_norm(None)
        trainer.engine.step(0.0)
        figures[stage] = _held(trainer.engine)
        if not stage:
            figures[stage].update(_shard_bounds(trainer.engine, world, world // 2))
        if stage:
            figures[stage]["memory"] = trainer.engine.memory()
    return figures


def test_memory_per_rank_shrinks_by_the_data_parallel_factors(tmp_path):
    ranks = run_distributed(_memory_on_rank, 4, str(tmp_path), timeout=300)  # dp 4, ep 2, edp 2
    edp_groups = [[0, 2], [1, 3]]
    for stage in (2, 3):
        for what, factor in (("params", 1), ("grads", 1), ("moments", 2)):  # moments: exp_avg and exp_avg_sq
            # every dense element is held by exactly one of the dp ranks, every expert element by one rank
            # of its edp group: the stage-0 figure of one rank, split
            assert sum(r[stage][f"dense_{what}"] for r in ranks) == ranks[0][0][f"dense_{what}"], (stage, what)
            for group in edp_groups:
                assert sum(ranks[i][stage][f"expert_{what}"] for i in group) == ranks[group[0]][0][
                    f"expert_{what}"], (stage, what, group)
            for rank, figures in enumerate(ranks):  # ... in dp (edp) pieces of ceil(dim0 / dp) rows
                for kind in ("dense", "expert"):
                    lo, hi = figures[0][f"{kind}_lo"] * factor, figures[0][f"{kind}_hi"] * factor
                    assert lo <= figures[stage][f"{kind}_{what}"] <= hi, (rank, stage, kind, what, figures)
    for rank, figures in enumerate(ranks):
        zero0 = figures[0]
        assert zero0["dense_hi"] * 3 < zero0["dense_params"] and zero0["expert_hi"] * 2 == zero0["expert_params"]
        for stage in (2, 3):  # FSDP2 holds only shards between steps at stage 2 too (module doc)
            held = figures[stage]
            assert held["steps"] == zero0["steps"]  # AdamW's step counters: a 4-byte scalar per parameter
            assert held["memory"] == {
                "params": held["dense_params"] + held["expert_params"],
                "grads": held["dense_grads"] + held["expert_grads"],
                "optimizer": held["dense_moments"] + held["expert_moments"] + held["steps"]}, (rank, stage)
    assert torch.tensor([r[0]["dense_params"] for r in ranks]).unique().numel() == 1  # replicated at zero 0
