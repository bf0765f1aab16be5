"""Bad state during training fails loudly: router-state guards, routing health, empty batches.

- ``RouterConfig.expert_bias_rate`` must be a finite number (not a bool), named by its key path.
- A non-finite expert bias or noise projection raises naming the layer, or skips the layer
  with ``on_nonfinite='skip'`` (noisy top-k included: no ``torch.distributions`` error).
- A sigmoid router whose combine weights are all ~0 shows in the statistics.
- Routing health: load CV, collapsed experts, drop-rate jumps, skipped forwards; warning lines.
- ``sequence_aux`` on an empty batch is 0 like every other loss.
"""
from __future__ import annotations

import json
import statistics

import pytest
import torch

import moe
from moe import losses as L
from parallel.checks import ConfigError
from moe.config import RouterConfig
from moe.routing_types import ZERO_WEIGHT
from moe.trainer.health import RoutingHealth
from moe.trainer.loop import run
from moe.trainer.sinks import format_train_line, train_row
from moe.trainer.telemetry import LayerRouting, RoutingRecorder
from tests.helpers.toy import build_toy_task, toy_config

D = 8


# ------------------------------------------------------------------ expert_bias_rate validation
@pytest.mark.parametrize("value, allowed", [(float("inf"), "finite"), (float("-inf"), "finite"),
                                            (float("nan"), "finite"), (True, "a number"), ("1e-3", "a number"),
                                            (-1e-3, ">= 0")])
def test_expert_bias_rate_must_be_a_finite_number(value, allowed):
    with pytest.raises(ConfigError, match=rf"'RouterConfig.expert_bias_rate': got .*{allowed}"):
        RouterConfig(policy="expert_bias", expert_bias_rate=value)
    with pytest.raises(ConfigError, match=rf"'model.moe.router.expert_bias_rate': got .*{allowed}"):
        RouterConfig.from_dict({"policy": "expert_bias", "expert_bias_rate": value}, "model.moe.router")


# ------------------------------------------------------------------ router state guards
def _layer(on_nonfinite: str, name: str = "blocks.1.moe", **router) -> moe.MoELayer:
    cfg = moe.MoEConfig(d_model=D, d_ffn=16, num_experts=4, aux_losses={"load_balancing": 0.01, "z_loss": 1e-3},
                        router=moe.RouterConfig(on_nonfinite=on_nonfinite, **router))
    torch.manual_seed(0)
    return moe.MoELayer(cfg, name=name)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_expert_bias_raises_naming_the_layer_and_the_experts(bad):
    layer = _layer("error", policy="expert_bias")
    layer.router.expert_bias[2] = bad
    with pytest.raises(FloatingPointError, match=r"^blocks\.1\.moe: the expert bias .* expert\(s\) \[2\]"):
        layer(torch.randn(2, 5, D))


def test_nonfinite_expert_bias_is_skipped_with_skip():
    layer = _layer("skip", policy="expert_bias")
    layer.router.expert_bias[1] = float("nan")
    x = torch.randn(2, 5, D, requires_grad=True)
    y, aux = layer(x)
    # skipped: nothing dispatched, y = 0 (the residual carries the tokens), losses 0 and no NaN gradient
    assert layer.last_stats["skipped"] and int(layer.last_stats["tokens_per_expert"].sum()) == 0
    assert torch.count_nonzero(y) == 0 and all(float(v) == 0.0 for v in aux.values())
    (y.sum() + sum(aux.values())).backward()
    assert torch.count_nonzero(x.grad) == 0


