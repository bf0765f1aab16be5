"""MoELayer against a dense oracle, permute/unpermute gradients, stats and bad input."""
import math

import pytest
import torch

import moe
from moe.experts import Experts, grouped_matmul, loop_matmul
from moe.ops import reference


def activation_formula(name, h):
    """The expert activations written out (independent of moe/experts.py)."""
    if name == "gelu":  # torch's exact (erf) GELU
        return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    if name == "relu":
        return torch.where(h > 0, h, torch.zeros_like(h))
    if name == "silu":
        return h * torch.sigmoid(h)
    if name == "swiglu":  # w1 columns unit-major: 2f is unit f's gate, 2f+1 its up projection
        gate, up = h[..., 0::2], h[..., 1::2]
        return gate * torch.sigmoid(gate) * up
    raise AssertionError(f"no formula for activation {name!r}")


def expert_formula(experts, e, x_TD, activation):
    """Expert e of an ``Experts`` module: act(x W1_e + b1_e) W2_e + b2_e, from its parameters."""
    h = x_TD @ experts.w1[e].to(x_TD.dtype)
    if experts.b1 is not None:
        h = h + experts.b1[e]
    y = activation_formula(activation, h) @ experts.w2[e].to(x_TD.dtype)
    return y if experts.b2 is None else y + experts.b2[e]


def dense_oracle(layer, x_TD, routing):
    """Every expert on every token, mixed by the routing weights of the kept choices."""
    E = layer.config.num_experts
    act = layer.config.activation
    all_out = torch.stack([expert_formula(layer.experts, e, x_TD, act) for e in range(E)], dim=1)  # [T, E, D]
    w = routing.weights * routing.kept
    picked = all_out.gather(1, routing.experts.unsqueeze(-1).expand(-1, -1, x_TD.shape[1]))
    return (picked * w.unsqueeze(-1).to(x_TD.dtype)).sum(1)


def randomize_biases(layer):
    with torch.no_grad():
        for ex in (layer.experts, layer.shared):
            if ex is not None and ex.b1 is not None:
                ex.b1.normal_(std=0.5)
                ex.b2.normal_(std=0.5)


ACTIVATIONS = ["gelu", "relu", "silu", "swiglu"]


CASES = [
    dict(policy="topk", top_k=2),
    dict(policy="topk", top_k=3, score="sigmoid"),
    dict(policy="switch", top_k=1, jitter_eps=0.0),
    dict(policy="gshard", top_k=2),
    dict(policy="noisy_topk", top_k=2),
    dict(policy="expert_bias", top_k=2, score="sigmoid"),
    dict(policy="expert_choice", top_k=2),
]


