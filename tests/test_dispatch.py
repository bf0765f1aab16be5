"""Expert-parallel dispatch/combine against a single-rank oracle.

Legend: N rows on a rank; D row width; E global experts; R ep size; E_l = E // R (``El`` in code).
Expert e applies f_e(x) = x * (e + 1) + e, so a row that reaches the wrong
expert, or comes back to the wrong place, shows up in the result. Rows carry
(source rank, global expert, index in block) in their first columns, so the
order of ``local_rows`` is checked exactly too.
"""
import pytest
import torch
import torch.distributed as dist

from moe.dispatch import (
    AllToAllDispatcher,
    HierarchicalAllToAllDispatcher,
    block_permutation,
    new_node_groups,
    split_counts,
)
from tests.helpers.distributed import run_distributed

D = 5  # row width
SCENARIOS = ("random", "nothing_to_peer", "one_expert", "empty_rank", "all_empty", "single_rows")


def make_counts(scenario: str, rank: int, world: int, E: int) -> torch.Tensor:
    """tokens_per_expert[E] of ``rank`` in ``scenario`` (any rank can compute any rank's)."""
    g = torch.Generator().manual_seed(1000 * SCENARIOS.index(scenario) + rank)
    counts = torch.randint(0, 5, (E,), generator=g)
    El = E // world
    if scenario == "nothing_to_peer" and rank == 0:
        counts[El * (1 % world) : El * (1 % world + 1)] = 0  # rank 0 sends nothing to rank 1
    elif scenario == "one_expert":
        counts = torch.zeros(E, dtype=torch.long)
        counts[E - 1] = 7
    elif scenario == "empty_rank" and rank == world - 1:
        counts.zero_()
    elif scenario == "all_empty":
        counts.zero_()
    elif scenario == "single_rows":
        counts = (torch.arange(E) % 2 == rank % 2).long()
    return counts


def make_rows(counts: torch.Tensor, rank: int) -> torch.Tensor:
    """rows[N, D]: columns (src rank, global expert, index in the expert's block, noise...)."""
    expert = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    starts = torch.cumsum(counts, 0) - counts
    index = torch.arange(expert.numel()) - starts[expert]
    g = torch.Generator().manual_seed(77 + rank)
    noise = torch.randn(expert.numel(), D - 3, generator=g)
    ids = torch.stack([torch.full_like(expert, rank), expert, index], 1).float()
    return torch.cat([ids, noise], 1)


def oracle(rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    e = torch.repeat_interleave(torch.arange(counts.numel()), counts).float()[:, None]
    return rows * (e + 1) + e


def make_expert_fn(ep_rank: int, El: int):
    def expert_fn(local_rows, local_counts):
        e = ep_rank * El + torch.repeat_interleave(torch.arange(El), local_counts).float()[:, None]
        return local_rows * (e + 1) + e

    return expert_fn


def expected_local_rows(scenario, me, world, E):
    """The rows rank ``me`` must receive, in the contracted order."""
    El = E // world
    parts = []
    for local in range(El):
        for src in range(world):
            counts = make_counts(scenario, src, world, E)
            rows = make_rows(counts, src)
            starts = torch.cumsum(counts, 0) - counts
            g = me * El + local
            parts.append(rows[starts[g] : starts[g] + counts[g]])
    return torch.cat(parts)


def run_path(disp, rows, counts, expert_fn, how):
    """combine(expert_fn(dispatch(rows))) and d(loss)/d(rows) through one of the paths."""
    rows = rows.clone().requires_grad_(True)
    if how == "plain":
        local_rows, local_counts, ctx = disp.dispatch(rows, counts)
        out = disp.combine(expert_fn(local_rows, local_counts), ctx)
    else:
        local_rows = local_counts = None
        out = disp.dispatch_compute_combine(rows, counts, expert_fn)
    weight = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weight).sum().backward()
    return out.detach(), rows.grad, local_rows, local_counts


def _check_dispatch(rank, world, experts):
    with pytest.raises(ValueError, match=f"multiple of the expert-parallel group size {world}"):
        AllToAllDispatcher(dist.group.WORLD, world + 1)
    for E in experts:
        _check_dispatch_one(rank, world, E)
    return True


