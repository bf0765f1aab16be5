"""Activation checkpointing replays routing: gradients equal those without it (``moe.recompute``).

Oracle: the same model (same weights, inputs and seeds) without checkpointing. Every routing
policy and every drop policy, in both modes (``moe``: the MoE layer; ``block``: whole blocks),
in fp32: the loss, every parameter gradient and the input gradient agree to 1e-6, and the
routing state after the step (statistics, expert bias, pending load, the caller's generator)
is the same. The random draws come from an explicit ``torch.Generator`` (which
``torch.utils.checkpoint`` does not restore) in the layer tests and from the per-block seeded
global RNG (with dropout) in the model tests; the expert-bias layers update their bias inside
the forward (library default), so a recompute that re-read the bias or updated it again would
show. Also: a trainer run with ``train.activation_checkpointing=block`` equals ``none`` exactly,
and one expert-parallel test (ep=2, gloo) in both modes.
"""
from __future__ import annotations

import pytest
import torch

import moe
from parallel.checks import ConfigError
from moe.config import DROP_POLICIES, POLICIES
from moe.layer import MoELayer
from moe.models.transformer import Transformer, TransformerConfig, init_weights
from parallel.rng import micro_batch_scope, seed_block
from moe.models.activation_checkpointing import apply_activation_checkpointing
from moe.recompute import MODES
from tests.helpers.distributed import run_distributed

D, F, E, T = 8, 16, 4, 24
ATOL = 1e-6


def router_config(policy: str, drop: str) -> moe.RouterConfig:
    kw = dict(policy=policy, top_k=1 if policy == "switch" else 2, capacity_factor=1.0, drop_policy=drop,
              expert_bias_rate=0.05)
    if policy == "switch":
        kw["jitter_eps"] = 0.2
    return moe.RouterConfig(**kw)


def moe_config(policy: str, drop: str, d_model: int = D, **extra) -> moe.MoEConfig:
    aux = {"load_balancing": 0.01, "z_loss": 0.001}
    if policy == "noisy_topk":
        aux["load"] = 0.01
    return moe.MoEConfig(d_model=d_model, d_ffn=F, num_experts=E, router=router_config(policy, drop),
                         aux_losses=aux, **extra)


