"""build_optimizer: AdamW with decoupled weight decay on matrices only, checked by one step."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import moe
from moe.trainer.config import OptimConfig
from moe.trainer.optim import build_optimizer


class Model(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.proj = nn.Linear(8, 8)                       # weight: matrix, bias: vector
        self.norm = nn.LayerNorm(8)                       # weight and bias: vectors
        self.moe = moe.MoELayer(moe.MoEConfig(           # router [E, D]; experts w1/w2 [E, ., .], b1/b2 [E, .]
            d_model=8, d_ffn=16, num_experts=4, bias=bias, shared_expert_ffn=8, residual_moe=True,
            router=moe.RouterConfig(policy="noisy_topk", top_k=2)))
        self.scale = nn.Parameter(torch.tensor(1.5))      # 0-d
        self.gain = nn.Parameter(torch.full((8,), 0.7))   # 1-d


# Parameter name -> decayed? Matrices decay (expert weights are a stack of matrices); biases
# (expert biases are a stack of vectors), norm weights and scalars do not.
DECAYED = {
    "proj.weight": True, "proj.bias": False,
    "norm.weight": False, "norm.bias": False,
    "moe.router.weight": True, "moe.router.noise_weight": True,
    "moe.experts.w1": True, "moe.experts.w2": True, "moe.experts.b1": False, "moe.experts.b2": False,
    "moe.shared.w1": True, "moe.shared.w2": True, "moe.shared.b1": False, "moe.shared.b2": False,
    "moe.residual_coef.weight": True, "moe.residual_coef.bias": False,
    "scale": False, "gain": False,
}


@pytest.mark.parametrize("bias", [False, True])
def test_one_step_with_zero_gradients_decays_only_matrices(bias):
    torch.manual_seed(0)
    model = Model(bias)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.rand_like(p) + 0.5)  # no parameter is 0, so a decay would show
    names = {name for name, _ in model.named_parameters()}
    assert names == {n for n in DECAYED if bias or ".b1" not in n and ".b2" not in n}
    lr, wd = 0.05, 0.2
    opt = build_optimizer(model, OptimConfig(lr=lr, weight_decay=wd, warmup_steps=0))
    grouped = [p for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len(names) and {id(p) for p in grouped} == {id(p) for p in model.parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    # AdamW with zero gradients: the Adam update is 0; decoupled decay is p <- p * (1 - lr * wd).
    for name, p in model.named_parameters():
        if DECAYED[name]:
            torch.testing.assert_close(p.detach(), before[name] * (1 - lr * wd), msg=name)
        else:
            assert torch.equal(p.detach(), before[name]), name


def test_zero_weight_decay_leaves_every_parameter_unchanged():
    model = Model(bias=True)
    opt = build_optimizer(model, OptimConfig(lr=0.05, weight_decay=0.0))
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


def test_frozen_parameters_are_left_out():
    model = Model(bias=False)
    model.proj.weight.requires_grad_(False)
    opt = build_optimizer(model, OptimConfig())
    grouped = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.proj.weight) not in grouped
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