def _check_dispatch_one(rank, world, E):
    group = dist.group.WORLD
    El = E // world
    expert_fn = make_expert_fn(rank, El)
    for scenario in SCENARIOS:
        counts = make_counts(scenario, rank, world, E)
        rows = make_rows(counts, rank)
        want = oracle(rows, counts)
        # d/d(rows) of sum(f_e(rows) * weight) is weight * (e + 1).
        slope = oracle(torch.ones_like(rows), counts) - oracle(torch.zeros_like(rows), counts)
        want_grad = torch.linspace(-1, 1, want.numel()).view_as(want) * slope
        disp = AllToAllDispatcher(group, E)
        out, grad, local_rows, local_counts = run_path(disp, rows, counts, expert_fn, "plain")
        torch.testing.assert_close(out, want, rtol=0, atol=0, msg=f"{scenario}: output")
        torch.testing.assert_close(grad, want_grad, msg=f"{scenario}: grad")
        torch.testing.assert_close(local_rows.detach(), expected_local_rows(scenario, rank, world, E), rtol=0, atol=0)
        all_counts = torch.stack([make_counts(scenario, r, world, E) for r in range(world)])  # [src, E]
        mine = slice(rank * El, (rank + 1) * El)
        assert local_counts.tolist() == all_counts[:, mine].sum(0).tolist(), scenario
        # Exact traffic: rows to / from other ranks x D x 4 bytes; self-sends apart.
        own = int(counts[mine].sum())
        received = int(all_counts[:, mine].sum()) - own
        assert disp.bytes_sent == (int(counts.sum()) - own) * D * 4, scenario
        assert disp.bytes_received == received * D * 4, scenario
        assert disp.bytes_local == own * D * 4, scenario
        assert disp.combine_stats.bytes_sent == disp.bytes_received, scenario
        assert disp.combine_stats.bytes_received == disp.bytes_sent, scenario
        # Chunked, overlapped path: identical results and gradients.
        for chunks in (1, 2, 3):
            chunked = AllToAllDispatcher(group, E, num_chunks=chunks)
            out_c, grad_c, _, _ = run_path(chunked, rows, counts, expert_fn, "overlap")
            torch.testing.assert_close(out_c, out, rtol=0, atol=0, msg=f"{scenario}: chunks={chunks}")
            torch.testing.assert_close(grad_c, grad, rtol=0, atol=0, msg=f"{scenario}: chunks={chunks}")
            assert chunked.bytes_sent == disp.bytes_sent and chunked.bytes_received == disp.bytes_received


@pytest.mark.distributed
@pytest.mark.parametrize("world,experts", [(2, (2, 6)), (4, (4, 8))])
def test_dispatch_matches_oracle(world, experts):
    """Output, gradient, local order, counts and bytes; plain and chunked paths;
    E not divisible by the group size is refused."""
    assert run_distributed(_check_dispatch, world, experts, timeout=90) == [True] * world


