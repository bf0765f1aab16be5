"""The fused grouped expert MLP (``moe::expert_mlp``, cpp backend) equals the torch oracle.

Legend: E_l local experts, N rows (expert-major), D model width, F expert width.

The oracle is ``Experts.forward_loop`` (one matmul per expert, autograd through plain
torch ops). Compared: the forward output and every gradient (rows, w1, w2, b1, b2) at
fp32 tolerance (float64 near machine precision), for every activation, with empty
experts, uneven counts, biases on and off, etp-sharded widths, the padded layout and the
output bias left out; plus the dispatch (which path runs) and the input checks.
"""
from __future__ import annotations

import pytest
import torch

from moe.experts import Experts, loop_matmul
from moe.ops import get_backend
from moe.ops import registry
from moe.ops.library import OpSet

ACTIVATIONS = ["gelu", "relu", "silu", "swiglu"]
TOL = {torch.float32: 2e-5, torch.float64: 1e-11}


@pytest.fixture(autouse=True)
def _cpp_built():
    reason = registry.cpp.unavailable_reason()
    if reason is not None:
        pytest.fail(reason)


def _experts(activation, *, bias, E=5, D=32, F=48, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    ex = Experts(E, D, F, activation, bias=bias, dtype=dtype, **kw)
    if bias:
        with torch.no_grad():
            ex.b1.normal_(std=0.5)
            ex.b2.normal_(std=0.5)
    return ex


def _grads(ex, fn, rows, counts, grad_out):
    x = rows.detach().requires_grad_()
    out = fn(x, counts)
    params = [p for p in ex.parameters()]
    return [out] + list(torch.autograd.grad(out, [x] + params, grad_out, allow_unused=True))


def _assert_matches(ex, rows, counts, *, output_bias=True, padded_capacity=None):
    dtype = rows.dtype
    grad_out = torch.randn(rows.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    ex.backend = "cpp"
    assert ex._fused_ops(rows) is not None
    got = _grads(ex, lambda x, c: ex(x, c, output_bias=output_bias, padded_capacity=padded_capacity),
                 rows, counts, grad_out)

    want = _grads(ex, lambda x, c: ex._compute(x, c, loop_matmul, output_bias), rows, counts, grad_out)
    names = ["out", "rows"] + [n for n, _ in ex.named_parameters()]
    for name, g, w in zip(names, got, want):
        if w is None:  # b2 without the output bias
            assert g is None, name
            continue
        torch.testing.assert_close(g, w, rtol=TOL[dtype], atol=TOL[dtype], msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_loop_twin_uneven_and_empty_experts(activation, bias, dtype):
    ex = _experts(activation, bias=bias, dtype=dtype)
    counts = torch.tensor([0, 300, 7, 0, 513])  # empty experts, uneven counts, > one row tile
    rows = torch.randn(int(counts.sum()), 32, dtype=dtype)
    _assert_matches(ex, rows, counts)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_with_many_unit_chunks_and_one_expert(activation):
    # Few experts and a wide hidden layer: the backward splits each expert's units into chunks.
    ex = _experts(activation, bias=True, E=1, D=16, F=640)
    counts = torch.tensor([611])
    _assert_matches(ex, torch.randn(611, 16), counts)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_etp_sharded_without_output_bias(activation):
    ex = _experts(activation, bias=True, E=3, D=24, F=64, etp_rank=1, etp_size=4)
    assert ex.d_ffn_local == 16
    counts = torch.tensor([5, 0, 37])
    _assert_matches(ex, torch.randn(42, 24), counts, output_bias=False)


def test_matches_padded_layout():
    ex = _experts("gelu", bias=True, E=4, D=16, F=24)
    C = 9
    rows = torch.randn(4 * C, 16)
    rows[3:C] = 0  # padding rows of expert 0
    _assert_matches(ex, rows, torch.full((4,), C), padded_capacity=C)


def test_no_rows_at_all():
    ex = _experts("swiglu", bias=True)
    rows = torch.zeros(0, 32, requires_grad=True)
    out = ex(rows, torch.zeros(5, dtype=torch.long))
    assert out.shape == (0, 32)
    out.sum().backward()
    assert torch.count_nonzero(ex.w1.grad) == 0 and torch.count_nonzero(ex.b2.grad) == 0


def test_thread_counts_agree_and_runs_repeat_exactly():
    # Tasks are scheduled dynamically, yet each writes only its own outputs: the same thread
    # count gives the same bits; other counts change the GEMM blocking (fp32 rounding only).
    ex = _experts("gelu", bias=True, E=6, D=32, F=128)
    counts = torch.tensor([400, 3, 0, 260, 90, 700])
    rows = torch.randn(int(counts.sum()), 32)
    threads = torch.get_num_threads()
    results = []
    for n in (1, 2, 2):
        torch.set_num_threads(n)
        try:
            results.append(_grads(ex, ex, rows, counts, torch.ones_like(rows)))
        finally:
            torch.set_num_threads(threads)
    for a, b, c in zip(*results):
        torch.testing.assert_close(a, b, rtol=TOL[torch.float32], atol=TOL[torch.float32])
        torch.testing.assert_close(b, c, rtol=0, atol=0)


def test_dispatch_fused_only_where_it_has_kernels():
    ex = _experts("gelu", bias=False)
    rows = torch.randn(4, 32)
    assert ex._fused_ops(rows) is not None  # auto on CPU -> cpp
    ex.backend = "torch"
    assert ex._fused_ops(rows) is None
    ex.backend = "auto"
    assert ex._fused_ops(rows.half()) is None  # no fp16 kernel: the grouped_mm path
    ex.grouped_gemm = False
    assert ex._fused_ops(rows) is None  # the loop twin was asked for


def test_errors_name_the_value():
    ops = get_backend("cpp", "cpu").ops
    ex = _experts("gelu", bias=False)
    rows = torch.randn(10, 32)
    with pytest.raises(ValueError, match="activation"):
        ops.expert_mlp(rows, torch.tensor([10, 0, 0, 0, 0]), ex.w1, None, ex.w2, None, "tanh")
    with pytest.raises(ValueError, match="counts sum to 9 but x has 10 rows"):
        ops.expert_mlp(rows, torch.tensor([9, 0, 0, 0, 0]), ex.w1, None, ex.w2, None, "gelu")
    with pytest.raises(ValueError, match="counts\\[1\\] = -1"):
        ops.expert_mlp(rows, torch.tensor([11, -1, 0, 0, 0]), ex.w1, None, ex.w2, None, "gelu")
    with pytest.raises(ValueError, match="do not fit"):
        ops.expert_mlp(rows, torch.tensor([10, 0, 0, 0, 0]), ex.w1, None, ex.w2, None, "swiglu")
    assert not hasattr(get_backend("torch", "cpu").ops, "expert_mlp")  # the reference: torch path
    with pytest.raises(NotImplementedError, match="cpp"):
        OpSet("triton").expert_mlp(rows, torch.tensor([10, 0, 0, 0, 0]), ex.w1, None, ex.w2, None, "gelu")


def test_second_backward_through_the_same_graph_fails_clearly():
    # The backward overwrites the saved pre-activation with its gradient; autograd's version
    # check then refuses a second backward instead of computing from the overwritten tensor.
    ex = _experts("gelu", bias=False)
    rows = torch.randn(20, 32, requires_grad=True)
    out = ex(rows, torch.tensor([20, 0, 0, 0, 0]))
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