@pytest.mark.parametrize("router", CASES, ids=lambda r: f"{r['policy']}-k{r['top_k']}")
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("cf", [None, 1.0])
def test_layer_equals_dense_oracle(router, activation, cf):
    torch.manual_seed(0)
    cfg = moe.MoEConfig(d_model=16, d_ffn=32, num_experts=4, activation=activation,
                        router=moe.RouterConfig(capacity_factor=cf, **router))
    layer = moe.MoELayer(cfg)
    x = torch.randn(3, 10, 16)
    y, _ = layer(x, generator=torch.Generator().manual_seed(1))
    r = layer.last_routing
    if cf is None and router["policy"] != "expert_choice":
        assert r.kept.equal(r.dispatched)
    expected = dense_oracle(layer, x.reshape(-1, 16), r).view_as(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_layer_gradients_match_dense_oracle():
    torch.manual_seed(0)
    cfg = moe.MoEConfig(d_model=16, d_ffn=32, num_experts=4, router=moe.RouterConfig(top_k=2, capacity_factor=1.0))
    layer = moe.MoELayer(cfg)
    x = torch.randn(24, 16, requires_grad=True)
    y, _ = layer(x)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, layer.router.weight, layer.experts.w1, layer.experts.w2], g)
    # Oracle: recompute the same routing decisions densely.
    x2 = x.detach().clone().requires_grad_()
    r = layer.last_routing
    logits = x2 @ layer.router.weight.t()
    w = torch.softmax(logits, -1).gather(1, r.experts)
    w = w / w.sum(-1, keepdim=True)
    r2 = moe.Routing(r.experts, w, r.probs, r.logits, r.dispatched, r.kept, r.positions,
                     r.tokens_per_expert, r.capacity)
    exp = dense_oracle(layer, x2, r2)
    exp_grads = torch.autograd.grad(exp, [x2, layer.router.weight, layer.experts.w1, layer.experts.w2], g)
    for a, b in zip(grads, exp_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_shared_expert_and_residual_moe():
    torch.manual_seed(0)
    x = torch.randn(12, 16)
    cfg = moe.MoEConfig(d_model=16, d_ffn=32, num_experts=4, shared_expert_ffn=24)
    layer = moe.MoELayer(cfg)
    y, _ = layer(x)
    dense = expert_formula(layer.shared, 0, x, "gelu")
    torch.testing.assert_close(y, dense_oracle(layer, x, layer.last_routing) + dense, rtol=1e-5, atol=1e-6)
    cfg = moe.MoEConfig(d_model=16, d_ffn=32, num_experts=4, shared_expert_ffn=24, residual_moe=True)
    layer = moe.MoELayer(cfg)
    y, _ = layer(x)
    coef = torch.softmax(x @ layer.residual_coef.weight.t() + layer.residual_coef.bias, -1)
    exp = dense_oracle(layer, x, layer.last_routing) * coef[:, :1] + expert_formula(layer.shared, 0, x, "gelu") * coef[:, 1:]
    torch.testing.assert_close(y, exp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mix", ["moe", "shared", "residual"])
def test_layer_with_bias_shared_and_residual_equals_formula(activation, bias, mix):
    """y = moe(x) [+ shared(x)], or y = a*moe(x) + b*shared(x) with [a, b] = softmax(x W_c + b_c)."""
    torch.manual_seed(0)
    cfg = moe.MoEConfig(d_model=16, d_ffn=32, num_experts=4, activation=activation, bias=bias,
                        shared_expert_ffn=0 if mix == "moe" else 24, residual_moe=mix == "residual",
                        init_std=0.2, router=moe.RouterConfig(top_k=2, capacity_factor=1.0))
    layer = moe.MoELayer(cfg)
    randomize_biases(layer)
    x = torch.randn(2, 9, 16)
    y, _ = layer(x)
    x_TD = x.reshape(-1, 16)
    moe_part = dense_oracle(layer, x_TD, layer.last_routing)
    if mix == "moe":
        expected = moe_part
    else:
        s = layer.shared
        h = x_TD @ s.w1[0] + (s.b1[0] if bias else 0.0)
        shared_part = activation_formula(activation, h) @ s.w2[0] + (s.b2[0] if bias else 0.0)
        if mix == "shared":
            expected = moe_part + shared_part
        else:
            logits = x_TD @ layer.residual_coef.weight.t() + layer.residual_coef.bias
            a = torch.exp(logits[:, 0]) / torch.exp(logits).sum(-1)
            expected = a[:, None] * moe_part + (1.0 - a)[:, None] * shared_part
    torch.testing.assert_close(y.reshape(-1, 16), expected, rtol=1e-5, atol=1e-5)


def test_dropped_assignment_contributes_zero():
    torch.manual_seed(0)
    cfg = moe.MoEConfig(d_model=8, d_ffn=16, num_experts=2,
                        router=moe.RouterConfig(top_k=1, capacity_factor=0.5))
    layer = moe.MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight.zero_()  # all ties -> expert 0; capacity 4 of 16 tokens
    x = torch.randn(16, 8)
    y, _ = layer(x)
    kept = layer.last_routing.kept[:, 0]
    assert int(kept.sum()) == 4 and kept[:4].all()
    assert torch.count_nonzero(y[~kept]) == 0
    assert layer.last_stats["dropped_fraction"] == pytest.approx(0.75)


def test_grouped_matmul_equals_loop():
    torch.manual_seed(0)
    a = torch.randn(20, 16, requires_grad=True)
    b = torch.randn(3, 16, 32, requires_grad=True)
    counts = torch.tensor([5, 0, 15])
    g = torch.randn(20, 32)
    out = grouped_matmul(a, b, counts)
    ga = torch.autograd.grad(out, [a, b], g)
    ref = loop_matmul(a, b, counts)
    gr = torch.autograd.grad(ref, [a, b], g)
    torch.testing.assert_close(out, ref)
    for x, y in zip(ga, gr):
        torch.testing.assert_close(x, y)
    # Backward also works with an expanded (stride-0) incoming gradient.
    grouped_matmul(a, b, counts).sum().backward()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    loop_matmul(a2, b2, counts).sum().backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


def test_experts_forward_equals_loop_twin():
    torch.manual_seed(0)
    ex = Experts(4, 16, 32, "swiglu", bias=True)
    with torch.no_grad():
        ex.b1.normal_()
        ex.b2.normal_()
    rows, counts = torch.randn(30, 16), torch.tensor([7, 0, 20, 3])
    torch.testing.assert_close(ex(rows, counts), ex.forward_loop(rows, counts))
    start = 0
    out = ex(rows, counts)
    for e, c in enumerate(counts.tolist()):
        torch.testing.assert_close(out[start:start + c], ex.expert_mlp(e, rows[start:start + c]))
        torch.testing.assert_close(out[start:start + c], expert_formula(ex, e, rows[start:start + c], "swiglu"))
        start += c


def test_permute_unpermute_gradcheck_float64():
    torch.manual_seed(0)
    T, E, k, D = 9, 3, 2, 4
    logits = torch.randn(T, E, dtype=torch.float64)
    r = moe.route(logits, moe.RouterConfig(top_k=k, capacity_factor=0.7))
    assert not r.kept.all()
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    rows, plan = moe.permute(x, r, backend="torch")
    for t in range(T):
        for j in range(k):
            if r.kept[t, j]:
                assert torch.equal(rows[plan.dest[t, j]], x[t])
    torch.autograd.gradcheck(lambda x: moe.permute(x, r, backend="torch")[0], (x,))
    w = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(plan.num_rows, D, dtype=torch.float64, requires_grad=True)

    def f(rows, w):
        return reference.unpermute_rows(rows, plan.dest, w)

    torch.autograd.gradcheck(f, (rows, w))
    y = f(rows, w)
    for t in range(T):
        exp = sum((w[t, j] * rows[plan.dest[t, j]] for j in range(k) if r.kept[t, j]), torch.zeros(D, dtype=torch.float64))
        torch.testing.assert_close(y[t], exp)


def test_padded_layout():
    torch.manual_seed(0)
    r = moe.route(torch.randn(10, 3), moe.RouterConfig(top_k=2, capacity_factor=1.0))
    x = torch.randn(10, 4)
    rows, plan = moe.permute(x, r, pad_to_capacity=True)
    assert rows.shape == (3 * r.capacity, 4)
    compact, cplan = moe.permute(x, r)
    for e in range(3):
        n = int(r.tokens_per_expert[e])
        torch.testing.assert_close(rows[e * r.capacity:e * r.capacity + n], compact[cplan.offsets[e]:cplan.offsets[e] + n])
        assert torch.count_nonzero(rows[e * r.capacity + n:(e + 1) * r.capacity]) == 0
    torch.testing.assert_close(moe.unpermute(rows, plan, r), moe.unpermute(compact, cplan, r))
    with pytest.raises(ValueError, match="dropless"):
        moe.permute(x, moe.route(torch.randn(10, 3), moe.RouterConfig()), pad_to_capacity=True)


def test_stats_per_modality_and_aux_losses():
    torch.manual_seed(0)
    cfg = moe.MoEConfig(d_model=8, d_ffn=16, num_experts=4, num_modalities=2, limoe_min_experts=2,
                        router=moe.RouterConfig(top_k=1, drop_policy="bpr", capacity_factor=1.0),
                        aux_losses={"load_balancing": 0.5, "limoe_local": 0.1, "limoe_global": 0.2, "z_loss": 1e-3})
    layer = moe.MoELayer(cfg)
    x = torch.randn(2, 6, 8)
    modality = torch.tensor([[0] * 4 + [1] * 2] * 2)
    y, aux = layer(x, modality)
    assert set(aux) == {"load_balancing", "limoe_local", "limoe_global", "z_loss"}
    r = layer.last_routing
    torch.testing.assert_close(aux["load_balancing"],
                               0.5 * moe.losses.load_balancing_loss(r.probs, r.experts, 4, modality=r.modality, num_modalities=2))
    by_mod = layer.last_stats["tokens_per_expert_by_modality"]
    assert by_mod.shape == (2, 4) and int(by_mod.sum()) == int(r.kept.sum())
    assert torch.equal(by_mod.sum(0), layer.last_stats["tokens_per_expert"])
    mflat = modality.reshape(-1)
    for m in range(2):
        exp = torch.bincount(r.experts[r.kept[:, 0] & (mflat == m), 0], minlength=4)
        assert torch.equal(by_mod[m], exp)
    p = r.probs.detach()
    ent = float(-(p * p.log()).sum(-1).mean())
    assert layer.last_stats["router_entropy"] == pytest.approx(ent, rel=1e-5)


def test_expert_bias_update_lowers_overloaded_expert():
    cfg = moe.MoEConfig(d_model=4, d_ffn=8, num_experts=4, aux_losses={},
                        router=moe.RouterConfig(top_k=1, policy="expert_bias", expert_bias_rate=0.1))
    layer = moe.MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 10.0  # everything to expert 0
    x = torch.zeros(8, 4)
    x[:, 0] = 1.0
    layer(x)
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    assert layer.router.expert_bias.grad is None
    layer.eval()
    layer(x)  # no update in eval
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))