def _check_hierarchical(rank, world, E):
    flat = AllToAllDispatcher(dist.group.WORLD, E)
    expert_fn = make_expert_fn(rank, E // world)
    for ranks_per_node in (2, 1, 4):
        hier = HierarchicalAllToAllDispatcher(dist.group.WORLD, E, ranks_per_node, num_chunks=2)
        for scenario in SCENARIOS:
            counts = make_counts(scenario, rank, world, E)
            rows = make_rows(counts, rank)
            want = run_path(flat, rows, counts, expert_fn, "plain")
            got = run_path(hier, rows, counts, expert_fn, "plain")
            for w, g, what in zip(want, got, ("output", "grad", "local_rows", "local_counts")):
                torch.testing.assert_close(g, w, rtol=0, atol=0, msg=f"G={ranks_per_node} {scenario}: {what}")
            got_c = run_path(hier, rows, counts, expert_fn, "overlap")
            torch.testing.assert_close(got_c[0], want[0], rtol=0, atol=0)
            torch.testing.assert_close(got_c[1], want[1], rtol=0, atol=0)
    # ep groups smaller than the world: ep=2 inside world 4, groups built on all ranks.
    ep_groups = [[0, 1], [2, 3]]
    handles = [dist.new_group(r) for r in ep_groups]
    ep_group = handles[rank // 2]
    node_groups = new_node_groups(ep_groups, 1)
    hier = HierarchicalAllToAllDispatcher(ep_group, 4, 1, node_groups=node_groups)
    flat = AllToAllDispatcher(ep_group, 4)
    expert_fn = make_expert_fn(rank % 2, 2)
    counts = make_counts("random", rank, 2, 4)
    rows = make_rows(counts, rank)
    for w, g in zip(run_path(flat, rows, counts, expert_fn, "plain"), run_path(hier, rows, counts, expert_fn, "plain")):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    torch.testing.assert_close(run_path(flat, rows, counts, expert_fn, "plain")[0], oracle(rows, counts))
    return True


@pytest.mark.distributed
def test_hierarchical_matches_flat():
    assert run_distributed(_check_hierarchical, 4, 8, timeout=90) == [True] * 4


def test_no_expert_parallelism_is_local():
    """ep_group=None: no process group, no communication, same contract."""
    E = 3
    disp = AllToAllDispatcher(None, E, num_chunks=2)
    for scenario in SCENARIOS:
        counts = make_counts(scenario, 0, 1, E)
        rows = make_rows(counts, 0)
        out, grad, local_rows, local_counts = run_path(disp, rows, counts, make_expert_fn(0, E), "plain")
        torch.testing.assert_close(out, oracle(rows, counts), rtol=0, atol=0)
        assert torch.equal(local_rows.detach(), rows) and torch.equal(local_counts, counts)
        assert disp.bytes_sent == disp.bytes_received == 0 and disp.bytes_local == rows.numel() * 4
        out_c, grad_c, _, _ = run_path(disp, rows, counts, make_expert_fn(0, E), "overlap")
        torch.testing.assert_close(out_c, out, rtol=0, atol=0)
        torch.testing.assert_close(grad_c, grad, rtol=0, atol=0)


def test_block_permutation_and_split_counts():
    counts = torch.tensor([[2, 0, 1], [1, 3, 0]])  # blocks a0 a1 a2 b0 b1 b2 stored row-major
    rows = torch.arange(7)
    # a0=[0,1] a2=[2] b0=[3] b1=[4,5,6] -> column-major: a0 b0 a1 b1 a2 b2
    assert rows[block_permutation(counts, (1, 0))].tolist() == [0, 1, 3, 4, 5, 6, 2]
    assert block_permutation(torch.zeros(2, 3, dtype=torch.long), (1, 0)).numel() == 0
    parts = split_counts(torch.tensor([0, 1, 5, 6]), 3)
    assert parts.tolist() == [[0, 0, 0], [1, 0, 0], [2, 2, 1], [2, 2, 2]]


def test_bad_arguments():
    with pytest.raises(ValueError, match="config key 'num_experts': got 0; it must be >= 1"):
        AllToAllDispatcher(None, 0)
    with pytest.raises(TypeError, match="config key 'num_experts': got 4.0; it must be an integer"):
        AllToAllDispatcher(None, 4.0)
    with pytest.raises(ValueError, match="config key 'num_chunks': got 0; it must be >= 1"):
        AllToAllDispatcher(None, 4, num_chunks=0)
    disp = AllToAllDispatcher(None, 4)
    with pytest.raises(ValueError, match="tokens_per_expert"):
        disp.dispatch(torch.zeros(3, 2), torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="sum to rows"):
        disp.dispatch(torch.zeros(3, 2), torch.tensor([1, 1, 0, 0]))
    with pytest.raises(ValueError, match="config key 'ranks_per_node': got 2; it must divide the ep group size 1"):
        HierarchicalAllToAllDispatcher(None, 4, 2)
    with pytest.raises(ValueError, match="config key 'ranks_per_node': got 0; it must be >= 1"):
        HierarchicalAllToAllDispatcher(None, 4, 0)
