"""The pipeline stage plan (parallel.stages, cut by the block FLOPs of moe.models.flops), the schedule check
(parallel.pipeline.check_schedule) and the pipeline part of moe.trainer.layout.check_layout, against oracles
written here (no processes)."""
from __future__ import annotations

import copy
import itertools
import random

import pytest

from parallel.checks import ConfigError
from moe.tasks import TASKS
from moe.trainer.config import from_dict
from moe.trainer.layout import check_layout, stage_plan
from parallel.pipeline import check_schedule
from parallel.stages import balanced_cut, plan_stages
from tests.helpers.layout import TINY_LM


def oracle_cut(costs, parts):
    """Brute force: (smallest largest-chunk cost, lexicographically smallest counts reaching it)."""
    n, best = len(costs), None
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = (0, *cuts, n)
        counts = [bounds[i + 1] - bounds[i] for i in range(parts)]
        worst = max(sum(costs[bounds[i]:bounds[i + 1]]) for i in range(parts))
        best = min(best, (worst, counts)) if best else (worst, counts)
    return best


def largest_chunk(costs, counts):
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return max(sum(costs[s:s + k]) for s, k in zip(starts, counts))


def random_cases(seed, cases=250):
    rng = random.Random(seed)
    for _ in range(cases):
        n = rng.randint(1, 8)
        costs = [rng.choice((1, 2, 3, 5, 8)) for _ in range(n)]  # small values: many ties
        for parts in range(1, n + 1):
            yield costs, parts


def lm_raw(model=None, train=None, **parallel):
    raw = copy.deepcopy(TINY_LM)
    model = dict(model or {})
    raw["model"]["moe"].update(model.pop("moe", {}))
    raw["model"].update(model)
    raw["train"].update(train or {})
    raw["parallel"] = parallel
    return raw


def transformer(**model):
    """The TransformerConfig of the LM task of ``TINY_LM`` with ``model`` overrides."""
    cfg = from_dict(lm_raw(model))
    return TASKS["lm"].configs_from_dicts(cfg.model, cfg.data)[0].transformer


def block_costs(t, seq_len):
    """Forward FLOPs per token of every block of TransformerConfig ``t`` (the stage costs the trainer passes)."""
    return t.block_flops_per_token(seq_len)


def plan_of(t, pp, *, seq_len=1, **kw):
    """``plan_stages`` of TransformerConfig ``t`` with its blocks' FLOPs at ``seq_len`` as costs (as the trainer)."""
    return plan_stages(block_costs(t, seq_len), pp, **kw)


# ------------------------------------------------------------------ balanced_cut
def test_balanced_cut_minimises_the_largest_chunk():
    """On random cost lists the cut is a valid split whose largest chunk is the brute-force minimum."""
    for costs, parts in random_cases(0):
        counts = balanced_cut(costs, parts)
        assert len(counts) == parts and sum(counts) == len(costs) and min(counts) >= 1, (costs, parts, counts)
        assert largest_chunk(costs, counts) == oracle_cut(costs, parts)[0], (costs, parts, counts)


@pytest.mark.parametrize("costs, parts, expected", [
    ([1, 1, 1, 1], 2, [2, 2]),
    ([1, 1, 1], 2, [1, 2]),           # [1, 2] and [2, 1] tie: the first chunk gets fewer blocks
    ([2, 1, 1, 2], 3, [1, 2, 1]),     # no tie: the only cut of largest chunk 2
    ([1, 2, 1, 2, 1], 2, [2, 3]),     # [2, 3] and [3, 2] tie at 4
    ([5, 1, 1, 1, 1], 3, [1, 1, 3]),  # optimum 5: [1, 1, 3] and [1, 2, 2] both reach it
])
def test_balanced_cut_documented_tie_rule_examples(costs, parts, expected):
    """Hand-checked ties: the docstring's rule ("the earlier chunks get fewer blocks") picks ``expected``."""
    assert oracle_cut(costs, parts)[1] == expected
    assert balanced_cut(costs, parts) == expected