def _perturb_router(layers, seed: int = 1) -> None:
    """Non-zero noise projections (noisy top-k starts at 0) and a non-zero expert bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            if layer.router.noise_weight is not None:
                layer.router.noise_weight.normal_(0.0, 0.5, generator=g)
            layer.router.expert_bias.normal_(0.0, 0.01, generator=g)


def _grads(module) -> dict:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _assert_same(out, ref, what: str) -> None:
    torch.testing.assert_close(out["loss"], ref["loss"], rtol=0, atol=ATOL, msg=f"{what}: loss")
    assert out["grads"].keys() == ref["grads"].keys(), what
    for name in ref["grads"]:
        torch.testing.assert_close(out["grads"][name], ref["grads"][name], rtol=0, atol=ATOL,
                                   msg=f"{what}: gradient of {name}")
    torch.testing.assert_close(out["x_grad"], ref["x_grad"], rtol=0, atol=ATOL, msg=f"{what}: input gradient")
    assert len(out["state"]) == len(ref["state"]), what
    for got, want in zip(out["state"], ref["state"]):
        assert got.keys() == want.keys(), what
        for key in want:
            a, b = got[key], want[key]
            same = torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b
            assert same, f"{what}: routing state {key} {a!r} vs {b!r}"


def _layer_state(layer: MoELayer) -> dict:
    stats = {k: v for k, v in layer.last_stats.items()}
    stats["expert_bias"] = layer.router.expert_bias.clone()
    stats["pending_load"] = "none" if layer._pending_load is None else layer._pending_load.clone()
    stats["kept"] = layer.last_routing.kept.clone()
    return stats


# ----------------------------------------------------------------------------- one layer, explicit generator

def _layer_step(policy: str, drop: str, mode: str, counter: list, ep_group=None, seed: int = 99) -> dict:
    torch.manual_seed(0)
    layer = MoELayer(moe_config(policy, drop, shared_expert_ffn=8, residual_moe=True), ep_group=ep_group)
    _perturb_router([layer])
    apply_activation_checkpointing(layer, mode)
    inner = layer._compute

    def counted(*a, **kw):
        counter.append(1)
        return inner(*a, **kw)

    layer._compute = counted
    g = torch.Generator().manual_seed(1234)
    data = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T // 2, D, generator=data).requires_grad_(True)
    w = torch.randn(2, T // 2, D, generator=data)
    y, aux = layer(x, generator=g)
    loss = (y * w).sum() + sum(aux.values())
    loss.backward()
    state = _layer_state(layer)
    state["generator"] = g.get_state()  # the recompute puts the caller's generator back
    return {"loss": loss.detach(), "grads": _grads(layer), "x_grad": x.grad.clone(), "state": [state]}


@pytest.mark.parametrize("drop", DROP_POLICIES)
@pytest.mark.parametrize("policy", POLICIES)
def test_layer_checkpointing_replays_routing_with_a_generator(policy, drop):
    calls = []
    ref = _layer_step(policy, drop, "none", calls)
    assert len(calls) == 1
    calls.clear()
    out = _layer_step(policy, drop, "moe", calls)
    assert len(calls) == 2  # the forward, and its recompute in the backward
    _assert_same(out, ref, f"{policy}/{drop} moe")


def test_the_replay_is_needed_with_a_generator(monkeypatch):
    """Plain ``torch.utils.checkpoint`` does not restore an explicit generator: GShard's random second
    expert then differs in the recompute. The replay catches it (and makes the gradients right)."""
    from moe import recompute

    def no_tape():
        return None

    calls = []
    ref = _layer_step("gshard", "random", "none", calls)
    out = _layer_step("gshard", "random", "moe", calls)
    _assert_same(out, ref, "gshard/random with the replay")
    # Without the tape, the layer's router runs from the generator's current state in the recompute.
    monkeypatch.setattr(recompute, "current_tape", no_tape)
    with pytest.raises((AssertionError, RuntimeError)):  # checkpoint's metadata check, or a wrong gradient
        broken = _layer_step("gshard", "random", "moe", calls)
        _assert_same(broken, ref, "gshard/random without the replay")


# ----------------------------------------------------------------------------- models, seeded global RNG

def _model(policy: str, drop: str, mode: str, *, ep_group=None, dp_group=None, n_layers: int = 4) -> Transformer:
    cfg = TransformerConfig(d_model=D, n_layers=n_layers, n_heads=2, d_ffn=F, moe_every=2,
                            moe=moe_config(policy, drop), dropout=0.1)
    model = Transformer(cfg, ep_group=ep_group, dp_group=dp_group)
    init_weights(model, 0)
    _perturb_router(model.moe_layers())
    return apply_activation_checkpointing(model, mode)


def _model_step(model: Transformer, seed: int = 5, padded: bool = True) -> dict:
    data = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T // 2, D, generator=data).requires_grad_(True)
    w = torch.randn(2, T // 2, D, generator=data)
    mask = torch.ones(2, T // 2, dtype=torch.bool)
    if padded:
        mask[1, -3:] = False
    with micro_batch_scope(seed):
        y, aux = model(x, key_padding_mask=mask)
    loss = (y * w).sum() + sum(aux.values())
    loss.backward()
    return {"loss": loss.detach(), "grads": _grads(model), "x_grad": x.grad.clone(),
            "state": [_layer_state(layer) for layer in model.moe_layers()]}


@pytest.mark.parametrize("drop", DROP_POLICIES)
@pytest.mark.parametrize("policy", POLICIES)
def test_model_checkpointing_equals_no_checkpointing(policy, drop):
    ref = _model_step(_model(policy, drop, "none"))
    for mode in ("moe", "block"):
        _assert_same(_model_step(_model(policy, drop, mode)), ref, f"{policy}/{drop} {mode}")


def test_block_mode_recomputes_each_block_once_and_routes_once(monkeypatch):
    """Block mode runs each block twice: the forward, and its recompute in the backward."""
    model = _model("gshard", "random", "block")
    forwards = []
    original = type(model.blocks[0])._forward

    def counted(self, *a, **kw):
        forwards.append(self.index)
        return original(self, *a, **kw)

    monkeypatch.setattr(type(model.blocks[0]), "_forward", counted)
    _model_step(model)
    assert sorted(forwards) == sorted(2 * list(range(4)))


def test_halves_called_by_the_model_are_checkpointed():
    """A model that calls ``attend`` and ``feed_forward`` itself (LIMoE) gets each half checkpointed."""
    def step(mode):
        model = _model("noisy_topk", "random", mode)
        data = torch.Generator().manual_seed(3)
        x = torch.randn(2, T // 2, D, generator=data).requires_grad_(True)
        modality = torch.randint(0, 1, (2 * (T // 2),))
        h = x
        aux_total = 0.0
        with micro_batch_scope(8):
            for block in model.blocks:
                seed_block(block.index)
                h = block.attend(h)
                y, aux = block.feed_forward(h.reshape(-1, D), modality)
                h = y.view_as(h)
                aux_total = aux_total + sum(aux.values())
        loss = (h ** 2).sum() + aux_total
        loss.backward()
        return {"loss": loss.detach(), "grads": _grads(model), "x_grad": x.grad.clone(),
                "state": [_layer_state(layer) for layer in model.moe_layers()]}

    _assert_same(step("block"), step("none"), "halves, block")


def test_no_checkpointing_without_gradients(monkeypatch):
    from moe import recompute

    def refuse(*a, **kw):
        raise AssertionError("checkpointed without gradients")

    monkeypatch.setattr(recompute, "_torch_checkpoint", refuse)
    model = _model("gshard", "random", "block").eval()
    ref = _model("gshard", "random", "none").eval()
    x = torch.randn(2, T // 2, D)
    with torch.no_grad(), micro_batch_scope(4):  # the random drop policy draws in eval too
        torch.testing.assert_close(model(x)[0], ref(x)[0], rtol=0, atol=0)


def test_modes_and_errors():
    assert MODES == ("none", "moe", "block")
    from moe.trainer.config import ACTIVATION_CHECKPOINTING

    assert ACTIVATION_CHECKPOINTING == MODES
    with pytest.raises(ValueError, match="'none', 'moe', 'block'"):
        apply_activation_checkpointing(_model("topk", "position", "none"), "full")
    with pytest.raises(ValueError, match="needs transformer blocks"):
        apply_activation_checkpointing(MoELayer(moe_config("topk", "position")), "block")
    model = apply_activation_checkpointing(_model("topk", "position", "block"), "none")
    assert not any(b.recompute for b in model.blocks) and not any(m.recompute for m in model.moe_layers())
    from moe.models.transformer import compile_blocks

    with pytest.raises(ValueError, match="compiled"):
        apply_activation_checkpointing(compile_blocks(_model("topk", "position", "none")), "moe")
    with pytest.raises(ValueError, match="activation checkpointing"):
        compile_blocks(_model("topk", "position", "moe"))


def test_trainer_config_key():
    from moe.trainer.config import from_dict

    base = {"task": "lm", "model": {}}
    assert from_dict(base).train.activation_checkpointing == "none"
    assert from_dict({**base, "train": {"activation_checkpointing": "block"}}).train.activation_checkpointing == "block"
    with pytest.raises(ConfigError, match=r"train\.activation_checkpointing.*'full'.*'none', 'moe', 'block'"):
        from_dict({**base, "train": {"activation_checkpointing": "full"}})
    with pytest.raises(ConfigError, match=r"train\.activation_checkpointing.*train\.compile"):
        from_dict({**base, "train": {"activation_checkpointing": "moe", "compile": True}})


def test_a_nondeterministic_recompute_is_refused():
    """Routing that changes between the forward and the recompute raises instead of a wrong gradient."""
    layer = apply_activation_checkpointing(MoELayer(moe_config("topk", "position")), "moe")
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    y, aux = layer(x)
    with torch.no_grad():  # another router: the recompute would pick other experts
        layer.router.weight.copy_(torch.randn(E, D, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(RuntimeError, match="differs from the first forward"):
        (y.sum() + sum(aux.values())).backward()


# ----------------------------------------------------------------------------- trainer and expert parallelism

@pytest.mark.slow
def test_trainer_block_checkpointing_trains_exactly_like_none(tmp_path):
    from tests.helpers.layout import CAPACITY, TINY_LM, assert_same_training, run_layout

    extra = CAPACITY + ["model.dropout=0.1", "model.n_layers=4", "train.steps=3"]
    ref = run_layout(TINY_LM, 1, tmp_path / "none", overrides=extra)
    assert max(row["train/drop_rate"] for row in ref.metrics) > 0
    run = run_layout(TINY_LM, 1, tmp_path / "block", overrides=extra + ["train.activation_checkpointing=block"])
    assert_same_training(run, ref, rtol=0.0)


def _ep_rank(rank, world):
    from parallel.dims import ParallelDims

    groups = ParallelDims.from_world(world, ep=2).build()
    out = {}
    for policy, drop in (("gshard", "random"), ("expert_bias", "bpr")):
        ref = _model_step(_model(policy, drop, "none", ep_group=groups.ep_group, dp_group=groups.dp_group,
                                 n_layers=2), seed=5 + rank, padded=rank == 1)
        for mode in ("moe", "block"):
            model = _model(policy, drop, mode, ep_group=groups.ep_group, dp_group=groups.dp_group, n_layers=2)
            _assert_same(_model_step(model, seed=5 + rank, padded=rank == 1), ref, f"ep=2 {policy}/{drop} {mode}")
            out[(policy, mode)] = model.moe_layers()[0].last_stats["bytes_sent"]
        # the layer experts are split over the ep ranks and tokens really travel
        assert model.moe_layers()[0].num_local_experts == E // 2
    # One layer with an explicit generator (which torch's checkpoint does not restore), 'moe' mode.
    for policy, drop in (("gshard", "random"), ("noisy_topk", "position")):
        calls = []
        ref = _layer_step(policy, drop, "none", calls, ep_group=groups.ep_group, seed=99 + rank)
        got = _layer_step(policy, drop, "moe", calls, ep_group=groups.ep_group, seed=99 + rank)
        assert len(calls) == 3  # the reference forward, the forward and its recompute
        _assert_same(got, ref, f"ep=2 layer {policy}/{drop} moe, generator")
    return out


@pytest.mark.distributed
def test_expert_parallel_checkpointing_equals_no_checkpointing():
    results = run_distributed(_ep_rank, 2, timeout=180)
    assert all(v > 0 for r in results for v in r.values())
