"""Mixed precision (``train.precision``, ``parallel.precision``): autocast with fp32 master weights, the
router and the losses in fp32, fp16 dynamic loss scaling with skipped steps, checkpoints and resume.

Oracles: formulas written here (the loss scaler's rule, fp32 logits computed by hand), the fp32 run of
the same config (bf16 / fp16 track it within a tolerance justified below), and one process of the same
config in the same precision (the layouts).
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from moe import MoELayer
from moe.config import MoEConfig
from moe.experts import Experts
from moe.trainer import checkpoint as ckpt
from parallel.precision import LossScaler, Precision, compute_dtype
from tests.helpers.distributed import run_distributed
from tests.helpers.layout import TINY_LM, run_layout

# bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per op), fp16 11 (2^-12 ~ 2.4e-4).
# Over the 8 steps below the measured largest relative loss difference to fp32 is ~1e-4 (bf16) on this
# tiny model; a 1% bound is far above that round-off and far below what these steps change
# (the loss falls by more than 10%), so a run that trained a different model fails it.
TRACK_RTOL = 1e-2
STEPS = 8


def _global_error(params, ref) -> float:
    """Relative L2 difference of ALL parameters together. Per tensor it would be meaningless here: the
    attention key bias has an exactly zero true gradient (softmax is shift-invariant), so Adam turns
    round-off into lr-sized steps of it in any precision, and its per-tensor error is noise."""
    diff = sum(float((params[n].double() - ref[n].double()).pow(2).sum()) for n in ref)
    return (diff / sum(float(ref[n].double().pow(2).sum()) for n in ref)) ** 0.5


def _lm(steps: int = STEPS, **train):
    cfg = copy.deepcopy(TINY_LM)
    cfg["train"].update(steps=steps, **train)
    return cfg


# --------------------------------------------------------------------------------------
def test_loss_scaler_rule():
    s = LossScaler(init_scale=2.0 ** 10, growth=2.0, backoff=0.5, growth_interval=3, min_scale=2.0 ** 8)
    assert s.update(False) is True and s.scale == 2.0 ** 9 and s.skipped_steps == 1
    assert [s.update(True) for _ in range(2)] == [False, False] and s.scale == 2.0 ** 9
    assert s.update(True) is False and s.scale == 2.0 ** 10 and s.good_steps == 0  # 3 good steps: grow
    s.update(True)
    s.update(False)  # a bad step resets the run of good steps
    assert s.scale == 2.0 ** 9 and s.good_steps == 0 and s.skipped_steps == 2
    for _ in range(5):
        s.update(False)
    assert s.scale == 2.0 ** 8  # never below min_scale
    t = LossScaler()
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict() == {"scale": 2.0 ** 8, "good_steps": 0, "skipped_steps": 7}
    with pytest.raises(ValueError, match="backoff"):
        LossScaler(backoff=1.5)
    with pytest.raises(ValueError, match="train.precision"):
        Precision("fp8")


def _layer(policy: str, **router):
    cfg = MoEConfig.from_dict({"d_model": 16, "d_ffn": 32, "num_experts": 4,
                               "router": {"policy": policy, "top_k": 2, **router}})
    torch.manual_seed(0)
    return MoELayer(cfg)


@pytest.mark.parametrize("policy,extra", [("topk", {"jitter_eps": 0.1}), ("noisy_topk", {}), ("gshard", {})])
def test_router_is_fp32_under_bf16_autocast(policy, extra):
    """The router's logits, weights and aux losses under bf16 autocast are exactly the fp32 ones."""
    layer = _layer(policy, **extra)
    layer.train()
    x = torch.randn(24, 16)
    seen = {}
    layer.router.register_forward_hook(lambda m, args, out: seen.setdefault("routing", out))
    torch.manual_seed(5)
    ref = layer.router(x)  # fp32, no autocast
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = layer(x)
    got = seen["routing"]
    assert got.weights.dtype == torch.float32
    assert torch.equal(got.weights, ref.weights) and torch.equal(got.experts, ref.experts)
    layer.eval()  # no jitter: the logits under autocast are the fp32 product, by value
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer.router.logits(x)
    assert torch.equal(logits, x @ layer.router.weight.t())
    for v in aux.values():
        assert v.dtype == torch.float32
    assert y.dtype == torch.float32  # the layer hands fp32 back to the fp32 residual stream


def test_experts_compute_in_the_autocast_dtype():
    """Under autocast the expert MLPs (grouped_mm is outside autocast's op list) run in bf16, by value."""
    torch.manual_seed(0)
    ex = Experts(3, 16, 32, "gelu", bias=True)
    rows, counts = torch.randn(10, 16), torch.tensor([4, 0, 6])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(rows) == torch.bfloat16
        out = ex(rows, counts)
    assert compute_dtype(rows) == torch.float32  # outside autocast: its own dtype
    bf = torch.bfloat16
    expect = []
    for e, (lo, hi) in enumerate([(0, 4), (4, 4), (4, 10)]):
        h = torch.nn.functional.gelu(rows[lo:hi].to(bf) @ ex.w1[e].to(bf) + ex.b1[e].to(bf))
        expect.append(h @ ex.w2[e].to(bf) + ex.b2[e].to(bf))
    expect = torch.cat(expect).float()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expect, rtol=1e-2, atol=1e-3)
    assert not torch.allclose(out, ex.forward_loop(rows, counts), rtol=1e-6, atol=1e-7)  # not fp32 compute


# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process: fp32, bf16 and fp16 of the same config (each checkpointed at its end)."""
    root = tmp_path_factory.mktemp("precision")
    return {p: run_layout(_lm(), 1, root / p, overrides=[f"train.precision={p}"]) for p in ("fp32", "bf16", "fp16")}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_tracks_fp32(runs, precision):
    ref, run = runs["fp32"], runs[precision]
    losses = ref.losses()
    assert losses[-1] < 0.9 * losses[0]  # the steps really train
    for a, b in zip(run.metrics, ref.metrics):
        for key in ("train/loss", "train/grad_norm"):  # fp16: the norm of the UNSCALED gradients
            assert abs(a[key] - b[key]) <= TRACK_RTOL * abs(b[key]), (precision, a["step"], key, a[key], b[key])
    assert run.losses() != ref.losses()  # it really computed in low precision
    assert run.params.keys() == ref.params.keys()
    assert _global_error(run.params, ref.params) <= TRACK_RTOL
    assert f"precision {precision}: {precision} autocast compute; fp32 master weights" in run.stdout


def test_fp16_logs_scale_and_bf16_does_not(runs):
    assert all(r["train/loss_scale"] == 2.0 ** 16 and r["train/skipped_steps"] == 0 for r in runs["fp16"].metrics)
    assert all("train/loss_scale" not in r for r in runs["bf16"].metrics)


def test_checkpoint_holds_fp32_master_weights(runs):
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(runs["bf16"].checkpoint).read_metadata().state_dict_metadata
    dtypes = {m.properties.dtype for k, m in meta.items() if hasattr(m, "properties")}
    assert {d for d in dtypes if d.is_floating_point} == {torch.float32}, dtypes
    assert ckpt.checkpoint_info(runs["fp16"].checkpoint)["loss_scaler"] == {
        "scale": 2.0 ** 16, "good_steps": STEPS, "skipped_steps": 0}


def test_resume_is_exact(tmp_path):
    """N steps in one go equal N/2 + resume + N/2 in fp16 (autocast as bf16, plus the loss scaler's state)."""
    precision = "fp16"
    cfg = _lm(steps=4, checkpoint_every=2)
    over = [f"train.precision={precision}"]
    whole = run_layout(cfg, 1, tmp_path / "whole", overrides=over)
    rest = copy.deepcopy(cfg)
    rest["train"]["resume"] = ckpt.step_dir(os.path.dirname(whole.checkpoint), 2)
    resumed = run_layout(rest, 1, tmp_path / "resumed", overrides=over)
    assert [r["train/loss"] for r in resumed.metrics] == whole.losses()[2:]
    for n, p in whole.params.items():
        assert torch.equal(resumed.params[n], p), n


# --------------------------------------------------------------------------------------
def _overflow_rank(rank, world, out_dir):
    """fp16: a gradient made infinite at step 2 skips that step (parameters, optimizer state and expert
    bias unchanged; scale halved; counted and logged); the next step trains."""
    from moe.trainer.config import from_dict
    from tests.helpers.toy import trainer_in_group

    raw = _lm(steps=4)
    raw["train"].update(precision="fp16", out_dir=str(out_dir), log_every=1)
    raw["telemetry"] = {"tensorboard": False, "plots": False, "progress_bar": False, "gpu_stats": False}
    trainer = trainer_in_group(from_dict(raw))
    lines = []
    trainer._log_fn = lines.append
    name, param = next((n, p) for n, p in trainer.model.named_parameters() if n.endswith("w1"))
    param.register_hook(lambda grad: torch.full_like(grad, float("inf")) if trainer.step == 1 else grad)
    snapshot, before = {}, {}
    orig = trainer._optimizer_step

    def step(lr):
        if trainer.step == 1:
            before["params"] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
            before["state"] = {id(p): {k: v.clone() for k, v in s.items()} for p, s in trainer.optimizer.state.items()}
            before["buffers"] = [b.clone() for b in trainer.model.buffers()]
        out = orig(lr)
        if trainer.step == 1:
            snapshot["skipped"] = out[2]
            snapshot["params_same"] = all(torch.equal(p, before["params"][n]) for n, p in trainer.model.named_parameters())
            snapshot["state_same"] = all(torch.equal(v, before["state"][id(p)][k])
                                         for p, s in trainer.optimizer.state.items() for k, v in s.items())
            snapshot["buffers_same"] = all(torch.equal(a, b) for a, b in zip(trainer.model.buffers(), before["buffers"]))
            snapshot["grads_none"] = all(p.grad is None for p in trainer.model.parameters())
        if trainer.step == 2:
            snapshot["trained_after"] = not torch.equal(param, before["params"][name])
        return out

    trainer._optimizer_step = step
    trainer.fit()
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl")) if "train/loss" in line]
    snapshot["rows"] = [(r["step"], r["train/loss_scale"], r["train/skipped_steps"]) for r in rows]
    snapshot["lines"] = [line for line in lines if "overflowed" in line]
    return snapshot


