"""``parallel.comm``: each differentiable collective against its single-process meaning.

Each rank runs the op on its own tensors; the oracle is the formula computed on the
full tensors in the test (pieces by ``bounds``), forward and backward.
"""
from __future__ import annotations

import pytest
import torch

from parallel.comm import bounds
from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.distributed


def test_bounds_cut_into_near_equal_contiguous_pieces():
    assert [bounds(10, 3, r) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [bounds(8, 2, r) for r in range(2)] == [(0, 4), (4, 8)]
    assert bounds(1, 2, 1) == (1, 1)


def _ops(rank, world, n):
    import torch.distributed as dist

    from parallel import comm

    g = torch.Generator().manual_seed(0)
    full = torch.randn(3, n, 4, generator=g)      # the same on every rank
    weights = torch.randn(3, n, 4, generator=g)   # loss = sum(out * weights)
    per_rank = [torch.randn(3, n, 4, generator=g) for _ in range(world)]  # different per rank
    lo, hi = bounds(n, world, rank)
    out = {}
    # split: piece of a replicated tensor; the gradient of the replicated input is complete
    x = full.clone().requires_grad_()
    (comm.split(x, 1, dist.group.WORLD) * weights[:, lo:hi]).sum().backward()
    out["split"] = x.grad
    # gather: pieces -> whole; backward keeps this piece of a replicated gradient
    piece = full[:, lo:hi].clone().requires_grad_()
    y = comm.gather(piece, 1, dist.group.WORLD, total=n)
    (y * weights).sum().backward()
    out["gather"], out["gather_grad"] = y.detach(), piece.grad
    # gather_sum_grad: backward sums the per-rank (partial) gradients, keeps this piece
    piece = full[:, lo:hi].clone().requires_grad_()
    y = comm.gather_sum_grad(piece, 1, dist.group.WORLD, total=n)
    (y * per_rank[rank]).sum().backward()
    out["gsg_grad"] = piece.grad
    # reduce_scatter: sum over ranks, this piece; backward all-gathers the gradient pieces
    x = per_rank[rank].clone().requires_grad_()
    y = comm.reduce_scatter(x, 1, dist.group.WORLD)
    (y * weights[:, lo:hi]).sum().backward()
    out["rs"], out["rs_grad"] = y.detach(), x.grad
    return out


@pytest.mark.parametrize("n", [8, 7])
def test_collectives_match_their_formulas(n):
    world = 2
    results = run_distributed(_ops, world, n)
    g = torch.Generator().manual_seed(0)
    full = torch.randn(3, n, 4, generator=g)
    weights = torch.randn(3, n, 4, generator=g)
    per_rank = [torch.randn(3, n, 4, generator=g) for _ in range(world)]
    for rank, out in enumerate(results):
        lo, hi = bounds(n, world, rank)
        torch.testing.assert_close(out["split"], weights)  # every piece's gradient, gathered
        torch.testing.assert_close(out["gather"], full)
        torch.testing.assert_close(out["gather_grad"], weights[:, lo:hi])
        torch.testing.assert_close(out["gsg_grad"], sum(per_rank)[:, lo:hi])
        torch.testing.assert_close(out["rs"], sum(per_rank)[:, lo:hi])
        torch.testing.assert_close(out["rs_grad"], weights)
