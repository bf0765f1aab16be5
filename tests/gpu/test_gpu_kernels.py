"""The CUDA and Triton backends on a real GPU equal the reference (skipped without CUDA).

Legend: T tokens, k choices per token, E experts, N rows, D width.

Run by ``bash tools/gpu_check.sh`` (with the GPU benchmarks) or ``pytest tests/gpu``.
The oracle is ``moe.ops.reference`` on CPU: float64 for permute/unpermute, fp32 for the
router (fp32 by definition). If torch sees a GPU but ``moe._C`` has no CUDA kernels the
"cuda" cases fail (a build problem), unless MOE_SKIP_CUDA=1 says that was intended.
"""
from __future__ import annotations

import os

import pytest
import torch

from moe.ops import get_backend, reference as R
from moe.ops import registry

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


@pytest.fixture(params=["cuda", "triton"])
def ops(request):
    name = request.param
    backend = registry._BACKENDS[name]
    reason = backend.unavailable_reason(DEV)
    if reason is not None:
        if name == "cuda" and os.environ.get("MOE_SKIP_CUDA") != "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return get_backend(name, DEV).ops


def _close(got, want, dtype, scale=1.0):
    tol = TOL[dtype] * scale
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=tol, atol=tol)


def _routing(T, E, k, capacity, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=gen)
    if T:
        logits[: T // 3, 0] += 3.0
    weights, experts, _, _, _ = R.router_topk(logits, k)
    positions, kept, tpe = R.assign_slots(experts, torch.randperm(T * k, generator=gen),
                                          torch.ones(T, k, dtype=torch.bool), E, capacity)
    if capacity is None:
        starts, num_rows = torch.cumsum(tpe, 0) - tpe, int(tpe.sum())
    else:
        starts, num_rows = torch.arange(E) * capacity, E * capacity
    dest = torch.where(kept, starts[experts] + positions, torch.full_like(positions, -1))
    return dest, num_rows, weights


@pytest.mark.parametrize("T,E,k", [(0, 8, 2), (1, 8, 8), (1000, 8, 1), (4096, 64, 8), (333, 130, 4)])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
def test_router_topk(ops, T, E, k, score, normalize, with_bias):
    gen = torch.Generator().manual_seed(T + E + k)
    logits = torch.randn(T, E, generator=gen)
    bias = torch.randn(E, generator=gen) * 0.05 if with_bias else None
    ups = (torch.randn(T, k, generator=gen), torch.randn(T, E, generator=gen), torch.randn(E, generator=gen))
    results = []
    for impl, dev in ((ops.router_topk, DEV), (R.router_topk, "cpu")):
        lg = logits.to(dev).requires_grad_()
        out = impl(lg, k, score, normalize, None if bias is None else bias.to(dev))
        w, _, s, _, ss = out
        if T:
            loss = sum((o * u.to(dev)).sum() for o, u in zip((w, s, ss), ups))
            (g,) = torch.autograd.grad(loss, lg)
        else:
            g = torch.zeros_like(lg)
        results.append([t.detach().cpu() for t in out] + [g.cpu()])
    for name, a, b in zip(("weights", "experts", "scores", "counts", "score_sums", "grad"), *results):
        assert a.dtype == b.dtype, name
        if a.dtype == torch.long:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5 if name == "score_sums" else 1e-6, msg=name)


def test_router_topk_exact_ties(ops):
    logits = torch.zeros(64, 40, device=DEV)
    logits[1, [33, 7]] = 2.0
    _, e, _, c, _ = ops.router_topk(logits, 3)
    assert e[0].tolist() == [0, 1, 2] and e[1].tolist() == [7, 33, 0]
    assert torch.equal(e.cpu(), R.router_topk(logits.cpu(), 3)[1])
    assert c.sum().item() == 64 * 3


@pytest.mark.parametrize("capacity", [None, 0, 1, 100])
@pytest.mark.parametrize("T,E,k", [(0, 4, 2), (1, 3, 1), (5000, 64, 2), (777, 8, 8)])
def test_assign_slots(ops, T, E, k, capacity):
    gen = torch.Generator().manual_seed(T * 3 + k)
    experts = torch.randint(0, E, (T, k), generator=gen)
    experts[: T // 2, 0] = E - 1  # an overloaded expert
    order = torch.randperm(T * k, generator=gen)
    dispatched = torch.rand(T, k, generator=gen) > 0.1
    got = ops.assign_slots(experts.to(DEV), order.to(DEV), dispatched.to(DEV), E, capacity)
    want = R.assign_slots(experts, order, dispatched, E, capacity)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [1, 7, 1024])