def test_jitter_only_in_training():
    cfg = moe.MoEConfig(d_model=8, d_ffn=16, num_experts=4,
                        router=moe.RouterConfig(top_k=1, policy="switch", jitter_eps=0.1))
    layer = moe.MoELayer(cfg)
    x = torch.randn(5, 8)
    l1 = layer.router.logits(x, torch.Generator().manual_seed(0))
    l2 = layer.router.logits(x, torch.Generator().manual_seed(1))
    assert not torch.allclose(l1, l2)
    layer.eval()
    torch.testing.assert_close(layer.router.logits(x), x @ layer.router.weight.t())


def _jitter_router(eps, weight):
    E, D = weight.shape
    cfg = moe.MoEConfig(d_model=D, d_ffn=4, num_experts=E,
                        router=moe.RouterConfig(top_k=1, policy="switch", jitter_eps=eps))
    layer = moe.MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight.copy_(weight)
    return layer


def test_jitter_multiplier_is_uniform_in_one_plus_minus_eps():
    """Switch jitter multiplies each input element by m ~ U(1 - eps, 1 + eps), independently."""
    eps, T, D = 0.5, 4000, 8
    router = _jitter_router(eps, torch.eye(D)).router  # W = I, x = 1: the logits are m itself
    m = router.logits(torch.ones(T, D), torch.Generator().manual_seed(3))
    assert m.shape == (T, D)
    assert float(m.min()) >= 1 - eps and float(m.max()) <= 1 + eps
    assert float(m.min()) < 1 - eps + 0.01 and float(m.max()) > 1 + eps - 0.01
    assert abs(float(m.mean()) - 1.0) < 0.01
    # Uniform: each tenth of the interval holds about a tenth of the draws.
    hist = torch.histc(m, bins=10, min=1 - eps, max=1 + eps) / m.numel()
    torch.testing.assert_close(hist, torch.full((10,), 0.1), rtol=0, atol=0.01)
    # Variance of U(a, b) is (b - a)^2 / 12.
    assert abs(float(m.var()) - (2 * eps) ** 2 / 12) < 0.005
    # One multiplier per element, not per token.
    assert float(m.std(dim=1).min()) > 0


