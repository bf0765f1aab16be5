"""Every fast backend of the MoE ops equals the reference (``moe.ops.reference``).

Legend: T tokens, k choices per token, E experts, N rows, D width.

Backends under test on CPU: "cpp" (moe._C) always; "triton" when this process runs with
``TRITON_INTERPRET=1``. A normal run re-runs this file's triton cases in a subprocess
with that variable set (triton must see it before it is imported), so both are covered
by one ``pytest tests/``. The oracle is the reference in float64 for permute/unpermute;
the router is fp32 by definition, so its oracle is the fp32 reference.

Tolerances against the float64 oracle: float32 rtol=atol=1e-5; float16 2e-3;
bfloat16 1.6e-2 (outputs are rounded once to the dtype; we accumulate in fp32).
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

import pytest
import torch

import moe
from moe.ops import available_backends, get_backend, reference as R
from moe.ops import registry
from moe.ops.registry import Backend

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["cpp"] + (["triton"] if INTERPRET else [])
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _cpp_built() -> bool:
    return registry.cpp.unavailable_reason() is None


@pytest.fixture(params=BACKENDS)
def ops(request):
    if request.param == "cpp" and not _cpp_built():
        pytest.fail(registry.cpp.unavailable_reason())
    return get_backend(request.param, "cpu").ops


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    tol = TOL[dtype] * scale
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


def _dest_from_routing(experts, positions, tokens_per_expert, capacity: Optional[int]):
    """dest[T,k] = row of each kept assignment in an expert-major buffer; rows = E*C or sum(kept)."""
    E = tokens_per_expert.numel()
    if capacity is None:
        starts = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
        num_rows = int(tokens_per_expert.sum())
    else:
        starts = torch.arange(E) * capacity
        num_rows = E * capacity
    dest = torch.where(positions >= 0, starts[experts] + positions, torch.full_like(positions, -1))
    return dest, num_rows


def _random_dest(T: int, k: int, num_rows: int, drop: float, gen: torch.Generator):
    """An injective dest[T,k] into [0, num_rows) with about ``drop`` of the entries -1."""
    assert num_rows >= T * k
    dest = torch.randperm(num_rows, generator=gen)[: T * k].view(T, k)
    return torch.where(torch.rand(T, k, generator=gen) < drop, torch.full_like(dest, -1), dest)


# ---------------------------------------------------------------- router_topk
ROUTER_SHAPES = [(0, 4, 2), (1, 4, 1), (1, 5, 5), (17, 8, 2), (24, 6, 6), (32, 16, 3)]


@pytest.mark.parametrize("T,E,k", ROUTER_SHAPES)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
def test_router_topk_matches_reference(ops, T, E, k, score, normalize, with_bias):
    gen = torch.Generator().manual_seed(T * 100 + E * 10 + k)
    logits = torch.randn(T, E, generator=gen, requires_grad=True)
    bias = torch.randn(E, generator=gen) * 0.1 if with_bias else None
    upstream = (torch.randn(T, k, generator=gen), torch.randn(T, E, generator=gen), torch.randn(E, generator=gen))
    results = []
    for impl in (ops.router_topk, R.router_topk):
        w, e, s, c, ss = impl(logits, k, score, normalize, bias)
        loss = (w * upstream[0]).sum() + (s * upstream[1]).sum() + (ss * upstream[2]).sum()
        (g,) = torch.autograd.grad(loss, logits) if T > 0 else (torch.zeros_like(logits),)
        results.append((w, e, s, c, ss, g))
    got, want = results
    for name, a, b in zip(("weights", "experts", "scores", "counts", "score_sums", "grad"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if a.dtype == torch.long:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_router_topk_exact_ties_go_to_lower_expert(ops, score):
    logits = torch.zeros(5, 6)
    logits[1, [2, 4]] = 3.0  # a tie at the top between experts 2 and 4
    logits[2, [5, 1, 3]] = 1.0  # a three-way tie
    w, e, _, c, _ = ops.router_topk(logits, 3, score, True)
    assert e[0].tolist() == [0, 1, 2]
    assert e[1].tolist() == [2, 4, 0]
    assert e[2].tolist() == [1, 3, 5]
    assert torch.equal(e, R.router_topk(logits, 3, score, True)[1])
    assert torch.equal(c, torch.bincount(e.view(-1), minlength=6))
    torch.testing.assert_close(w.sum(1), torch.ones(5))


def test_router_topk_all_tokens_to_one_expert_and_empty_experts(ops):
    logits = torch.randn(20, 8)
    logits[:, 3] += 50.0
    w, e, s, c, ss = ops.router_topk(logits, 1, "softmax", True)
    assert (e == 3).all() and c.tolist() == [0, 0, 0, 20, 0, 0, 0, 0]
    torch.testing.assert_close(w, torch.ones(20, 1))


def test_router_topk_bias_only_selects(ops):
    logits = torch.randn(12, 4)
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])
    w, e, s, _, _ = ops.router_topk(logits, 1, "sigmoid", False, bias)
    assert (e == 2).all()
    torch.testing.assert_close(w[:, 0], torch.sigmoid(logits[:, 2]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_router_topk_dtypes_and_noncontiguous(ops, dtype):
    base = torch.randn(8, 19)
    logits = base.t().to(dtype)  # [19, 8], not contiguous
    assert not logits.is_contiguous()
    got = ops.router_topk(logits, 2, "softmax", True)
    want = R.router_topk(logits, 2, "softmax", True)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    leaf = logits.detach().requires_grad_()
    ops.router_topk(leaf, 2)[0].sum().backward()
    assert leaf.grad.dtype == dtype


def test_router_topk_rejects_bad_input(ops):
    with pytest.raises(ValueError, match="config key 'score': got 'relu'; allowed values: 'softmax', 'sigmoid'"):
        ops.router_topk(torch.randn(3, 4), 2, "relu")
    with pytest.raises(ValueError, match=r"config key 'k': got 5; it must be in \[1, 4\] \(E=4 experts\)"):
        ops.router_topk(torch.randn(3, 4), 5)
    with pytest.raises(ValueError, match="config key 'k': got 0; it must be >= 1"):
        ops.router_topk(torch.randn(3, 4), 0)
    with pytest.raises(TypeError, match="config key 'k': got 2.0; it must be an integer"):
        ops.router_topk(torch.randn(3, 4), 2.0)


# ---------------------------------------------------------------- assign_slots
def _slots_case(T, k, E, gen, one_expert=False, empty=(), drop=0.2):
    if one_expert:
        experts = torch.full((T, k), E - 1, dtype=torch.long)
        if k > 1:  # distinct experts per token, all tokens' first choice is the same expert
            experts = (torch.arange(k).repeat(T, 1) + E - 1) % E
    else:
        allowed = torch.tensor([e for e in range(E) if e not in empty])
        experts = allowed[torch.randint(0, allowed.numel(), (T, k), generator=gen)]
    order = torch.randperm(T * k, generator=gen)
    dispatched = torch.rand(T, k, generator=gen) >= drop
    return experts, order, dispatched


SLOT_CASES = {
    "random": dict(T=40, k=2, E=6),
    "one_expert": dict(T=30, k=1, E=4, one_expert=True),
    "one_expert_k3": dict(T=12, k=3, E=5, one_expert=True),
    "empty_experts": dict(T=25, k=2, E=8, empty=(0, 3, 7)),
    "T0": dict(T=0, k=2, E=4),
    "T1": dict(T=1, k=1, E=3),
    "k_eq_E": dict(T=9, k=4, E=4),
    "all_dispatched": dict(T=16, k=2, E=4, drop=0.0),
    "none_dispatched": dict(T=8, k=2, E=4, drop=1.1),
}


@pytest.mark.parametrize("case", list(SLOT_CASES))
@pytest.mark.parametrize("capacity", [None, 0, 1, 3])
def test_assign_slots_matches_reference(ops, case, capacity):
    spec = dict(SLOT_CASES[case])
    T, k, E = spec.pop("T"), spec.pop("k"), spec.pop("E")
    gen = torch.Generator().manual_seed(T * 7 + k + E)
    experts, order, dispatched = _slots_case(T, k, E, gen, **spec)
    got = ops.assign_slots(experts, order, dispatched, E, capacity)
    want = R.assign_slots(experts, order, dispatched, E, capacity)
    for name, a, b in zip(("positions", "kept", "tokens_per_expert"), got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_assign_slots_noncontiguous_and_identity_order(ops):
    experts = torch.randint(0, 5, (4, 30)).t()  # [30, 4] transposed view
    order = torch.arange(120)
    dispatched = (torch.rand(4, 30) > 0.1).t()
    got = ops.assign_slots(experts, order, dispatched, 5, 10)
    want = R.assign_slots(experts, order, dispatched, 5, 10)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# ---------------------------------------------------------------- permute / unpermute
def _routed_case(T, k, E, capacity, gen):
    logits = torch.randn(T, E, generator=gen)
    logits[: T // 2, 0] += 4.0  # skew: expert 0 overflows
    weights, experts, _, _, _ = R.router_topk(logits, k)
    order = torch.arange(T * k)
    positions, kept, tpe = R.assign_slots(experts, order, torch.ones(T, k, dtype=torch.bool), E, capacity)
    dest, num_rows = _dest_from_routing(experts, positions, tpe, capacity)
    return dest, num_rows, weights


PERMUTE_CASES = {
    "dropless": dict(T=24, k=2, E=4, capacity=None),
    "capacity": dict(T=24, k=2, E=4, capacity=5),
    "capacity0": dict(T=10, k=2, E=4, capacity=0),
    "capacity1": dict(T=10, k=1, E=4, capacity=1),
    "k_eq_E": dict(T=7, k=3, E=3, capacity=None),
    "T1": dict(T=1, k=2, E=4, capacity=None),
    "T0": dict(T=0, k=2, E=4, capacity=2),
}


def _permute_inputs(case, dtype, D=12, noncontiguous=False):
    spec = PERMUTE_CASES[case]
    gen = torch.Generator().manual_seed(hash(case) % 1000)
    dest, num_rows, weights = _routed_case(spec["T"], spec["k"], spec["E"], spec["capacity"], gen)
    T = spec["T"]
    if noncontiguous:
        x = torch.randn(T, 2 * D, generator=gen, dtype=torch.float64).to(dtype)[:, ::2]
        weights = torch.rand(weights.shape[1], T, generator=gen).t()
        dest = dest.t().contiguous().t()
    else:
        x = torch.randn(T, D, generator=gen, dtype=torch.float64).to(dtype)
    return x, dest, num_rows, weights


@pytest.mark.parametrize("case", list(PERMUTE_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_permute_unpermute_match_reference(ops, case, dtype, noncontiguous):
    x, dest, num_rows, weights = _permute_inputs(case, dtype, noncontiguous=noncontiguous)
    if noncontiguous and x.shape[0] > 0:
        assert x.shape[0] == 1 or not x.is_contiguous()
    gen = torch.Generator().manual_seed(3)
    results = []
    for impl in (ops, R):
        xi = (x.double() if impl is R else x).detach().requires_grad_()
        wi = (weights.double() if impl is R else weights).detach().clone().requires_grad_()
        rows = impl.permute_rows(xi, dest, num_rows)
        # A stand-in expert that differs per row keeps every gradient path distinct.
        scale = torch.linspace(0.5, 1.5, num_rows, dtype=torch.float64).unsqueeze(1).to(rows.dtype)
        y = impl.unpermute_rows(rows * scale, dest, wi)
        gy = torch.randn(y.shape, generator=gen.manual_seed(3), dtype=torch.float64).to(y.dtype)
        if y.numel():
            gx, gw = torch.autograd.grad(y, (xi, wi), gy)
        else:
            gx, gw = torch.zeros_like(xi), torch.zeros_like(wi)
        results.append((rows, y, gx, gw))
    (rows, y, gx, gw), (rows_o, y_o, gx_o, gw_o) = results
    assert rows.dtype == dtype and y.dtype == dtype and gx.dtype == dtype and gw.dtype == weights.dtype
    assert torch.equal(rows.double(), rows_o)  # permute is an exact copy
    _close(y, y_o, dtype)
    _close(gx, gx_o, dtype)
    # grad_weights comes back in the weights' dtype (fp32) and is a D-long dot product.
    _close(gw, gw_o, torch.float32 if dtype == torch.float64 else dtype, scale=4.0)


def test_unpermute_casts_weights_to_rows_dtype(ops):
    rows = torch.randn(6, 5).to(torch.bfloat16)
    dest = torch.tensor([[0, 3], [1, -1], [2, 5]])
    weights = torch.tensor([[0.3333333, 0.6666667], [1.0, 0.25], [0.1, 0.9]])
    want = R.unpermute_rows(rows.double(), dest, weights.to(torch.bfloat16).double())
    _close(ops.unpermute_rows(rows, dest, weights), want, torch.bfloat16)


@pytest.mark.parametrize("D", [1, 7, 33])
def test_permute_random_dest_widths(ops, D):
    gen = torch.Generator().manual_seed(D)
    T, k, N = 11, 2, 30
    dest = _random_dest(T, k, N, 0.3, gen)
    x = torch.randn(T, D, generator=gen)
    w = torch.rand(T, k, generator=gen)
    rows = ops.permute_rows(x, dest, N)
    assert torch.equal(rows, R.permute_rows(x, dest, N))
    _close(ops.unpermute_rows(rows, dest, w), R.unpermute_rows(rows.double(), dest, w.double()), torch.float32)


def test_permute_unpermute_gradcheck_float64(ops):
    gen = torch.Generator().manual_seed(0)
    T, k, N, D = 5, 2, 13, 3
    dest = _random_dest(T, k, N, 0.25, gen)
    x = torch.randn(T, D, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, k, generator=gen, dtype=torch.float64, requires_grad=True)
    scale = torch.linspace(0.5, 2.0, N, dtype=torch.float64).unsqueeze(1)
    assert torch.autograd.gradcheck(lambda x, w: ops.unpermute_rows(ops.permute_rows(x, dest, N) * scale, dest, w),
                                    (x, w))
    rows = torch.randn(N, D, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r, w: ops.unpermute_rows(r, dest, w), (rows, w))
    # permute's backward is itself differentiable (its adjoint is permute).
    assert torch.autograd.gradgradcheck(lambda x: ops.permute_rows(x, dest, N), (x,))


def test_router_topk_gradcheck_against_finite_differences(ops):
    # The router computes in fp32 by definition, so differences need a coarse step.
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    for score in ("softmax", "sigmoid"):
        def f(lg, score=score):
            w, _, s, _, ss = ops.router_topk(lg, 2, score, True)
            return w.double(), s.double(), ss.double()

        assert torch.autograd.gradcheck(f, (logits,), eps=1e-3, atol=2e-3, rtol=2e-2)


def test_permute_rejects_bad_arguments(ops):
    # Out-of-range destinations: the cpp kernels raise (see below); the GPU-side kernels
    # skip them rather than pay a device sync to check.
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="config key 'num_rows': got -1; it must be >= 0"):
        ops.permute_rows(x, torch.tensor([[0], [1], [2]]), -1)
    with pytest.raises(ValueError, match="shape"):
        ops.unpermute_rows(torch.randn(4, 4), torch.tensor([[0], [1], [2]]), torch.ones(3, 2))


def test_cpp_rejects_duplicate_and_out_of_range_rows():
    if not _cpp_built():
        pytest.fail(registry.cpp.unavailable_reason())
    ops = get_backend("cpp", "cpu").ops
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="twice"):
        ops.permute_rows(x, torch.tensor([[0], [1], [1]]), 4)
    with pytest.raises(ValueError, match="out of range"):
        ops.unpermute_rows(torch.randn(4, 4), torch.tensor([[0], [1], [4]]), torch.ones(3, 1))
    with pytest.raises(ValueError, match="out of range"):
        ops.assign_slots(torch.tensor([[0], [9]]), torch.arange(2), torch.ones(2, 1, dtype=torch.bool), 4, None)


def test_cpp_larger_random_case_uses_threads():
    """Big enough that at::parallel_for splits the work; still equal to the oracle."""
    if not _cpp_built():
        pytest.fail(registry.cpp.unavailable_reason())
    ops = get_backend("cpp", "cpu").ops
    gen = torch.Generator().manual_seed(5)
    T, E, k, D = 700, 16, 2, 96
    logits = torch.randn(T, E, generator=gen)
    got = ops.router_topk(logits, k)
    want = R.router_topk(logits, k)
    assert torch.equal(got[1], want[1])
    order = torch.randperm(T * k, generator=gen)
    pos, kept, tpe = ops.assign_slots(got[1], order, torch.ones(T, k, dtype=torch.bool), E, 100)
    assert torch.equal(pos, R.assign_slots(got[1], order, torch.ones(T, k, dtype=torch.bool), E, 100)[0])
    dest, N = _dest_from_routing(got[1], pos, tpe, 100)
    x = torch.randn(T, D, generator=gen)
    rows = ops.permute_rows(x, dest, N)
    assert torch.equal(rows, R.permute_rows(x, dest, N))
    _close(ops.unpermute_rows(rows, dest, got[0]), R.unpermute_rows(rows.double(), dest, got[0].double()),
           torch.float32)


def test_meta_tensors_give_shapes():
    ops = get_backend("cpp", "meta").ops
    logits = torch.empty(7, 5, device="meta")
    w, e, s, c, ss = ops.router_topk(logits, 2)
    assert w.shape == (7, 2) and e.dtype == torch.long and s.shape == (7, 5) and c.shape == (5,)
    rows = ops.permute_rows(torch.empty(7, 3, device="meta"), torch.empty(7, 2, dtype=torch.long, device="meta"), 9)
    assert rows.shape == (9, 3) and rows.device.type == "meta"


# ---------------------------------------------------------------- torch.library registration
def test_opcheck_custom_ops():
    if not _cpp_built():
        pytest.fail(registry.cpp.unavailable_reason())
    gen = torch.Generator().manual_seed(2)
    T, k, E, D, N = 6, 2, 4, 5, 14
    dest = _random_dest(T, k, N, 0.2, gen)
    x = torch.randn(T, D, generator=gen, requires_grad=True)
    rows = torch.randn(N, D, generator=gen, requires_grad=True)
    w = torch.rand(T, k, generator=gen, requires_grad=True)
    logits = torch.randn(T, E, generator=gen, requires_grad=True)
    experts = torch.randint(0, E, (T, k), generator=gen)
    cases = [
        (torch.ops.moe.permute_rows.default, (x, dest, N, "cpp")),
        (torch.ops.moe.permute_rows_backward.default, (rows, dest, "cpp")),
        (torch.ops.moe.unpermute_rows.default, (rows, dest, w, "cpp")),
        (torch.ops.moe.router_topk.default, (logits, 2, "softmax", True, None, "cpp")),
        (torch.ops.moe.assign_slots.default, (experts, torch.randperm(T * k, generator=gen),
                                              torch.ones(T, k, dtype=torch.bool), E, 2, "cpp")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("compile_backend,dynamic", [("aot_eager", False), ("aot_eager", True), ("inductor", False)])
def test_compile_fullgraph_pipeline(compile_backend, dynamic):
    """router_topk -> assign_slots -> permute -> expert -> unpermute, fixed capacity, fullgraph."""
    if not _cpp_built():
        pytest.fail(registry.cpp.unavailable_reason())
    ops = get_backend("cpp", "cpu").ops
    E, k, D, C = 4, 2, 8, 6

    def pipeline(x, w_router, w_expert):
        T = x.shape[0]
        weights, experts, _, _, _ = ops.router_topk(x @ w_router, k, "softmax", True)
        order = torch.arange(T * k, device=x.device)
        dispatched = torch.ones(T, k, dtype=torch.bool, device=x.device)
        positions, kept, _ = ops.assign_slots(experts, order, dispatched, E, C)
        dest = torch.where(kept, experts * C + positions, torch.full_like(positions, -1))
        rows = ops.permute_rows(x, dest, E * C)
        hidden = torch.bmm(rows.view(E, C, D), w_expert).view(E * C, D)
        return ops.unpermute_rows(torch.relu(hidden), dest, weights)

    gen = torch.Generator().manual_seed(4)
    w_router = torch.randn(D, E, generator=gen, requires_grad=True)
    w_expert = torch.randn(E, D, D, generator=gen, requires_grad=True)
    compiled = torch.compile(pipeline, fullgraph=True, backend=compile_backend, dynamic=dynamic)
    for T in ((16, 24) if dynamic else (16,)):
        x = torch.randn(T, D, generator=gen, requires_grad=True)
        eager_y = pipeline(x, w_router, w_expert)
        y = compiled(x, w_router, w_expert)
        torch.testing.assert_close(y, eager_y)
        g_eager = torch.autograd.grad(eager_y.square().sum(), (x, w_router, w_expert))
        g = torch.autograd.grad(y.square().sum(), (x, w_router, w_expert))
        for a, b in zip(g, g_eager):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("policy,capacity_factor", [("topk", None), ("topk", 1.0), ("switch", 1.25),
                                                     ("expert_bias", None)])
def test_moe_layer_cpp_backend_equals_torch_backend(policy, capacity_factor):
    """The whole layer gives the same output, aux losses and gradients with either backend."""
    if not _cpp_built():
        pytest.fail(registry.cpp.unavailable_reason())
    top_k = 1 if policy == "switch" else 2
    results = []
    for backend in ("cpp", "torch"):
        torch.manual_seed(0)
        cfg = moe.MoEConfig(d_model=12, d_ffn=16, num_experts=4, backend=backend,
                            router=moe.RouterConfig(top_k=top_k, policy=policy, capacity_factor=capacity_factor))
        layer = moe.MoELayer(cfg)
        x = torch.randn(2, 15, 12, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y, aux = layer(x)
        loss = y.square().sum() + sum(aux.values())
        grads = torch.autograd.grad(loss, [x] + [p for p in layer.parameters() if p.requires_grad])
        results.append((y, [aux[name] for name in sorted(aux)], grads))
    (y, aux, grads), (y_ref, aux_ref, grads_ref) = results
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(aux + list(grads), aux_ref + list(grads_ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- registry
def test_registry_auto_picks_cpp_on_cpu():
    if not _cpp_built():
        pytest.fail(registry.cpp.unavailable_reason())
    assert get_backend("auto", "cpu").name == "cpp"
    assert get_backend("auto", torch.device("cpu")).name == "cpp"
    assert available_backends("cpu")[:2] == ["cpp", "torch"]
    assert get_backend("torch", "cpu").ops is R


def test_registry_errors():
    with pytest.raises(ValueError, match="config key 'backend': got 'nope'; allowed values: 'auto', 'cpp', 'cuda', "
                                         "'torch', 'triton'"):
        get_backend("nope", "cpu")
    with pytest.raises(RuntimeError, match="runs on device types"):
        get_backend("cuda", "cpu")
    if registry.cuda.unavailable_reason() is not None:
        with pytest.raises(RuntimeError, match="CUDA build of torch and CUDA_HOME"):
            get_backend("cuda", "cuda")
    if not INTERPRET:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            get_backend("triton", "cpu")
    assert "triton" not in available_backends("cpu")


def test_registry_unavailable_backend_says_what_to_build():
    original = registry._BACKENDS["cpp"]
    registry.register_backend(Backend("cpp", original.ops, ("cpu",), priority=10,
                                      unavailable_reason=lambda device_type=None: "moe._C was not built: run X"))
    try:
        with pytest.raises(RuntimeError, match="moe._C was not built"):
            get_backend("cpp", "cpu")
        assert get_backend("auto", "cpu").name == "torch"  # falls back by device type only
    finally:
        registry.register_backend(original)


def test_cpp_extension_is_built():
    assert _cpp_built(), registry.cpp.unavailable_reason()


# ---------------------------------------------------------------- triton, interpreted
@pytest.mark.slow
@pytest.mark.skipif(INTERPRET, reason="already running with TRITON_INTERPRET=1")
def test_triton_backend_in_interpreter_subprocess():
    """Re-run this file's triton cases with TRITON_INTERPRET=1 set before triton loads."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
           "-k", "triton and not subprocess"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout, proc.stdout[-2000:]