def test_fp16_overflow_skips_and_counts_the_step(tmp_path):
    got = run_distributed(_overflow_rank, 1, tmp_path / "run", timeout=120)[0]
    assert got["skipped"] is True
    assert got["params_same"] and got["state_same"] and got["buffers_same"] and got["grads_none"]
    assert got["trained_after"]
    s = 2.0 ** 16
    assert got["rows"] == [(1, s, 0), (2, s / 2, 1), (3, s / 2, 1), (4, s / 2, 1)]
    assert len(got["lines"]) == 1 and got["lines"][0].startswith("step 2: gradients overflowed in fp16")


# --------------------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.parametrize("precision,layout", [
    ("bf16", ["parallel.ep=2"]), ("fp16", ["parallel.pp=2"]),
    ("bf16", ["parallel.zero_stage=3", "parallel.ep=2"]), ("fp16", ["parallel.zero_stage=3", "parallel.ep=2"])],
    ids=["ep2-bf16", "pp2-fp16", "fsdp2-bf16", "fsdp2-fp16"])
def test_layouts_in_mixed_precision_track_one_process(runs, tmp_path, precision, layout):
    """2 processes in bf16 / fp16 (expert parallel; a pipeline with its loss terms scaled; FSDP2 with 16-bit
    parameter gathers and its sharded gradients unscaled) train what one process trains in that precision,
    within round-off of the order of summation."""
    run = run_layout(_lm(), 2, tmp_path, overrides=[f"train.precision={precision}", *layout])
    ref = runs[precision]
    assert len(run.metrics) == len(ref.metrics) == STEPS
    for a, b in zip(run.metrics, ref.metrics):
        for key in ("train/loss", "train/grad_norm"):  # fp16: every engine's norm is of the unscaled gradients
            assert abs(a[key] - b[key]) <= TRACK_RTOL * abs(b[key]), (key, a, b)
    assert run.params.keys() == ref.params.keys()
    assert _global_error(run.params, ref.params) <= TRACK_RTOL


def test_tensor_parallel_mixed_precision_is_refused_on_cpu():
    from moe.trainer.config import ConfigError, from_dict
    from moe.trainer.layout import check_precision

    raw = _lm()
    raw["parallel"] = {"tp": 2}
    raw["train"].update(device="cpu", precision="bf16")
    with pytest.raises(ConfigError, match=r"train.precision.*'bf16'.*parallel.tp=2 it needs GPUs"):
        check_precision(from_dict(raw))
    raw["train"]["precision"] = "fp32"
    check_precision(from_dict(raw))


def _ep_bf16_rank(rank, world, early_cast):
    """An ep=2 layer under bf16 autocast: its output, input gradient and weight gradients, and its bytes."""
    import moe as moe_pkg
    import moe.layer as layer_mod
    from parallel.dims import ParallelDims

    groups = ParallelDims.from_world(world, ep=2).build()
    torch.manual_seed(0)
    cfg = moe_pkg.MoEConfig(d_model=16, d_ffn=32, num_experts=4, aux_losses={"load_balancing": 0.1},
                            router=moe_pkg.RouterConfig(policy="gshard", top_k=2, capacity_factor=1.0))
    layer = moe_pkg.MoELayer(cfg, ep_group=groups.ep_group)
    if not early_cast:  # the all-to-alls in fp32: the experts cast their rows themselves
        layer_mod.compute_dtype = lambda t: t.dtype
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(32, 16, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = layer(x)
    ((y * torch.randn(y.shape, generator=g)).sum() + sum(aux.values())).backward()
    return {"y": y.detach(), "dx": x.grad, "w1": layer.experts.w1.grad, "router": layer.router.weight.grad,
            "bytes": layer.last_stats["bytes_sent"], "dtype": y.dtype}


@pytest.mark.distributed
def test_expert_parallel_all_to_all_moves_bf16():
    """Under bf16 the all-to-alls move bf16 rows (half the bytes of fp32) and give the very same numbers."""
    early = run_distributed(_ep_bf16_rank, 2, True)
    late = run_distributed(_ep_bf16_rank, 2, False)
    for a, b in zip(early, late):
        assert a["dtype"] == torch.float32
        for key in ("y", "dx", "w1", "router"):
            assert torch.equal(a[key], b[key]), key
        assert b["bytes"] > 0 and a["bytes"] * 2 == b["bytes"]


def test_activation_checkpointing_under_fp16_changes_nothing(runs, tmp_path):
    """Recomputed blocks replay autocast (and the routing) as well: block checkpointing in fp16 trains
    bit for bit what the fp16 run without it trains."""
    run = run_layout(_lm(), 1, tmp_path, overrides=["train.precision=fp16", "train.activation_checkpointing=block"])
    ref = runs["fp16"]
    assert run.losses() == ref.losses()
    for n, p in ref.params.items():
        assert torch.equal(run.params[n], p), n