def test_jitter_logits_equal_jittered_input_times_weight():
    eps, T, D = 0.3, 40, 8
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(4))
    W = torch.randn(D, D, generator=torch.Generator().manual_seed(5))
    m = _jitter_router(eps, torch.eye(D)).router.logits(torch.ones(T, D), torch.Generator().manual_seed(6))
    layer = _jitter_router(eps, W)
    expected = (x * m) @ W.t()
    torch.testing.assert_close(layer.router.logits(x, torch.Generator().manual_seed(6)), expected)
    layer(x, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(layer.last_routing.logits, expected)
    # No jitter in eval mode, nor with eps = 0.
    layer.eval()
    torch.testing.assert_close(layer.router.logits(x, torch.Generator().manual_seed(6)), x @ W.t(), rtol=0, atol=0)
    layer(x, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(layer.last_routing.logits, x @ W.t(), rtol=0, atol=0)
    plain = _jitter_router(0.0, W)
    torch.testing.assert_close(plain.router.logits(x, torch.Generator().manual_seed(6)), x @ W.t(), rtol=0, atol=0)


def test_nonfinite_skip_passes_through_zero():
    cfg = moe.MoEConfig(d_model=4, d_ffn=8, num_experts=2, router=moe.RouterConfig(top_k=1, on_nonfinite="skip"))
    layer = moe.MoELayer(cfg, name="blk0")
    x = torch.randn(3, 4)
    x[1, 2] = float("inf")
    y, aux = layer(x)
    assert torch.count_nonzero(y) == 0 and layer.last_stats["skipped"]
    assert all(float(v) == 0.0 for v in aux.values())
    layer = moe.MoELayer(moe.MoEConfig(d_model=4, d_ffn=8, num_experts=2), name="blk0")
    with pytest.raises(FloatingPointError, match="blk0"):
        layer(x)


def test_half_precision_input_keeps_dtype():
    cfg = moe.MoEConfig(d_model=16, d_ffn=32, num_experts=4)
    layer = moe.MoELayer(cfg).to(torch.bfloat16)
    y, _ = layer(torch.randn(6, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert layer.last_routing.probs.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_half_precision_matches_fp32_by_value(dtype, activation):
    """A half-precision layer equals an fp32 layer holding the same (rounded) parameters, run on the
    same (upcast) input: the router works in fp32, so its probs, weights, choices and aux losses agree
    to fp32 round-off; the expert MLPs and the mixing run in ``dtype``, so the output agrees within a
    few roundings to ``dtype``. Each of h, act(h), an expert output, the weighted combine and the
    shared-expert sum is rounded once (relative error <= eps/2 each): 5 * eps/2 of the output's scale.
    """
    torch.manual_seed(0)
    cfg = moe.MoEConfig(d_model=16, d_ffn=32, num_experts=4, activation=activation, init_std=0.2,
                        shared_expert_ffn=8, aux_losses={"load_balancing": 0.01, "z_loss": 1e-3},
                        router=moe.RouterConfig(top_k=2))
    half = moe.MoELayer(cfg).to(dtype)
    full = moe.MoELayer(cfg)
    with torch.no_grad():
        for p_full, p_half in zip(full.parameters(), half.parameters()):
            p_full.copy_(p_half.float())
    x = torch.randn(64, 16).to(dtype)
    y, aux = half(x)
    y_ref, aux_ref = full(x.float())
    r, r_ref = half.last_routing, full.last_routing
    assert y.dtype == dtype
    assert r.probs.dtype == torch.float32 and r.weights.dtype == torch.float32
    assert torch.equal(r.experts, r_ref.experts)
    torch.testing.assert_close(r.logits, r_ref.logits, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(r.probs, r_ref.probs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(r.weights, r_ref.weights, rtol=1e-6, atol=1e-7)
    for name in aux_ref:
        assert aux[name].dtype == torch.float32
        torch.testing.assert_close(aux[name], aux_ref[name], rtol=1e-6, atol=1e-9)
    scale = float(y_ref.abs().max())
    assert scale > 0.1
    err = float((y.float() - y_ref).abs().max())
    assert err <= 2.5 * torch.finfo(dtype).eps * scale, (err, scale)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, match", [
    (dict(router=moe.RouterConfig(top_k=5)), r"'MoEConfig.router.top_k': got 5; it must be in \[1, num_experts=4\]"),
    (dict(num_experts=0), "'MoEConfig.num_experts': got 0; it must be >= 1"),
    (dict(activation="tanh"), "'MoEConfig.activation': got 'tanh'; allowed values: 'gelu'"),
    (dict(aux_losses={"nope": 1.0}), "'MoEConfig.aux_losses.nope' is not known"),
    (dict(aux_losses={"z_loss": -1.0}), "'MoEConfig.aux_losses.z_loss': got -1.0; it must be >= 0"),
    (dict(aux_losses={"load": 1.0}), "noisy_topk"),
    (dict(backend="fpga"), "'MoEConfig.backend': got 'fpga'"),
    (dict(residual_moe=True), "'MoEConfig.residual_moe'.*shared_expert_ffn"),
    (dict(limoe_min_experts=9), r"'MoEConfig.limoe_min_experts': got 9; it must be in \(0, 4\]"),
])
def test_bad_moe_config(kwargs, match):
    base = dict(d_model=8, d_ffn=16, num_experts=4)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        moe.MoEConfig(**base)


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=0), "'RouterConfig.top_k': got 0; it must be >= 1"),
    (dict(capacity_factor=0.0), "'RouterConfig.capacity_factor': got 0.0; it must be > 0"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(eval_capacity_factor=0), "eval_capacity_factor"),
    (dict(min_capacity=-1), "'RouterConfig.min_capacity': got -1"),
    (dict(policy="hash"), "'RouterConfig.policy': got 'hash'"),
    (dict(score="relu"), "'RouterConfig.score': got 'relu'"),
    (dict(drop_policy="lifo"), "'RouterConfig.drop_policy': got 'lifo'"),
    (dict(policy="switch", top_k=2), "switch"),
    (dict(policy="gshard", top_k=1), "gshard"),
    (dict(on_nonfinite="ignore"), "on_nonfinite"),
])
def test_bad_router_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        moe.RouterConfig(**kwargs)