def test_nonfinite_expert_bias_from_a_state_dict_raises_before_routing():
    # The bias is persistent router state: a NaN saved in a state dict (or a checkpoint) must stop the
    # first forward, not route every token to the experts whose bias compares largest.
    src = _layer("error", policy="expert_bias")
    state = src.state_dict()
    state["router.expert_bias"] = torch.tensor([0.0, float("nan"), 0.0, float("nan")])
    layer = _layer("error", policy="expert_bias", name="blocks.7.moe")
    layer.load_state_dict(state)
    with pytest.raises(FloatingPointError, match=r"^blocks\.7\.moe: the expert bias .* expert\(s\) \[1, 3\] "
                                                 r"\(values \[nan, nan\]\)"):
        layer(torch.randn(4, 6, D))


def test_nonfinite_noise_weights_raise_or_skip_without_a_distributions_error():
    layer = _layer("error", policy="noisy_topk")
    with torch.no_grad():
        layer.router.noise_weight[3, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"^blocks\.1\.moe: noisy top-k noise logits .* for 10 of 10 tokens"):
        layer(torch.randn(2, 5, D))
    layer = _layer("skip", policy="noisy_topk", top_k=2)
    with torch.no_grad():
        layer.router.noise_weight[3, 0] = float("nan")
    for mode in (True, False):  # training draws noise; eval still reads the noise logits for the load
        layer.train(mode)
        y, aux = layer(torch.randn(2, 5, D))
        assert layer.last_stats["skipped"] and torch.count_nonzero(y) == 0
        assert all(float(v) == 0.0 for v in aux.values())


def test_noisy_topk_load_is_finite_when_the_noise_std_underflows():
    # Equal logits (router weight 0) and a noise std that underflows to 0 (softplus of -1e4):
    # the smooth load estimate was 0 / 0 there. The limit of Phi((l_i - threshold) / std) with
    # a zero numerator is taken as Phi(0) = 1/2.
    cfg = moe.RouterConfig(policy="noisy_topk", top_k=2)
    logits = torch.zeros(6, 4)
    noise_logits = torch.full((6, 4), -1e4)
    assert float(torch.nn.functional.softplus(noise_logits).max()) == 0.0
    r = moe.route(logits, cfg, noise_logits=noise_logits, generator=torch.Generator().manual_seed(0))
    assert torch.equal(r.load, torch.full((6, 4), 0.5))
    # distinct logits, zero std: the load is the hard top-k indicator
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]]).repeat(3, 1)
    r = moe.route(logits, cfg, noise_logits=noise_logits[:3], generator=torch.Generator().manual_seed(0))
    assert torch.equal(r.load, torch.tensor([[1.0, 0.0, 1.0, 0.0]]).repeat(3, 1))


# ------------------------------------------------------------------ a sigmoid router with ~zero weights
@pytest.mark.parametrize("normalize", [False, True])
def test_sigmoid_router_with_zero_weights_is_reported(normalize):
    layer = _layer("error", score="sigmoid", top_k=2, normalize_weights=normalize, capacity_factor=None)
    x = torch.rand(3, 4, D) + 0.5  # positive features
    with torch.no_grad():
        layer.router.weight.fill_(-20.0 if not normalize else -40.0)  # logits <= -80: scores underflow
    y, _ = layer(x)
    # oracle: the sigmoid scores of the chosen experts, straight from the definition
    scores = torch.sigmoid(x.reshape(-1, D) @ layer.router.weight.detach().t())
    top = scores.topk(2, dim=-1).values
    expected = (top / top.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)) if normalize else top
    assert float(expected.max()) < ZERO_WEIGHT
    stats = layer.last_stats
    assert stats["dropped_fraction"] == 0.0 and stats["zero_weight_fraction"] == 1.0
    assert float(y.detach().abs().max()) < 1e-5
    # the trainer's recorder carries it into the window's row
    rec = RoutingRecorder([layer], ["moe"])
    layer(x)
    (lr,) = rec.reduce()
    assert lr.zero_weight == lr.kept == 3 * 4 * 2 and lr.zero_weight_rate == 1.0
    row = train_row(2, 1e-3, {"loss": 1.0}, seconds=1.0, samples=3, routing=[lr], hardware={})
    assert row["train/zero_weight_rate"] == 1.0 and row["train/drop_rate"] == 0.0
    # a healthy router: no zero weights
    layer = _layer("error", score="sigmoid", top_k=2, normalize_weights=normalize)
    layer(x)
    assert layer.last_stats["zero_weight_fraction"] == 0.0


