"""The token-level fused expert MLP (``moe::expert_mlp_tokens``, cpp backend) against oracles.

Legend: T tokens, k choices, E experts, N kept rows (expert-major), D width, F expert width.

The op reads each expert's rows from x[T, D] in place (through dest[T, k]) and combines the
outputs with the routing weights itself: y[t] = sum_j w[t, j] * mlp_e(x[t]). Oracles:
- a per-expert loop written here (gather the tokens of expert e, apply its MLP with plain
  torch ops, ``index_add`` the weighted outputs), with autograd for every gradient: x, the
  routing weights, w1, b1, w2, b2;
- ``MoELayer`` with ``backend="torch"`` (permute -> grouped_mm experts -> unpermute), which
  the cpp layer must match (output, aux losses, every parameter and input gradient);
- the autograd graph itself: no [N, D] tensor (permuted input or expert output) is saved
  for the backward on the fused path, while the torch path does save them.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moe
from moe.experts import Experts
from moe.ops import get_backend, registry
from moe.ops.library import ACTIVATION_CODES

ACTIVATIONS = list(ACTIVATION_CODES)
TOL = {torch.float32: 2e-5, torch.float64: 1e-11}


def setup_module():
    if registry.cpp.unavailable_reason() is not None:  # the C++ extension must be built here
        pytest.fail(registry.cpp.unavailable_reason())


def _ops():
    return get_backend("cpp", "cpu").ops


def _plan(T, k, E, *, drop=0.0, absent=(), seed=0):
    """A routing written out by hand: k distinct experts per token (never one in ``absent``),
    a fraction ``drop`` of the assignments dropped, rows expert-major and, inside an expert,
    in flat assignment order. Returns dest[T, k] (-1: dropped), counts[E], experts[T, k]."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=gen)
    scores[:, list(absent)] = -1.0
    experts = scores.argsort(1, descending=True)[:, :k]
    kept = torch.rand(T, k, generator=gen) >= drop
    counts = torch.bincount(experts[kept], minlength=E)
    offsets = torch.cumsum(counts, 0) - counts
    dest = torch.full((T, k), -1, dtype=torch.long)
    seen = [0] * E
    for t in range(T):
        for j in range(k):
            if kept[t, j]:
                e = int(experts[t, j])
                dest[t, j] = offsets[e] + seen[e]
                seen[e] += 1
    return dest, counts, experts


def _experts(activation, *, bias, E, D, F_, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    ex = Experts(E, D, F_, activation, bias=bias, dtype=dtype)
    with torch.no_grad():
        ex.w1.normal_(std=0.3)
        ex.w2.normal_(std=0.3)
        if bias:
            ex.b1.normal_(std=0.5)
            ex.b2.normal_(std=0.5)
    return ex


def _act(h, activation):
    if activation == "swiglu":
        return F.silu(h[:, 0::2]) * h[:, 1::2]
    return {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[activation](h)


def _naive(x, dest, w, experts, ex):
    """The oracle: for each expert, its MLP on the tokens routed (and kept) there, weighted, summed."""
    y = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, w.dtype))
    for e in range(ex.num_local):
        t, j = torch.nonzero((experts == e) & (dest >= 0), as_tuple=True)
        h = x[t] @ ex.w1[e].to(x.dtype)
        if ex.b1 is not None:
            h = h + ex.b1[e].to(x.dtype)
        out = _act(h, ex.activation) @ ex.w2[e].to(x.dtype)
        if ex.b2 is not None:
            out = out + ex.b2[e].to(x.dtype)
        y = y.index_add(0, t, out.to(y.dtype) * w[t, j].to(y.dtype)[:, None])
    return y


def _fused(x, dest, w, counts, ex):
    dtype = x.dtype
    b1 = None if ex.b1 is None else ex.b1.to(dtype)
    b2 = None if ex.b2 is None else ex.b2.to(dtype)
    return _ops().expert_mlp_tokens(x, dest, w, counts, ex.w1.to(dtype), b1, ex.w2.to(dtype), b2, ex.activation)


def _run(fn, x, w, ex, grad_y):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = fn(x, w)
    inputs = [x, w] + list(ex.parameters())
    return [y] + list(torch.autograd.grad(y, inputs, grad_y))


