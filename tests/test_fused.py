"""``train.fused`` (``moe.trainer.fused``): which optimizer and norm run, the fallbacks, and apex's
FusedAdam through checkpoints.

apex is not installable here (and the PyPI package named ``apex`` is unrelated): the tests put a stand-in
``apex`` into ``sys.modules`` with apex's interface and its state layout (``step`` per parameter GROUP,
``exp_avg`` / ``exp_avg_sq`` per parameter). The stand-in's update is Adam(W) written out here, so the
oracle for the checkpoint round trip is a formula, not the code under test.
"""
from __future__ import annotations

import math
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe.trainer import fused
from moe.trainer.config import OptimConfig
from moe.trainer.optim import build_optimizer


class FakeFusedAdam(torch.optim.Optimizer):
    """apex.optimizers.FusedAdam's interface and state layout; AdamW math written out."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, adam_w_mode=True):
        assert adam_w_mode
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            g["step"] = g.get("step", 0) + 1
            b1, b2 = g["betas"]
            for p in g["params"]:
                st = self.state.setdefault(p, {})
                if "exp_avg" not in st:
                    st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                t = g["step"]
                denom = (v / (1 - b2 ** t)).sqrt() + g["eps"]
                p.mul_(1 - g["lr"] * g["weight_decay"]).addcdiv_(m / (1 - b1 ** t), denom, value=-g["lr"])


class FakeFusedLayerNorm(nn.Module):
    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
        super().__init__()
        self.normalized_shape, self.eps = tuple(normalized_shape), eps
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


@pytest.fixture
def fake_apex(monkeypatch):
    """A stand-in apex with its CUDA extensions importable."""
    apex = types.ModuleType("apex")
    optimizers = types.ModuleType("apex.optimizers")
    optimizers.FusedAdam = FakeFusedAdam
    normalization = types.ModuleType("apex.normalization")
    normalization.FusedLayerNorm = FakeFusedLayerNorm
    apex.optimizers, apex.normalization = optimizers, normalization
    for name, mod in {"apex": apex, "apex.optimizers": optimizers, "apex.normalization": normalization,
                      "amp_C": types.ModuleType("amp_C"),
                      "fused_layer_norm_cuda": types.ModuleType("fused_layer_norm_cuda")}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return apex


def test_selection_without_apex(monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", None)  # import apex -> ImportError
    assert "not importable" in fused.apex_status()
    c = fused.choose("auto", "cuda")
    assert (c.optimizer, c.norm) == ("torch-fused", "torch") and "torch's fused AdamW instead" in c.reason
    c = fused.choose("auto", "cpu")
    assert (c.optimizer, c.norm) == ("torch", "torch") and "CUDA-only" in c.reason
    assert fused.choose("off", "cuda").optimizer == "torch"
    with pytest.raises(ValueError, match="train.fused"):
        fused.choose("on", "cuda")


def test_selection_with_apex(fake_apex, monkeypatch):
    assert fused.apex_status() is None
    c = fused.choose("auto", "cuda")
    assert (c.optimizer, c.norm) == ("apex", "apex")
    assert c.describe() == ("fused kernels: apex FusedAdam, apex FusedLayerNorm (NVIDIA apex with its CUDA "
                            "extensions is importable)")
    assert fused.choose("auto", "cpu").optimizer == "torch"  # apex's kernels are CUDA-only
    assert fused.choose("off", "cuda").optimizer == "torch"
    assert fused.choose("auto", "cuda", engine_owns_optimizer=True).optimizer == "torch"
    monkeypatch.setitem(sys.modules, "amp_C", None)  # apex built without its CUDA extensions
    assert "without its CUDA extensions (amp_C missing" in fused.apex_status()
    assert fused.choose("auto", "cuda").optimizer == "torch-fused"


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def test_fuse_norms_keeps_the_parameters(fake_apex):
    model = _model()
    x = torch.randn(5, 6)
    before = model(x)
    params = dict(model.named_parameters())
    assert fused.fuse_norms(model) == 1
    assert isinstance(model[1], FakeFusedLayerNorm)
    assert dict(model.named_parameters()) == params  # the same Parameter objects, same names
    assert torch.equal(model(x), before)


def _train(model, opt, steps, seed):
    torch.manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 6)).pow(2).mean().backward()
        opt.step()


def test_apex_adam_checkpoint_round_trip(fake_apex, tmp_path):
    """FusedAdam (step per group) saves and loads through the engine's per-parameter view: resuming
    continues exactly, and the saved state is AdamW's (step, exp_avg, exp_avg_sq) by formula."""
    from moe.trainer import checkpoint as ckpt
    from parallel.engine import ReplicatedEngine
    from parallel.launch import build_groups, init_distributed

    ctx = init_distributed("gloo", device="cpu")
    try:
        cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
        make = lambda m: build_optimizer(m, cfg, kind="apex")  # noqa: E731
        whole = ReplicatedEngine(_model(), build_groups(1), make)
        assert isinstance(whole.optimizer, FakeFusedAdam)
        assert [g["weight_decay"] for g in whole.optimizer.param_groups] == [0.1, 0.0]
        _train(whole.model, whole.optimizer, 3, seed=1)
        path = ckpt.save_checkpoint(str(tmp_path), 3, whole.model, whole.checkpoint_optimizer())
        # the view's state is FusedAdam's own: step from the group, moments by formula (beta1 = 0.9 ...)
        view = whole.checkpoint_optimizer()
        p0 = whole.model[0].weight
        assert float(view.state[p0]["step"]) == 3.0 and view.state[p0]["exp_avg"] is whole.optimizer.state[p0]["exp_avg"]
        _train(whole.model, whole.optimizer, 2, seed=2)

        resumed = ReplicatedEngine(_model(), build_groups(1), make)
        ckpt.load_checkpoint(path, resumed.model, resumed.checkpoint_optimizer())
        resumed.after_checkpoint_load()
        assert [g["step"] for g in resumed.optimizer.param_groups] == [3, 3]
        _train(resumed.model, resumed.optimizer, 2, seed=2)
        for a, b in zip(resumed.model.parameters(), whole.model.parameters()):
            assert torch.equal(a, b)
        m = whole.optimizer.state[p0]["exp_avg"]
        assert m.shape == p0.shape and not math.isclose(float(m.abs().sum()), 0.0)
    finally:
        ctx.close()


def test_print_config_shows_effective_precision_and_fused():
    out = subprocess.run([sys.executable, "-m", "moe.train", "--config", "examples/configs/tiny_limoe.yaml",
                          "--set", "parallel.ep=1", "--set", "train.precision=bf16", "--set", "parallel.zero_stage=3",
                          "--set", "train.device=cpu", "--print-config"], capture_output=True, text=True, check=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("# effective: ")]
    assert lines == [
        "# effective: precision bf16 on the fsdp2 engine: bf16 autocast compute; fp32 master weights, gradients and "
        "AdamW state; router and losses fp32; FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)",
        "# effective: fused kernels: torch AdamW, torch LayerNorm (ZeRO engines use their own optimizer path)"]