# ------------------------------------------------------------------ routing health
def _routing(name, tokens, *, dispatched=None, kept=None, zero=0, skipped=0, forwards=2):
    t = torch.tensor(tokens, dtype=torch.long)
    kept = int(t.sum()) if kept is None else kept
    return LayerRouting(name, t, None, kept if dispatched is None else dispatched, kept, 1.0, 0, forwards,
                        kept, zero_weight=zero, skipped=skipped)


def test_load_cv_is_the_population_coefficient_of_variation():
    for tokens in ([10, 0, 0, 10], [5, 5, 5, 5], [40, 0, 0, 0], [3, 1, 4, 1, 5, 9, 2, 6]):
        expected = statistics.pstdev(tokens) / statistics.mean(tokens)
        assert _routing("m", tokens).load_cv == pytest.approx(expected, rel=1e-12)
    assert _routing("m", [0, 0, 0]).load_cv == 0.0
    row = train_row(4, 1e-3, {"loss": 1.0}, seconds=1.0, samples=8,
                    routing=[_routing("a", [10, 0, 0, 10]), _routing("b", [5, 5, 5, 5])], hardware={})
    assert row["train/load_cv"] == pytest.approx(0.5)
    assert " | drop 0.0% | cv 0.50 | " in format_train_line({**row, "train/idle_experts": 2.0}, 10) + " | "
    assert "idle 2" in format_train_line({**row, "train/idle_experts": 2.0}, 10)


def test_health_warns_once_per_collapse_and_again_after_recovery():
    health = RoutingHealth(idle_steps=25, drop_jump=None)
    dead = [10, 10, 0, 10]
    fields, warnings = [], []
    for window, tokens in enumerate([dead, dead, dead, dead, [10, 10, 1, 10], dead, dead, dead], start=1):
        f, w = health.update(10 * window, 10, [_routing("blocks.0.moe", tokens)])
        fields.append(f["train/idle_experts"])
        warnings.append(w)
    # idle streak of expert 2: 10, 20, 30 (>= 25: warned), 40, recovered, 10, 20, 30 (warned again)
    assert fields == [0, 0, 1, 1, 0, 0, 0, 1]
    assert [len(w) for w in warnings] == [0, 0, 1, 0, 0, 0, 0, 1]
    assert warnings[2][0].startswith("warning: routing collapse in layer blocks.0.moe: expert 2 got no tokens "
                                     "for 30 steps (up to step 30); load CV 0.58")
    assert "33.3% of the kept assignments" in warnings[2][0]
    # disabled: no field, no warning
    assert RoutingHealth(idle_steps=0, drop_jump=None).update(10, 10, [_routing("m", [0, 0, 5, 0])]) == ({}, [])


def test_health_warns_on_a_drop_rate_jump_skipped_forwards_and_zero_weights():
    health = RoutingHealth(idle_steps=0, drop_jump=0.1)
    _, w = health.update(10, 10, [_routing("m", [5, 5], dispatched=100, kept=95)])  # 5%
    assert w == []
    _, w = health.update(20, 10, [_routing("m", [5, 5], dispatched=100, kept=70)])  # 30%: +25 points
    assert w == ["warning: drop rate of layer m jumped from 5.0% to 30.0% in steps 11-20 (capacity overflow: the "
                 "router concentrates tokens on fewer experts, or the capacity factor is too small)"]
    _, w = health.update(30, 10, [_routing("m", [5, 5], dispatched=100, kept=65)])  # 35%: +5 points
    assert w == []
    _, w = health.update(31, 1, [_routing("m", [0, 0], dispatched=0, kept=0, skipped=3, forwards=4)])
    assert len(w) == 1 and w[0].startswith("warning: layer m skipped 3 of 4 forward(s) in step 31: its router "
                                           "logits or state (expert bias, noise logits) are not finite")
    zero = _routing("m", [5, 5], dispatched=10, kept=10, zero=9)
    assert "90.0% of its kept assignments" in health.update(40, 9, [zero])[1][0]
    assert health.update(50, 10, [zero])[1] == []  # warned when it started, not every window