def test_balanced_cut_ties_give_earlier_chunks_fewer_blocks():
    """On random cost lists the cut is the lexicographically smallest count list among the optimal cuts."""
    wrong = [(costs, parts, balanced_cut(costs, parts), oracle_cut(costs, parts)[1])
             for costs, parts in random_cases(1) if balanced_cut(costs, parts) != oracle_cut(costs, parts)[1]]
    assert not wrong, f"{len(wrong)} cuts break the tie rule, e.g. (costs, parts, got, expected) {wrong[:3]}"


@pytest.mark.parametrize("parts", [0, 4])
def test_balanced_cut_rejects_impossible_part_counts(parts):
    """Zero chunks, or more chunks than blocks, is a ValueError."""
    with pytest.raises(ValueError, match=f"cannot cut 3 blocks into {parts} non-empty chunks"):
        balanced_cut([1, 2, 3], parts)


# ------------------------------------------------------------------ block_costs
@pytest.mark.parametrize("activation, mats", [("gelu", 2), ("swiglu", 3)])
def test_block_costs_follow_the_docstring_formula(activation, mats):
    """Dense block: 8D^2 + 4LD + 2*m*D*F; MoE block (top_k=2, E experts of width Fe): 8D^2 + 4LD + 2*m*D*Fe*2 + 2DE."""
    t = transformer(n_layers=4, activation=activation, d_ffn=48, moe={"d_ffn": 80, "num_experts": 4})
    D, L, F, Fe, E, k = 32, 16, 48, 80, 4, 2
    attention = 2 * 4 * D * D + 2 * 2 * L * D
    dense = attention + 2 * mats * D * F
    sparse = attention + 2 * mats * D * Fe * k + 2 * D * E
    assert t.moe.router.top_k == k and [t.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    assert block_costs(t, L) == [dense, sparse, dense, sparse]


def test_mixed_dense_and_moe_blocks_get_an_unequal_balanced_cut():
    """Heavy MoE blocks (cost > 2 dense blocks) get their own stage; equal counts would be worse."""
    t = transformer(n_layers=6, moe_every=3, moe={"d_ffn": 256})  # dense, dense, MoE, dense, dense, MoE
    costs = block_costs(t, 32)
    dense, sparse = costs[0], costs[2]
    assert costs == [dense, dense, sparse] * 2 and sparse > 2 * dense
    plan = plan_of(t, 4, seq_len=32)
    counts = [len(c) for c in plan.chunks]
    assert counts == [2, 1, 2, 1] == oracle_cut(costs, 4)[1]
    assert largest_chunk(costs, counts) == sparse < largest_chunk(costs, [2, 2, 1, 1]) == dense + sparse
    # strictly alternating blocks split evenly when they can; an odd count ties, and the first stage gets fewer
    alt = transformer(n_layers=5)  # moe_every=2: dense, MoE, dense, MoE, dense
    assert [len(c) for c in plan_of(alt, 2, seq_len=32).chunks] == [2, 3]


# ------------------------------------------------------------------ plan_stages
@pytest.mark.parametrize("n, pp, v", [(2, 1, 1), (2, 2, 1), (5, 3, 1), (8, 4, 1), (8, 2, 2), (12, 3, 2), (6, 2, 3)])
def test_plan_chunks_are_contiguous_and_cover_every_block_once(n, pp, v):
    """pp x virtual_stages chunks, each non-empty and ascending by one, concatenating to 0..n-1."""
    plan = plan_of(transformer(n_layers=n), pp, virtual_stages=v, seq_len=32)
    assert plan.num_chunks == pp * v and plan.num_blocks == n
    assert [b for c in plan.chunks for b in c] == list(range(n))
    assert all(len(c) >= 1 and list(c) == list(range(c[0], c[0] + len(c))) for c in plan.chunks)
    if v > 1:
        assert {len(c) for c in plan.chunks} == {n // (pp * v)}
    assert sorted(b for r in range(pp) for b in plan.blocks_of_rank(r)) == list(range(n))


def test_loop_placement_with_two_ranks_and_two_virtual_stages():
    """pp=2, virtual_stages=2 on 8 blocks: chunk c on rank c % 2; rank 0 embeds, rank 1 ends."""
    plan = plan_of(transformer(n_layers=8), 2, virtual_stages=2)
    assert plan.chunks == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert [plan.rank_of_chunk(c) for c in range(4)] == [0, 1, 0, 1]
    assert plan.chunks_of_rank(0) == [0, 2] and plan.chunks_of_rank(1) == [1, 3]
    assert plan.blocks_of_rank(0) == [0, 1, 4, 5] and plan.blocks_of_rank(1) == [2, 3, 6, 7]
    assert (plan.is_first(0), plan.is_first(1), plan.is_last(0), plan.is_last(1)) == (True, False, False, True)


@pytest.mark.parametrize("n, pp, v, counts", [(4, 2, 1, [3, 1]), (6, 2, 2, [1, 2, 1, 2]), (5, 3, 1, [1, 1, 3])])
def test_explicit_counts_are_honoured(n, pp, v, counts):
    """parallel.pp_blocks wins over the balanced and the equal cut (also when pp x v does not divide n)."""
    plan = plan_of(transformer(n_layers=n), pp, virtual_stages=v, counts=counts)
    assert [len(c) for c in plan.chunks] == counts and [b for c in plan.chunks for b in c] == list(range(n))


@pytest.mark.parametrize("n, pp, v, counts, match", [
    (2, 3, 1, None, r"^config key 'parallel.pp': got 3; pp x virtual_stages = 3 x 1 = 3 pipeline chunks need "
                    r"at least that many blocks, the model has model.n_layers=2$"),
    (4, 2, 3, None, r"^config key 'parallel.virtual_stages': got 3; pp x virtual_stages = 2 x 3 = 6"),
    (4, 2, 1, [4], r"^config key 'parallel.pp_blocks': got \[4\]; it must list 2 block counts"),
    (4, 2, 1, [4, 0], r"^config key 'parallel.pp_blocks': got \[4, 0\]; .* each >= 1$"),
    (4, 2, 1, [2, 1], r"^config key 'parallel.pp_blocks': got \[2, 1\], which sums to 3; the counts must add up "
                      r"to model.n_layers=4$"),
    (6, 2, 2, None, r"^config key 'parallel.virtual_stages': got 2; the interleaved schedule cuts the "
                    r"model.n_layers=6 blocks into pp x virtual_stages = 4 equal chunks, so 4 must divide 6"),
])
def test_plan_errors_name_the_key(n, pp, v, counts, match):
    """Impossible cuts are a ConfigError naming parallel.pp / virtual_stages / pp_blocks."""
    with pytest.raises(ConfigError, match=match):
        plan_of(transformer(n_layers=n), pp, virtual_stages=v, counts=counts)


# ------------------------------------------------------------------ check_schedule
def test_check_schedule_micro_batches_against_pp():
    """1f1b and interleaved need >= pp micro-batches; gpipe runs any number; schedule and V must agree."""
    assert "the 1f1b schedule needs at least pp=4 micro-batches" in check_schedule("1f1b", 4, 1, 3)
    assert check_schedule("1f1b", 4, 1, 4) is None and check_schedule("1f1b", 4, 1, 7) is None
    assert check_schedule("gpipe", 4, 1, 1) is None and check_schedule("gpipe", 4, 1, 3) is None
    assert "interleaved_1f1b schedule needs at least pp=4" in check_schedule("interleaved_1f1b", 4, 2, 3)
    assert "needs the interleaved_1f1b schedule" in check_schedule("1f1b", 2, 2, 4)
    assert "needs virtual_stages >= 2" in check_schedule("interleaved_1f1b", 2, 1, 4)
    assert "schedule must be one of" in check_schedule("zb", 2, 1, 4)


@pytest.mark.parametrize("pp, ok, bad", [(2, [2, 3, 4, 6, 8, 10], [5, 7, 9, 11]), (4, [4, 5, 7, 8, 10, 12], [9, 11, 13])])
def test_interleaved_rounds_rule(pp, ok, bad):
    """interleaved_1f1b runs M micro-batches in max(1, M // pp) rounds, which must divide M (torch's rule)."""
    for m in ok:
        assert check_schedule("interleaved_1f1b", pp, 2, m) is None, m
    for m in bad:
        assert "must be a multiple of" in check_schedule("interleaved_1f1b", pp, 2, m), m


# ------------------------------------------------------------------ check_layout
@pytest.mark.parametrize("world, model, train, parallel, match", [
    (4, None, None, {"pp": 4}, r"^config key 'parallel.pp': got 4; pp x virtual_stages = 4 x 1 = 4 pipeline "
                               r"chunks need at least that many blocks, the model has model.n_layers=2$"),
    (4, {"n_layers": 4}, {"global_batch_size": 8, "micro_batch_size": 4}, {"pp": 4},
     r"^config key 'parallel.pp_schedule': got '1f1b'; the 1f1b schedule needs at least pp=4 micro-batches per "
     r"step on each data-parallel rank, got 2 .*; this layout has global batch 8 = micro 4 x accumulation 2 x dp 1$"),
    (2, {"n_layers": 6}, None, {"pp": 2, "virtual_stages": 2, "pp_schedule": "interleaved_1f1b"},
     r"^config key 'parallel.virtual_stages': got 2; the interleaved schedule cuts the model.n_layers=6 blocks"),
    (2, None, None, {"pp": 2, "virtual_stages": 2, "pp_schedule": "interleaved_1f1b"},
     r"^config key 'parallel.virtual_stages': got 2; pp x virtual_stages = 2 x 2 = 4 pipeline chunks"),
    (2, {"n_layers": 4}, None, {"pp": 2, "pp_blocks": [1, 2]}, r"^config key 'parallel.pp_blocks': got \[1, 2\], "
                                                              r"which sums to 3"),
])
def test_check_layout_rejects_bad_pipelines(world, model, train, parallel, match):
    """The pipeline checks of check_layout name the key and the sizes."""
    with pytest.raises(ConfigError, match=match):
        check_layout(from_dict(lm_raw(model, train, **parallel)), world)


def test_check_layout_pipeline_needs_a_builtin_task():
    """pp > 1 with a custom 'package.module:function' task is refused, naming parallel.pp."""
    cfg = from_dict({"task": "tests.nowhere:build", "model": {}, "parallel": {"pp": 2}})
    with pytest.raises(ConfigError, match=r"^config key 'parallel.pp': got 2; pipeline parallelism needs a "
                                          r"built-in task .*; task 'tests.nowhere:build' can use tp, ep and dp$"):
        check_layout(cfg, 2)


def test_check_layout_gpipe_allows_few_micro_batches():
    """The 1f1b failure above passes under gpipe (2 micro-batches on 4 stages)."""
    cfg = from_dict(lm_raw({"n_layers": 4}, {"global_batch_size": 8, "micro_batch_size": 4}, pp=4,
                           pp_schedule="gpipe"))
    dims = check_layout(cfg, 4)
    assert (dims.dp, dims.pp, dims.world_size) == (1, 4, 4)
    assert stage_plan(cfg).chunks == ((0,), (1,), (2,), (3,))


@pytest.mark.parametrize("world, model, parallel, dp, chunks", [
    (2, None, {"pp": 2}, 1, ((0,), (1,))),
    (4, None, {"pp": 2}, 2, ((0,), (1,))),
    (2, {"n_layers": 4}, {"pp": 2, "pp_blocks": [3, 1]}, 1, ((0, 1, 2), (3,))),
    (2, {"n_layers": 8}, {"pp": 2, "virtual_stages": 2, "pp_schedule": "interleaved_1f1b"}, 1,
     ((0, 1), (2, 3), (4, 5), (6, 7))),
])
def test_valid_pipeline_layouts_pass(world, model, parallel, dp, chunks):
    """Valid pp layouts pass check_layout, and stage_plan(cfg) returns the expected chunks."""
    cfg = from_dict(lm_raw(model, **parallel))
    dims = check_layout(cfg, world)
    assert (dims.dp, dims.pp, dims.world_size) == (dp, parallel["pp"], world)
    assert stage_plan(cfg).chunks == chunks
    assert stage_plan(from_dict(lm_raw(model))) is None  # pp = 1: no plan