def test_bad_layer_input():
    layer = moe.MoELayer(moe.MoEConfig(d_model=8, d_ffn=16, num_experts=4, num_modalities=2))
    with pytest.raises(ValueError, match="d_model=8"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match="floating-point"):
        layer(torch.ones(3, 8, dtype=torch.long))
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="modality has shape"):
        layer(x, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="num_modalities=2"):
        layer(x, torch.full((2, 3), 2))
    with pytest.raises(ValueError, match="num_modalities=2"):
        layer(x, torch.full((2, 3), -1))
    with pytest.raises(ValueError, match="integer"):
        layer(x, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="top_k': got 3; it must be in \\[1, num_experts=2\\]"):
        moe.route(torch.randn(4, 2), moe.RouterConfig(top_k=3))


def test_padded_experts_equal_grouped():
    torch.manual_seed(0)
    ex = Experts(3, 16, 32, "gelu", bias=True)
    r = moe.route(torch.randn(20, 3), moe.RouterConfig(top_k=2, capacity_factor=1.0))
    x = torch.randn(20, 16)
    rows, plan = moe.permute(x, r, pad_to_capacity=True)
    compact, cplan = moe.permute(x, r)
    y_pad = moe.unpermute(ex(rows, plan.rows_per_expert, padded_capacity=plan.padded_capacity), plan, r)
    y = moe.unpermute(ex(compact, cplan.rows_per_expert), cplan, r)
    torch.testing.assert_close(y_pad, y)


def test_torch_compile_fullgraph_equals_eager():
    torch.manual_seed(0)
    torch._dynamo.reset()
    cfg = moe.MoEConfig(d_model=16, d_ffn=32, num_experts=4, shared_expert_ffn=8,
                        router=moe.RouterConfig(top_k=2, capacity_factor=1.0, drop_policy="bpr"),
                        aux_losses={"load_balancing": 0.01, "z_loss": 1e-3})
    layer = moe.MoELayer(cfg)
    x = torch.randn(32, 16)
    compiled = torch.compile(layer, fullgraph=True)
    y, aux = compiled(x)
    dropped = layer.last_stats["dropped_fraction"]
    grads = torch.autograd.grad(y.sum() + sum(aux.values()), [layer.router.weight, layer.experts.w1])
    y_ref, aux_ref = layer(x)
    grads_ref = torch.autograd.grad(y_ref.sum() + sum(aux_ref.values()), [layer.router.weight, layer.experts.w1])
    assert dropped > 0 and layer.last_stats["dropped_fraction"] == dropped
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for k in aux_ref:
        torch.testing.assert_close(aux[k], aux_ref[k])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