def _assert_matches(ex, T, k, *, drop=0.0, absent=(), dtype=torch.float32, rtol=None, atol=None):
    dest, counts, experts = _plan(T, k, ex.num_local, drop=drop, absent=absent)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(T, ex.d_model, generator=gen).to(dtype)
    w = torch.rand(T, k, generator=gen)  # fp32 routing weights, as the router gives them
    grad_y = torch.randn(T, ex.d_model, generator=gen).to(torch.promote_types(dtype, w.dtype))
    got = _run(lambda x, w: _fused(x, dest, w, counts, ex), x, w, ex, grad_y)
    want = _run(lambda x, w: _naive(x, dest, w, experts, ex), x, w, ex, grad_y)
    names = ["y", "x", "weights"] + [n for n, _ in ex.named_parameters()]
    tol = TOL.get(dtype)
    for name, g, r in zip(names, got, want):
        assert g.dtype == r.dtype, name
        torch.testing.assert_close(g, r, rtol=rtol or tol, atol=atol or tol, msg=lambda m, n=name: f"{n}: {m}")
    return dest, counts


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_naive_loop_with_drops_and_empty_experts(activation, bias, dtype):
    ex = _experts(activation, bias=bias, E=5, D=24, F_=40, dtype=dtype)
    # 700 tokens x 2 choices over 3 live experts: ~370 rows each (more than one 256-row tile);
    # experts 0 and 3 get none; 15% of the assignments dropped (-1 in dest, zero weight gradient).
    dest, counts = _assert_matches(ex, 700, 2, drop=0.15, absent=(0, 3), dtype=dtype)
    assert counts[0] == counts[3] == 0 and counts.max() > 256 and (dest < 0).any()


@pytest.mark.parametrize("k", [1, 4, 8])
def test_matches_for_many_choices(k):
    ex = _experts("gelu", bias=True, E=8, D=16, F_=32)
    _assert_matches(ex, 300, k, drop=0.2)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_matches_with_hidden_units_split_over_chunks(activation):
    # F = 1200 > 512 units per backward task: the routing-weight gradient is summed over the
    # unit chunks (and the b2 term added once).
    ex = _experts(activation, bias=True, E=2, D=16, F_=1200)
    _assert_matches(ex, 150, 2)


