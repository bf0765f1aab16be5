"""``parallel.objects``: rank-0 broadcast and all-gather of Python objects, without a process group
(the object itself comes back), at world 1, and at worlds 2 and 3 over the world and over subgroups."""
from __future__ import annotations

import pytest

from parallel.objects import all_gather_objects, broadcast_object, group_rank, group_size
from tests.helpers.distributed import run_distributed


def test_without_a_process_group_the_object_itself_comes_back():
    obj = {"step": 3, "paths": ["a", "b"]}
    assert group_size() == 1 and group_rank() == 0
    assert broadcast_object(obj) is obj
    gathered = all_gather_objects(obj)
    assert gathered == [obj] and gathered[0] is obj


def _collect(rank, world):
    import torch.distributed as dist

    out = {"size": group_size(), "rank": group_rank()}
    mine = {"rank": rank, "name": f"r{rank}", "list": list(range(rank))}
    out["from_0"] = broadcast_object(mine)
    out["from_last"] = broadcast_object(mine, src=world - 1)
    out["all"] = all_gather_objects(mine)
    # a subgroup of the odd ranks (at world 1: none; every rank must create every group)
    odd = [r for r in range(world) if r % 2 == 1]
    evens = [r for r in range(world) if r % 2 == 0]
    odd_group = dist.new_group(odd) if odd else None
    even_group = dist.new_group(evens)
    group, members = (odd_group, odd) if rank % 2 else (even_group, evens)
    out["sub_size"], out["sub_rank"] = group_size(group), group_rank(group)
    out["sub_from_last"] = broadcast_object(mine, group, src=len(members) - 1)  # src counts in the group
    out["sub_all"] = all_gather_objects(rank * 10, group)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("world", [1, 2, 3])
def test_broadcast_and_gather_over_the_world_and_subgroups(world):
    results = run_distributed(_collect, world)

    def obj(r):
        return {"rank": r, "name": f"r{r}", "list": list(range(r))}

    for rank, out in enumerate(results):
        members = [r for r in range(world) if r % 2 == rank % 2]
        assert (out["size"], out["rank"]) == (world, rank)
        assert out["from_0"] == obj(0)
        assert out["from_last"] == obj(world - 1)
        assert out["all"] == [obj(r) for r in range(world)]
        assert (out["sub_size"], out["sub_rank"]) == (len(members), members.index(rank))
        assert out["sub_from_last"] == obj(members[-1])
        assert out["sub_all"] == [r * 10 for r in members]
