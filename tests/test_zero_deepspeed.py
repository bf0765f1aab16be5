"""ZeRO stages 1 and 2 on DeepSpeed (``parallel.zero_deepspeed``) against independent oracles.

Training, through ``python -m moe.train`` (the layout oracle, ``tests.helpers.layout``): the
byte-level LM, 5 steps, fp32, global batch 8 in micro-batches of 2, clipped at 0.05 every
step (so the global gradient norm matters), under zero 1 and zero 2 at world 2 and 4,
ep=2 x zero 2 and tp=2 x zero 2 at world 4, logs the same ``train/loss`` and
``train/grad_norm`` at every step as ONE process with gradient accumulation and ends with
the same parameters, within 1e-4 relative.

Checkpoints (the full optimizer state per parameter key): a run saved at step 3 under
zero 2 and resumed under zero 0 for steps 4-5, and the reverse, end like the uninterrupted
one-process run: the optimizer state (moments, step count) and the fp32 master weights
survive the trip through the per-parameter view.

Memory: each rank's optimizer state (AdamW moments) under stage 1 and 2 is the stage-0
figure of a replicated optimizer, computed here from the live tensors of a stage-0 model,
divided by dp for dense parameters and by edp for experts (world 4, ep=2: dp=4, edp=2).

Cost: DeepSpeed's import adds ~3 s per process; nothing is JIT-compiled (its shared-memory
comm op is skipped, the optimizer is torch's AdamW).
"""
from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.layout import TINY_LM, assert_same_training, run_layout

LM = TINY_LM


@pytest.mark.parametrize("parallel,match", [
    ({"zero_stage": 2, "tp": 2, "sequence_parallel": True},
     r"'parallel.sequence_parallel': got True; DeepSpeed ZeRO \(zero_stage 2\) composes with tensor parallelism "
     r"\(tp\) but not with sequence parallelism or expert tensor parallelism .* or zero_stage 0"),
    ({"zero_stage": 1, "etp": 2}, r"'parallel.etp': got 2; DeepSpeed ZeRO \(zero_stage 1\) composes with tensor"),
])
def test_config_refuses_what_deepspeed_cannot_compose_with(parallel, match):
    from parallel.checks import ConfigError
    from moe.trainer.config import from_dict

    with pytest.raises(ConfigError, match=match):
        from_dict(copy.deepcopy(LM) | {"parallel": parallel})
    accepted = from_dict(copy.deepcopy(LM) | {"parallel": {"zero_stage": 2, "tp": 2, "ep": 2}}).parallel
    assert accepted.zero_engine_name == "deepspeed"


@pytest.fixture(scope="module")
def lm_oracle(tmp_path_factory):
    return run_layout(LM, 1, tmp_path_factory.mktemp("lm_single"))


@pytest.mark.parametrize("nproc,overrides", [
    (2, ["parallel.zero_stage=1"]),
    (2, ["parallel.zero_stage=2"]),
    (4, ["parallel.zero_stage=1"]),
    (4, ["parallel.zero_stage=2"]),
    (4, ["parallel.zero_stage=2", "parallel.ep=2"]),
    (4, ["parallel.zero_stage=2", "parallel.tp=2"]),
], ids=["zero1-w2", "zero2-w2", "zero1-w4", "zero2-w4", "ep2-zero2-w4", "tp2-zero2-w4"])
@pytest.mark.distributed
@pytest.mark.slow
def test_deepspeed_zero_trains_like_one_process(nproc, overrides, lm_oracle, tmp_path):
    run = run_layout(LM, nproc, tmp_path, overrides=overrides)
    stage = overrides[0].split("=")[1]
    assert f"ZeRO stage {stage} on deepspeed" in run.stdout, run.stdout[:600]  # the start-up line names it
    assert_same_training(run, lm_oracle, rtol=1e-4)


def _from_step(run, step: int):
    """``run`` restricted to the steps after ``step`` (what a run resumed at ``step`` logs)."""
    return dataclasses.replace(run, metrics=[r for r in run.metrics if r["step"] > step])