def test_bf16_rows_with_fp32_weights_give_fp32_output():
    # Mixed precision: the rows compute in bf16, the combine runs in fp32 with the fp32 weights.
    # The truth is the float64 loop on the same (bf16-representable) values; the fused op must be
    # as accurate as the naive loop run in bf16 (relative L2 error of y and of every gradient).
    ex = _experts("gelu", bias=True, E=4, D=32, F_=64)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(p.bfloat16().float())
    dest, counts, experts = _plan(200, 2, 4, drop=0.1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(200, 32, generator=gen).bfloat16()
    w, grad_y = torch.rand(200, 2, generator=gen), torch.randn(200, 32, generator=gen)
    fused = _run(lambda x, w: _fused(x, dest, w, counts, ex), x, w, ex, grad_y)
    naive = _run(lambda x, w: _naive(x, dest, w, experts, ex), x, w, ex, grad_y)
    ex64 = _experts("gelu", bias=True, E=4, D=32, F_=64, dtype=torch.float64)
    ex64.load_state_dict({k: v.double() for k, v in ex.state_dict().items()})
    truth = _run(lambda x, w: _naive(x, dest, w, experts, ex64), x.double(), w.double(), ex64, grad_y.double())
    assert fused[0].dtype == torch.float32 and fused[1].dtype == torch.bfloat16
    names = ["y", "x", "weights"] + [n for n, _ in ex.named_parameters()]
    for name, f, n, t in zip(names, fused, naive, truth):
        def rel(a, t=t):
            return float((a.detach().double() - t.detach()).norm() / t.detach().norm())
        assert rel(f) <= max(2 * rel(n), 1e-3) and rel(f) < 2e-2, (name, rel(f), rel(n))


def test_every_assignment_dropped_gives_zero():
    ex = _experts("relu", bias=True, E=3, D=8, F_=16)
    dest = torch.full((5, 2), -1)
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.rand(5, 2, requires_grad=True)
    y = _fused(x, dest, w, torch.zeros(3, dtype=torch.long), ex)
    assert torch.equal(y, torch.zeros(5, 8))
    y.sum().backward()
    assert torch.count_nonzero(x.grad) == 0 and torch.count_nonzero(w.grad) == 0
    assert torch.count_nonzero(ex.w1.grad) == 0 and torch.count_nonzero(ex.b2.grad) == 0


def test_same_thread_count_repeats_bit_for_bit():
    ex = _experts("silu", bias=True, E=4, D=32, F_=96)
    dest, counts, _ = _plan(500, 2, 4, drop=0.1)
    x, w, grad_y = torch.randn(500, 32), torch.rand(500, 2), torch.randn(500, 32)
    first = _run(lambda x, w: _fused(x, dest, w, counts, ex), x, w, ex, grad_y)
    again = _run(lambda x, w: _fused(x, dest, w, counts, ex), x, w, ex, grad_y)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_errors_name_the_value():
    ex = _experts("gelu", bias=False, E=2, D=8, F_=16)
    x, w = torch.randn(3, 8), torch.rand(3, 2)
    dest = torch.tensor([[0, 2], [1, -1], [3, -1]])
    counts = torch.tensor([2, 2])
    _fused(x, dest, w, counts, ex)  # valid
    with pytest.raises(ValueError, match="row 3 receives no assignment"):
        _fused(x, torch.tensor([[0, 2], [1, -1], [-1, -1]]), w, counts, ex)
    with pytest.raises(ValueError, match="names row 2 twice"):
        _fused(x, torch.tensor([[0, 2], [1, -1], [2, -1]]), w, counts, ex)
    with pytest.raises(ValueError, match="dest value 4 .* out of range"):
        _fused(x, torch.tensor([[0, 2], [1, -1], [4, -1]]), w, counts, ex)
    with pytest.raises(ValueError, match="weights must have the shape of dest"):
        _fused(x, dest, torch.rand(3, 1), counts, ex)
    with pytest.raises(ValueError, match="counts has 3 experts"):
        _fused(x, dest, w, torch.tensor([2, 2, 0]), ex)
    with pytest.raises(ValueError, match="activation"):
        _ops().expert_mlp_tokens(x, dest, w, counts, ex.w1, None, ex.w2, None, "tanh")


def test_second_backward_through_the_same_graph_fails_clearly():
    ex = _experts("gelu", bias=False, E=2, D=8, F_=16)
    dest, counts, _ = _plan(20, 2, 2)
    y = _fused(torch.randn(20, 8, requires_grad=True), dest, torch.rand(20, 2), counts, ex)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# ------------------------------------------------------------------ the layer
def _layers(router: moe.RouterConfig, activation="gelu", bias=False):
    kw = dict(d_model=16, d_ffn=32, num_experts=6, activation=activation, bias=bias, router=router,
              aux_losses={"load_balancing": 0.01, "z_loss": 0.001})
    torch.manual_seed(0)
    fast = moe.MoELayer(moe.MoEConfig(backend="cpp", **kw))
    ref = moe.MoELayer(moe.MoEConfig(backend="torch", **kw))
    ref.load_state_dict(fast.state_dict())
    with torch.no_grad():
        for layer in (fast, ref):
            if bias:
                layer.experts.b1.copy_(torch.linspace(-1, 1, layer.experts.b1.numel()).view_as(layer.experts.b1))
                layer.experts.b2.copy_(torch.linspace(1, -1, layer.experts.b2.numel()).view_as(layer.experts.b2))
    return fast, ref


def _layer_grads(layer, x):
    x = x.detach().requires_grad_()
    y, aux = layer(x)
    loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + sum(aux.values())
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    return dict(zip(["y", "loss"] + names, [y, loss] + list(torch.autograd.grad(loss, [x] + list(layer.parameters())))))


@pytest.mark.parametrize("router,activation,bias", [
    (moe.RouterConfig(top_k=2), "gelu", False),  # dropless
    (moe.RouterConfig(top_k=2, capacity_factor=0.75), "swiglu", True),  # drops
    (moe.RouterConfig(policy="switch", top_k=1, capacity_factor=1.0, drop_policy="bpr"), "relu", True),
    (moe.RouterConfig(policy="expert_choice", top_k=2), "silu", False),
])
def test_layer_on_the_fused_path_matches_the_torch_reference(router, activation, bias, monkeypatch):
    fast, ref = _layers(router, activation, bias)
    x = torch.randn(2, 45, 16, generator=torch.Generator().manual_seed(3))
    calls = []
    fused = fast.experts.forward_tokens
    monkeypatch.setattr(fast.experts, "forward_tokens", lambda *a: calls.append(1) or fused(*a))
    got = _layer_grads(fast, x)
    want = _layer_grads(ref, x)
    assert calls == [1] and ref.experts.token_ops(x) is None
    assert fast.experts.last_rows == ref.experts.last_rows
    for name, r in want.items():
        torch.testing.assert_close(got[name], r, rtol=2e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


def _saved_shapes(layer, x):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, aux = layer(x.detach().requires_grad_())
    return shapes


def test_fused_path_keeps_no_permuted_rows_for_the_backward():
    # The point of the token-level op: neither the permuted input nor the expert outputs
    # ([N, D], N = kept assignments) are saved; the torch path (the oracle) saves both.
    fast, ref = _layers(moe.RouterConfig(top_k=2))
    x = torch.randn(40, 16)
    N, D = 80, 16  # dropless: every one of the T*k assignments is a row
    fast_shapes, ref_shapes = _saved_shapes(fast, x), _saved_shapes(ref, x)
    assert (N, D) not in fast_shapes
    assert ref_shapes.count((N, D)) >= 2
    assert (N, fast.config.d_ffn) in fast_shapes  # the pre-activation, as in any MLP


def test_layer_falls_back_where_the_fused_op_does_not_apply():
    # Padded layout (static shapes) and fp16 rows keep the permute -> experts -> unpermute path.
    router = moe.RouterConfig(top_k=2, capacity_factor=1.0)
    cfg = moe.MoEConfig(d_model=16, d_ffn=32, num_experts=4, backend="cpp", router=router, pad_to_capacity=True)
    layer = moe.MoELayer(cfg)
    x = torch.randn(30, 16)
    shapes = _saved_shapes(layer, x)
    C = layer.last_routing.capacity
    assert (4 * C, 16) in shapes  # the padded permuted rows
    assert layer.experts.token_ops(x.half()) is None