def _collapsed_toy(name, model_cfg, data_cfg, *, groups=None, device="cpu"):
    """The toy task with a zero, frozen router: every token ties and goes to experts 0 and 1."""
    task = build_toy_task(name, model_cfg, data_cfg, groups=groups, device=device)
    with torch.no_grad():
        task.model.moe.router.weight.zero_()
    task.model.moe.router.weight.requires_grad_(False)
    return task


def test_trainer_logs_a_routing_collapse(tmp_path):
    cfg = toy_config(tmp_path / "run", model={"num_experts": 4, "capacity_factor": None},
                     train={"steps": 6, "log_every": 2, "eval_every": 0, "checkpoint_every": 0},
                     telemetry={"idle_expert_steps": 4})
    lines = []
    run(cfg, task_builder=_collapsed_toy, log=lines.append)
    warned = [line for line in lines if line.startswith("warning: routing collapse")]
    assert warned == ["warning: routing collapse in layer moe: experts 2, 3 got no tokens for 4 steps (up to step 4); "
                      "load CV 1.00, the busiest expert takes 50.0% of the kept assignments"]
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/loss" in r]
    assert [r["train/idle_experts"] for r in rows] == [0.0, 2.0, 2.0]
    assert all(r["train/load_cv"] == pytest.approx(1.0) for r in rows)
    assert any(" | cv 1.00 | idle 2 | " in line for line in lines)


# ------------------------------------------------------------------ sequence_aux on an empty batch
@pytest.mark.parametrize("shape", [(3, 0, D), (0, 5, D), (0, 0, D), (0, D)])
def test_sequence_aux_on_an_empty_batch_is_zero_like_the_other_losses(shape):
    cfg = moe.MoEConfig(d_model=D, d_ffn=16, num_experts=4, num_modalities=2,
                        aux_losses={"sequence_aux": 1.0, "load_balancing": 1.0, "z_loss": 1.0, "importance": 1.0})
    layer = moe.MoELayer(cfg)
    x = torch.randn(*shape, requires_grad=True)
    y, aux = layer(x)
    assert y.shape == x.shape and set(aux) == set(cfg.aux_losses)
    assert all(float(v.detach()) == 0.0 for v in aux.values()), aux
    assert all(v.requires_grad for v in aux.values())  # still connected to the graph
    sum(aux.values()).backward()
    assert layer.router.weight.grad is None or torch.count_nonzero(layer.router.weight.grad) == 0
    modality = torch.zeros(shape[:-1], dtype=torch.long)
    _, aux = layer(torch.randn(*shape), modality)
    assert all(float(v.detach()) == 0.0 for v in aux.values()), aux


def test_sequence_aux_function_with_no_tokens():
    probs = torch.zeros(0, 4, requires_grad=True)
    experts = torch.zeros(0, 2, dtype=torch.long)
    for seq_len in (None, 0, 5):
        loss = L.sequence_aux_loss(probs, experts, 4, seq_len)
        assert float(loss.detach()) == 0.0 and loss.requires_grad
        loss.backward()
    assert float(L.sequence_aux_loss(probs, experts, 4, 0, modality=torch.zeros(0, dtype=torch.long),
                                     num_modalities=2).detach()) == 0.0
    with pytest.raises(ValueError, match="seq_len"):  # with tokens, a sequence still needs a length
        L.sequence_aux_loss(torch.full((4, 4), 0.25), torch.zeros(4, 2, dtype=torch.long), 4, 0)