@pytest.mark.parametrize("save_stage,load_stage", [(2, 0), (0, 2)], ids=["zero2-to-zero0", "zero0-to-zero2"])
@pytest.mark.distributed
@pytest.mark.slow
def test_checkpoint_mid_run_resumes_across_zero_stages(save_stage, load_stage, lm_oracle, tmp_path):
    config = copy.deepcopy(LM)
    config["train"] = {**config["train"], "checkpoint_every": 3}
    saved = run_layout(config, 2, tmp_path / "save", overrides=[f"parallel.zero_stage={save_stage}"])
    at_3 = os.path.join(os.path.dirname(saved.checkpoint), "step_00000003")
    assert os.path.isdir(at_3), saved.checkpoint
    config["train"] = {**config["train"], "checkpoint_every": 0, "resume": at_3}
    resumed = run_layout(config, 2, tmp_path / "load", overrides=[f"parallel.zero_stage={load_stage}"])
    assert f"resumed from {at_3} at step 3" in resumed.stdout
    assert_same_training(resumed, _from_step(lm_oracle, 3), rtol=1e-4)


# --------------------------------------------------------------------------------------
def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _touch_all(model):
    """A loss that gives every parameter a gradient."""
    return sum((p.float() ** 2).sum() for p in model.parameters()) * 1e-3, {}


def _memory(rank, world):
    from moe.trainer.config import from_dict
    from moe.trainer.optim import build_optimizer
    from moe.trainer.setup import make_task
    from parallel import ParallelDims, ReplicatedEngine, is_expert_param
    from parallel.zero_deepspeed import DeepSpeedEngine

    cfg = from_dict(copy.deepcopy(LM) | {"parallel": {"ep": 2, "zero_stage": 1}})
    groups = ParallelDims.from_world(world, ep=2).build()
    # stage 0: the replicated optimizer after one step, from its live tensors
    torch.manual_seed(0)
    model0 = make_task(cfg, groups, torch.device("cpu")).model
    replicated = ReplicatedEngine(model0, groups, lambda m: build_optimizer(m, cfg.optim))
    replicated.forward_backward(1, lambda m: _touch_all(model0))
    replicated.step(1e-3)
    figures0 = {"dense": [0, 0], "expert": [0, 0]}  # kind -> [param bytes, optimizer bytes]
    for p in model0.parameters():
        kind = "expert" if is_expert_param(p) else "dense"
        figures0[kind][0] += _bytes([p])
        figures0[kind][1] += _bytes(v for v in replicated.optimizer.state[p].values() if v.dim() > 0)
    # the same model under DeepSpeed ZeRO 1 and 2: at start and after one step
    figures = {}
    for stage in (1, 2):
        torch.manual_seed(0)
        model = make_task(cfg, groups, torch.device("cpu")).model
        engine = DeepSpeedEngine(model, groups, lambda m: build_optimizer(m, cfg.optim), grad_clip=cfg.optim.grad_clip,
                                 stage=stage, num_micro=1, device=torch.device("cpu"))
        before = engine.memory()
        engine.forward_backward(1, lambda m, model=model: _touch_all(model))
        engine.clip_grad_norm(None)
        engine.step(1e-3)
        figures[stage] = (before, engine.memory())
        if rank == 0:
            print(f"memory rank 0, world {world}, ep 2, zero {stage}: {figures[stage][1]}; stage 0: {figures0}")
    return figures0, figures, (groups.dims.dp, groups.dims.edp)


@pytest.mark.distributed
@pytest.mark.slow
def test_optimizer_state_per_rank_shrinks_by_the_data_parallel_factors():
    for figures0, figures, (dp, edp) in run_distributed(_memory, 4, timeout=240):
        assert (dp, edp) == (4, 2)
        (dense_p, dense_opt), (expert_p, expert_opt) = figures0["dense"], figures0["expert"]
        assert expert_p > 0 and dense_p > 0
        # DeepSpeed pads each of its flat groups (dense / expert x decay / no decay) to a multiple of the
        # partition count times a small alignment: a few elements per group, here at most 64 bytes each
        pad = 4 * 64
        shares = dense_opt / dp + expert_opt / edp  # AdamW's 2 moments, partitioned
        masters = dense_p / dp + expert_p / edp  # the fp32 master partition
        for stage, (before, after) in figures.items():
            assert shares <= after["optimizer"] <= shares + pad + 4 * 4, (stage, after, figures0)  # + steps
            assert before["optimizer"] == after["optimizer"]  # the figure at start is the one after a step
            assert after["optimizer"] * 2 < dense_opt + expert_opt  # the point of it
            # parameters: every rank holds the whole model, plus its fp32 master partition
            assert dense_p + expert_p + masters <= after["params"] <= dense_p + expert_p + masters + pad
            if stage == 1:  # a full gradient per parameter, cut to the partition at the boundary
                assert after["grads"] == dense_p + expert_p
            else:  # the whole parameters with elements in this rank's partition: more than its share (a
                # parameter cut by a partition boundary counts on both sides), less than every gradient
                assert masters <= after["grads"] < dense_p + expert_p
