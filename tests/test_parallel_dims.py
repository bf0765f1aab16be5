"""ParallelDims validation and rank layout (pure), groups and gradient averaging
(4 gloo processes). Legend: W world size; dp/tp/pp/ep/etp/edp group sizes."""
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

from parallel import ParallelDims, allreduce_gradients, is_expert_param, mark_expert_params
from tests.helpers.distributed import run_distributed


def test_derived_sizes_and_from_world():
    dims = ParallelDims(world_size=8, dp=4, ep=2, tp=2)
    assert dims.edp == 4
    assert ParallelDims.from_world(8, ep=4) == ParallelDims(world_size=8, dp=8, ep=4)
    assert ParallelDims.from_world(8, tp=2, pp=2).dp == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(world_size=4, dp=3), r"dp \* tp \* pp must equal world_size=4"),
        (dict(world_size=4, dp=4, ep=3), r"ParallelDims.ep=3 .* allowed ep values: \[1, 2, 4\]"),
        (dict(world_size=4, dp=4, ep=4, etp=2), r"ep=4 \(with etp=2\) .* allowed ep values: \[1, 2\]"),
        (dict(world_size=4, dp=0), r"config key 'ParallelDims.dp': got 0; it must be >= 1"),
        (dict(world_size=4, dp=4, ep=-1), r"config key 'ParallelDims.ep': got -1; it must be >= 1"),
        (dict(world_size=0, dp=0), r"config key 'ParallelDims.world_size': got 0; it must be >= 1"),
    ],
)
def test_validation_names_field_and_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelDims(**kwargs)


def test_validation_types():
    with pytest.raises(TypeError, match=r"config key 'ParallelDims.ep': got 2.0; it must be an integer"):
        ParallelDims(world_size=4, dp=4, ep=2.0)
    with pytest.raises(ValueError, match="must divide world_size=6"):
        ParallelDims.from_world(6, tp=4)
    with pytest.raises(ValueError, match="config key 'ParallelDims.tp': got 0; it must be >= 1"):
        ParallelDims.from_world(4, tp=0)
    with pytest.raises(TypeError, match="config key 'ParallelDims.world_size': got True; it must be an integer"):
        ParallelDims.from_world(True)


def test_rank_lists_ep_contiguous():
    dims = ParallelDims(world_size=4, dp=4, ep=2)
    assert dims.group_ranks("ep") == [[0, 1], [2, 3]]
    assert dims.group_ranks("edp") == [[0, 2], [1, 3]]
    assert dims.group_ranks("dp") == [[0, 1, 2, 3]]
    assert dims.group_ranks("tp") == [[0], [1], [2], [3]]
    assert dims.group_of("edp", 3) == [1, 3]


def test_rank_lists_full_layout():
    # W=16: pp=2 stages of dp=4 x tp=2; expert side edp=2 x ep=2 x etp=2 per stage.
    dims = ParallelDims(world_size=16, dp=4, tp=2, pp=2, ep=2, etp=2)
    assert dims.group_ranks("tp")[:2] == [[0, 1], [2, 3]]
    assert dims.group_ranks("dp")[:2] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert dims.group_ranks("pp")[0] == [0, 8]
    assert dims.group_ranks("etp")[0] == [0, 1]
    assert dims.group_ranks("ep")[:2] == [[0, 2], [1, 3]]
    assert dims.group_ranks("edp")[:2] == [[0, 4], [1, 5]]
    for name, size in dims.sizes().items():
        groups = dims.group_ranks(name)
        assert all(len(g) == size for g in groups), name
        assert sorted(r for g in groups for r in g) == list(range(16)), name
    with pytest.raises(ValueError, match="name must be one of"):
        dims.group_ranks("cp")


def _check_groups(rank, world):
    dims = ParallelDims(world_size=world, dp=4, ep=2)
    groups = dims.build(timeout=timedelta(seconds=60))
    assert groups.timeout == timedelta(seconds=60)  # kept for the groups created later (node groups)
    assert dims.group_ranks("ep")[rank // 2] == dist.get_process_group_ranks(groups.ep_group)
    assert dist.get_process_group_ranks(groups.edp_group) == [rank % 2, rank % 2 + 2]
    assert dist.get_process_group_ranks(groups.dp_group) == [0, 1, 2, 3]
    assert dist.get_world_size(groups.tp_group) == 1
    assert (groups.ep_rank, groups.edp_rank, groups.dp_rank) == (rank % 2, rank // 2, rank)
    # The groups work: sum of ranks over each.
    for name, group in (("ep", groups.ep_group), ("edp", groups.edp_group)):
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=group)
        assert t.item() == sum(groups.group_ranks[name]), name

    # A size-1 ep group (here the tp group) means no communication at all.
    from moe.dispatch import AllToAllDispatcher

    disp = AllToAllDispatcher(groups.tp_group, 2)
    rows = torch.arange(6.0).view(3, 2)
    local_rows, local_counts, ctx = disp.dispatch(rows, torch.tensor([1, 2]))
    assert torch.equal(disp.combine(local_rows * 2, ctx), rows * 2) and disp.bytes_sent == 0

    # Gradients: dense params averaged over all 4 ranks; expert params summed over edp, / dp.
    model = nn.ModuleDict({"dense": nn.Linear(3, 2), "expert": nn.Linear(3, 2, bias=False)})
    mark_expert_params(model["expert"], ep_size=2)
    assert is_expert_param(model["expert"].weight) and not is_expert_param(model["dense"].weight)
    assert model["expert"].weight.group_name == "ep_size_2"
    for p in model.parameters():
        p.grad = torch.full_like(p, float(rank + 1))
    model["dense"].bias.grad = None  # a missing grad counts as zeros
    allreduce_gradients(model, groups, bucket_numel=4)  # small buckets: several flushes
    assert torch.all(model["dense"].weight.grad == (1 + 2 + 3 + 4) / 4)
    assert torch.all(model["dense"].bias.grad == 0)
    # Expert grads already hold the sum over their ep group, so: sum over edp / dp.
    edp_sum = sum(r + 1 for r in groups.group_ranks["edp"])
    assert torch.all(model["expert"].weight.grad == edp_sum / 4)

    wrong = nn.Linear(2, 2)
    mark_expert_params(wrong, ep_size=4)
    with pytest.raises(ValueError, match="ep_size_4"):
        allreduce_gradients(wrong, groups)
    return True


@pytest.mark.distributed
def test_groups_and_gradient_averaging_world4():
    assert run_distributed(_check_groups, 4, timeout=60) == [True] * 4


def test_mark_expert_params_validation():
    with pytest.raises(ValueError, match="config key 'ep_size': got 0; it must be >= 1"):
        mark_expert_params(nn.Linear(2, 2), ep_size=0)
    params = mark_expert_params([nn.Parameter(torch.zeros(2))], ep_size=1)
    assert params[0].allreduce is False