@pytest.mark.parametrize("k,capacity", [(1, None), (2, None), (2, 40), (8, None), (2, 0)])
def test_permute_unpermute(ops, dtype, D, k, capacity):
    T, E = 1500, 16
    dest, num_rows, weights = _routing(T, E, k, capacity, seed=D + k)
    gen = torch.Generator().manual_seed(7)
    # Inputs are rounded to the dtype under test once; the oracle sees the same values.
    x = torch.randn(T, D, generator=gen, dtype=torch.float64).to(dtype).double()
    gy = torch.randn(T, D, generator=gen, dtype=torch.float64).to(dtype).double()
    results = []
    for impl, dev, dt, wdt in ((ops, DEV, dtype, torch.float32), (R, "cpu", torch.float64, torch.float64)):
        xi = x.to(dt).to(dev).requires_grad_()
        wi = weights.to(wdt).to(dev).requires_grad_()
        rows = impl.permute_rows(xi, dest.to(dev), num_rows)
        scale = torch.linspace(0.5, 1.5, num_rows, dtype=torch.float64).unsqueeze(1).to(dt).to(dev)
        y = impl.unpermute_rows(rows * scale, dest.to(dev), wi)
        gx, gw = torch.autograd.grad(y, (xi, wi), gy.to(dt).to(dev))
        results.append((rows, y, gx, gw))
    (rows, y, gx, gw), (rows_o, y_o, gx_o, gw_o) = results
    assert torch.equal(rows.double().cpu(), rows_o)
    _close(y, y_o, dtype)
    _close(gx, gx_o, dtype)
    _close(gw, gw_o, torch.float32 if dtype == torch.float64 else dtype, scale=8.0)


def test_noncontiguous_inputs(ops):
    dest, num_rows, weights = _routing(300, 8, 2, None, seed=1)
    x = torch.randn(300, 64, device=DEV)[:, ::2]
    w = weights.t().contiguous().t().to(DEV)
    rows = ops.permute_rows(x, dest.to(DEV), num_rows)
    assert torch.equal(rows.cpu(), R.permute_rows(x.cpu(), dest, num_rows))
    _close(ops.unpermute_rows(rows, dest.to(DEV), w), R.unpermute_rows(rows.cpu().double(), dest, weights.double()),
           torch.float32)


def test_gradcheck_float64(ops):
    dest, num_rows, _ = _routing(6, 4, 2, 2, seed=3)
    dest = dest.to(DEV)
    x = torch.randn(6, 3, dtype=torch.float64, device=DEV, requires_grad=True)
    w = torch.rand(6, 2, dtype=torch.float64, device=DEV, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: ops.unpermute_rows(ops.permute_rows(x, dest, num_rows) * 1.5, dest, w),
                                    (x, w))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(ops, compile_backend):
    T, E, k, D, C = 64, 4, 2, 32, 40

    def pipeline(x, w_router, w_expert):
        weights, experts, _, _, _ = ops.router_topk(x @ w_router, k)
        positions, kept, _ = ops.assign_slots(experts, torch.arange(T * k, device=x.device),
                                              torch.ones(T, k, dtype=torch.bool, device=x.device), E, C)
        dest = torch.where(kept, experts * C + positions, torch.full_like(positions, -1))
        rows = ops.permute_rows(x, dest, E * C)
        hidden = torch.bmm(rows.view(E, C, D), w_expert).view(E * C, D)
        return ops.unpermute_rows(torch.relu(hidden), dest, weights)

    x = torch.randn(T, D, device=DEV, requires_grad=True)
    w_router = torch.randn(D, E, device=DEV, requires_grad=True)
    w_expert = torch.randn(E, D, D, device=DEV, requires_grad=True) / D ** 0.5
    eager = pipeline(x, w_router, w_expert)
    compiled = torch.compile(pipeline, fullgraph=True, backend=compile_backend)(x, w_router, w_expert)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    for a, b in zip(torch.autograd.grad(compiled.sum(), (x, w_router, w_expert)),
                    torch.autograd.grad(eager.sum(), (x, w_router, w_expert))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_auto_picks_fastest_gpu_backend():
    name = get_backend("auto", DEV).name
    if registry.cuda.unavailable_reason() is None:
        assert name == "cuda"
    else:
        assert name in ("triton", "torch")
