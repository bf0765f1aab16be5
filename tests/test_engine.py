"""parallel.engine / parallel.grads: accumulation, the global gradient norm and clipping, the
once-per-step expert-bias update, and that the trainer really clips (oracles written here)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import moe
from moe.trainer.sinks import format_eval_line, format_train_line, train_row
from parallel import ParallelDims, ReplicatedEngine, clip_gradients, global_grad_norm, mark_expert_params
from tests.helpers.distributed import run_distributed
from tests.helpers.toy import toy_config, trainer_in_group


class _Stub(nn.Module):
    """A dense matrix, a dense bias and a stack of 'experts' (marked), 2 per rank."""

    def __init__(self, ep: int, ep_rank: int):
        super().__init__()
        self.dense = nn.Parameter(torch.zeros(3, 2))
        self.bias = nn.Parameter(torch.zeros(5))
        self.experts = nn.Parameter(torch.zeros(2, 4))
        mark_expert_params([self.experts], ep)
        self.first = 2 * ep_rank


def _grads(model: _Stub, first: int):
    """Gradients as a function of the GLOBAL expert index (the same on every layout)."""
    model.dense.grad = torch.arange(6.0).view(3, 2) / 7
    model.bias.grad = torch.linspace(-1, 1, 5)
    local = model.experts.shape[0]
    model.experts.grad = torch.stack([torch.full((4,), 0.5 + e) for e in range(first, first + local)])


def _oracle_norm(num_experts: int) -> float:
    dense = (torch.arange(6.0) / 7).double().pow(2).sum() + torch.linspace(-1, 1, 5).double().pow(2).sum()
    experts = sum(4 * (0.5 + e) ** 2 for e in range(num_experts))
    return math.sqrt(float(dense) + experts)


def _clip_ep(rank, world, max_norm):
    groups = ParallelDims.from_world(world, ep=2).build()
    model = _Stub(2, groups.ep_rank)
    _grads(model, model.first)
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = clip_gradients(model, max_norm, groups)
    return norm, before, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_global_norm_counts_every_expert_once_and_clipping_scales_all(world):
    expected = _oracle_norm(4)  # 4 experts in all: 2 per ep rank; edp replicas are not counted twice
    out = run_distributed(_clip_ep, world, 1.0, timeout=60)
    for norm, before, after in out:
        assert norm == pytest.approx(expected, rel=1e-12)
        scale = 1.0 / (expected + 1e-6)
        for n in before:
            torch.testing.assert_close(after[n], before[n] * scale, rtol=1e-6, atol=0)
    # max_norm above the norm: nothing changes; None: no clipping at all
    for max_norm in (expected * 2, None):
        for norm, before, after in run_distributed(_clip_ep, 2, max_norm, timeout=60):
            assert norm == pytest.approx(expected, rel=1e-12)
            assert all(torch.equal(after[n], before[n]) for n in before)


def test_single_process_norm_is_the_plain_l2_norm():
    groups = _World1Groups()
    model = _Stub(1, 0)
    model.experts = nn.Parameter(torch.zeros(4, 4))
    mark_expert_params([model.experts], 1)
    _grads(model, 0)
    assert float(global_grad_norm(model, groups)) == pytest.approx(_oracle_norm(4), rel=1e-12)


class _World1Groups:
    """What the replicated engine reads of a world-1 ProcessGroups, without a process group."""

    dims = ParallelDims(world_size=1, dp=1)
    rank = 0
    group_ranks = {name: [0] for name in ("dp", "tp", "pp", "ep", "etp", "edp")}
    dp_group = edp_group = ep_group = None


def test_engine_accumulation_equals_the_whole_batch_gradient():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8)

    def make():
        torch.manual_seed(1)
        return nn.Linear(3, 1)

    def sgd(model):
        return torch.optim.SGD(model.parameters(), lr=0.1)

    whole, split = make(), make()
    ReplicatedEngine(whole, _World1Groups(), sgd).forward_backward(
        1, lambda m: (((whole(x).squeeze(-1) - y) ** 2).mean(), {}))
    engine = ReplicatedEngine(split, _World1Groups(), sgd)
    logs = engine.forward_backward(4, lambda m: (((split(x[2 * m:2 * m + 2]).squeeze(-1) - y[2 * m:2 * m + 2]) ** 2)
                                                 .mean(), {"m": float(m)}))
    assert [row["m"] for row in logs] == [0.0, 1.0, 2.0, 3.0]
    for a, b in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-7)
    engine.step(0.5)
    assert engine.optimizer.param_groups[0]["lr"] == 0.5
    with pytest.raises(ValueError, match="config key 'num_micro': got 0; it must be >= 1"):
        engine.forward_backward(0, lambda m: None)


def test_expert_bias_moves_once_per_step_from_the_summed_load():
    cfg = moe.MoEConfig(d_model=8, d_ffn=16, num_experts=4,
                        router=moe.RouterConfig(policy="expert_bias", top_k=1, expert_bias_rate=0.5))
    layer = moe.MoELayer(cfg)
    layer.defer_expert_bias_update = True
    torch.manual_seed(0)
    xs = [torch.randn(6, 8) for _ in range(3)]
    load = torch.zeros(4, dtype=torch.long)
    for x in xs:
        layer(x)
        load += torch.bincount(layer.last_routing.experts.reshape(-1), minlength=4)
        assert torch.equal(layer.router.expert_bias, torch.zeros(4))  # nothing moves inside the step
    layer.apply_expert_bias_update()
    expected = 0.5 * torch.sign(load.float().mean() - load.float())
    torch.testing.assert_close(layer.router.expert_bias, expected)
    layer.apply_expert_bias_update()  # nothing routed since: unchanged
    torch.testing.assert_close(layer.router.expert_bias, expected)


def _one_step(rank, world, out_dir, grad_clip):
    cfg = toy_config(out_dir, optim={"lr": 1e4, "eps": 1e3, "weight_decay": 0.0, "warmup_steps": 0,
                                     "schedule": "constant", "grad_clip": grad_clip},
                     train={"steps": 1, "eval_every": 0, "checkpoint_every": 0})
    trainer = trainer_in_group(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = trainer.fit()
    after = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    norm = [row["train/grad_norm"] for row in result.history if "train/grad_norm" in row][0]
    return {n: after[n] - before[n] for n in before}, norm


def test_trainer_clips_by_the_global_norm(tmp_path):
    """With Adam's eps >> |g|, the first update is lr * g / eps: clipping shows as the factor max_norm / norm
    (compared up to fp32 round-off of the parameters themselves, hence atol relative to the largest step)."""
    free, norm = run_distributed(_one_step, 1, str(tmp_path / "free"), None, timeout=60)[0]
    max_norm = norm / 10
    clipped, norm2 = run_distributed(_one_step, 1, str(tmp_path / "clip"), max_norm, timeout=60)[0]
    assert norm2 == pytest.approx(norm, rel=1e-6)
    for n in free:
        scale = max_norm / (norm + 1e-6)
        torch.testing.assert_close(clipped[n], free[n] * scale, rtol=1e-3, atol=1e-4 * scale * float(free[n].abs().max()))


def test_log_lines_are_pure_formatting():
    row = train_row(4, 1e-3, {"loss": 1.23456, "grad_norm": 0.5, "task_loss": 1.2, "z_loss": 0.03456},
                    seconds=2.0, samples=64, routing=[], hardware={})
    assert row == {"step": 4, "train/lr": 1e-3, "train/drop_rate": 0.0, "train/loss": 1.23456,
                   "train/grad_norm": 0.5, "train/task_loss": 1.2, "train/z_loss": 0.03456,
                   "train/samples_per_s": 32.0}
    assert format_train_line(row, 10) == ("step 4/10 | loss 1.2346 | lr 1.00e-03 | 32.0 samples/s | drop 0.0% | "
                                          "task_loss 1.2 | z_loss 0.03456")
    assert format_eval_line(8, {"val_loss": 1.5, "perplexity": 4.4817}) == "eval @ step 8: val_loss 1.5, perplexity 4.482"
