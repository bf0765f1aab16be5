"""parallel.rng: every seed formula pinned to the numbers of the code it replaced, and the contract.

The pinned values were computed by the formulas' earlier homes (``moe.trainer.setup``,
``moe.models.transformer``, ``moe.tasks.base``, ``parallel.tensor``): a change to a
formula changes every run's numbers and must fail here. The properties: the same inputs
give the same stream; a different step / sample / micro-batch / block / name gives a
different one; nothing depends on the rank or the layout (except the tp fork, on purpose).
"""
from __future__ import annotations

import __future__
import random

import numpy as np
import pytest
import torch

from parallel import rng
from parallel.rng import (block_seed, data_rng, init_generator, micro_batch_scope, micro_batch_seed, sample_rng,
                          seed_block, seed_everything, tp_rank_fork, tp_rank_seed)

LM_SALT, LIMOE_SALT = 0x4C4D, 0x4C494D  # moe.tasks.lm / moe.tasks.limoe


@pytest.fixture(autouse=True)
def _keep_torch_rng():
    """These tests seed torch's global generator: give the next test the state it had."""
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


# ----------------------------------------------------------------------------- pinned values

@pytest.mark.parametrize("args, seed", [((0, 0, 0), 17), ((1234, 7, 3), 1234373339),
                                        ((2**40, 10**6, 255), 1099514934256589240)])
def test_micro_batch_seed_pinned(args, seed):
    assert micro_batch_seed(*args) == seed


@pytest.mark.parametrize("micro, index, seed, draws", [
    (17, 0, 2671436322, [0.7333089113235474, 0.5976803302764893]),
    (123456789, 5, 123476789688603, [0.9324601888656616, 0.2900485396385193]),
    (2**62, 63, 4611686188311776624, [0.3096269965171814, 0.21999001502990723]),
])
def test_block_seed_pinned(micro, index, seed, draws):
    assert block_seed(micro, index) == seed
    with micro_batch_scope(micro):
        seed_block(index)
        assert torch.initial_seed() == seed
        assert torch.rand(2).tolist() == draws


@pytest.mark.parametrize("args, seed, draws", [
    ((0, "blocks.0.attn.qkv.weight", 0), 10131012702038, [0.9763864278793335, -1.0517752170562744]),
    ((7, "blocks.3.moe.experts.w1", 5), 31800277903114, [1.4696760177612305, 0.5797964334487915]),
    ((2**40, "embed.weight", 0), 1099546637030915252, [-1.1434966325759888, -0.572465717792511]),
])
def test_init_generator_pinned(args, seed, draws):
    g = init_generator(*args)
    assert g.initial_seed() == seed
    assert torch.randn(2, generator=g).tolist() == draws


@pytest.mark.parametrize("args, draws", [
    ((0, 0, 0, LM_SALT), [1254173243, 754973450, 2070811900]),
    ((3, 11, 7, LIMOE_SALT), [943137853, 509969546, 681925663]),
    ((2**31, 10**5, 4095, 1), [1379936975, 803909552, 2050091687]),
])
def test_sample_rng_pinned(args, draws):
    assert sample_rng(*args).integers(0, 2**31, 3).tolist() == draws


@pytest.mark.parametrize("args, draws", [
    ((0, 104729), [949821103, 180466831, 1787145662]),  # moe.data.text.split_corpus
    ((5, 1, 42), [76482239, 815130188, 255096143]),  # a shapes item
    ((5, 1, 42, 0xC01), [1696509030, 967907454, 2096305885]),  # its colour jitter
    ((2**33, 7919), [833337395, 1374308814, 1107449213]),  # the held-out combos
])
def test_data_rng_pinned(args, draws):
    assert data_rng(*args).integers(0, 2**31, 3).tolist() == draws


def test_tp_rank_fork_pinned():
    base = 3177978388542938147  # torch.randint(0, 2**62) after torch.manual_seed(99)
    after = 0.9480701088905334  # torch.rand(1) after that one draw
    for rank, seed in ((0, 3177978388543938150), (3, 3177978388546938159)):
        assert tp_rank_seed(base, rank) == seed
        torch.manual_seed(99)
        with tp_rank_fork(rank):
            assert torch.initial_seed() == seed
            torch.rand(5)  # draws inside the fork leave the stream outside alone
        assert torch.rand(1).item() == after


@pytest.mark.parametrize("seed, draws", [(5, (0.6229016948897019, 0.22199317108973948)),
                                         (2**40 + 3, (0.21978710637116716, 0.5507979025745755))])
def test_seed_everything_pinned(seed, draws):
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        seed_everything(seed)
        assert (random.random(), np.random.rand()) == draws
        assert torch.initial_seed() == seed
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


# ----------------------------------------------------------------------------- the contract

def _draws(g) -> list:
    return g.integers(0, 2**62, 4).tolist() if isinstance(g, np.random.Generator) else \
        torch.randint(0, 2**62, (4,), generator=g).tolist()


def test_same_inputs_same_stream():
    assert micro_batch_seed(3, 4, 5) == micro_batch_seed(3, 4, 5)
    assert block_seed(11, 2) == block_seed(11, 2)
    assert _draws(init_generator(3, "w", 1)) == _draws(init_generator(3, "w", 1))
    assert _draws(sample_rng(3, 4, 5, LM_SALT)) == _draws(sample_rng(3, 4, 5, LM_SALT))
    assert _draws(data_rng(3, 1, 5)) == _draws(data_rng(3, 1, 5))


def test_each_key_gives_its_own_stream():
    micro = {micro_batch_seed(seed, step, m) for seed in range(3) for step in range(4) for m in range(8)}
    assert len(micro) == 3 * 4 * 8
    blocks = {block_seed(s, i) for s in sorted(micro) for i in range(12)}
    assert len(blocks) == len(micro) * 12
    assert not blocks & micro
    names = ("blocks.0.attn.qkv.weight", "blocks.0.attn.out.weight", "blocks.1.attn.qkv.weight", "embed.weight")
    inits = {tuple(_draws(init_generator(seed, n, e))) for seed in range(2) for n in names for e in range(4)}
    assert len(inits) == 2 * len(names) * 4
    samples = {tuple(_draws(sample_rng(seed, step, j, salt))) for seed in range(2) for step in range(3)
               for j in range(5) for salt in (LM_SALT, LIMOE_SALT)}
    assert len(samples) == 2 * 3 * 5 * 2
    items = {tuple(_draws(data_rng(seed, split, i))) for seed in range(2) for split in range(3) for i in range(5)}
    assert len(items) == 2 * 3 * 5
    assert len({tp_rank_seed(123, r) for r in range(8)}) == 8


@pytest.mark.parametrize("dp, micro", [(1, 8), (1, 2), (2, 2), (4, 1), (8, 1)])
def test_no_dependence_on_layout(dp, micro):
    """Whatever the data-parallel size and micro-batch size, global sample j draws the
    stream of (seed, step, j) and global micro-batch m the seed of (seed, step, m): every
    (rank, local micro-batch) pair maps to the same numbers as one process."""
    seed, step, G = 7, 3, 8
    one_process = [_draws(sample_rng(seed, step, j, LM_SALT)) for j in range(G)]
    per_rank = G // dp
    got = []
    for rank in range(dp):
        for m in range(per_rank // micro):
            first = rank * per_rank + m * micro
            got += [_draws(sample_rng(seed, step, j, LM_SALT)) for j in range(first, first + micro)]
    assert got == one_process
    seeds = [micro_batch_seed(seed, step, rank * (per_rank // micro) + m)
             for rank in range(dp) for m in range(per_rank // micro)]
    assert seeds == [micro_batch_seed(seed, step, m) for m in range(G // micro)]


def test_a_block_draws_the_same_whatever_ran_before():
    """A pipeline stage running blocks 2..3 draws what one process running 0..3 draws there."""
    def run(block_ids, before: int):
        out = {}
        torch.manual_seed(before)
        torch.rand(before)  # whatever ran before in this process
        with micro_batch_scope(micro_batch_seed(1, 2, 3)):
            for i in block_ids:
                seed_block(i)
                out[i] = torch.rand(3).tolist()
        return out

    whole = run(range(4), 0)
    assert run([2, 3], 5) == {i: whole[i] for i in (2, 3)}
    assert len({tuple(v) for v in whole.values()}) == 4


def test_micro_batch_scope_seeds_then_leaves():
    with micro_batch_scope(1234):
        assert torch.initial_seed() == 1234
        seed_block(0)
        assert torch.initial_seed() == block_seed(1234, 0)
        with micro_batch_scope(99):  # nested scopes restore the outer seed
            seed_block(1)
            assert torch.initial_seed() == block_seed(99, 1)
        seed_block(1)
        assert torch.initial_seed() == block_seed(1234, 1)
    torch.manual_seed(5)
    seed_block(3)  # outside any scope: the generator is left alone
    assert torch.initial_seed() == 5
    with micro_batch_scope(None):
        seed_block(3)
        assert torch.initial_seed() == 5


def test_the_replicated_stream_is_the_same_on_every_tp_rank():
    """Inside the fork each tp rank draws its own numbers; outside, every rank the same ones."""
    inside, outside = [], []
    for rank in range(4):
        torch.manual_seed(42)
        with tp_rank_fork(rank):
            inside.append(torch.rand(3).tolist())
        outside.append(torch.rand(3).tolist())
    assert len({tuple(v) for v in inside}) == 4
    assert all(v == outside[0] for v in outside)


def test_no_mutable_module_globals():
    """The one piece of state is the scoped context variable (and the constant modulus)."""
    state = {k: type(v).__name__ for k, v in vars(rng).items()
             if not k.startswith("__") and not callable(v) and not isinstance(v, (type(rng), __future__._Feature))}
    assert state == {"_SEED_MOD": "int", "_MICRO_SEED": "ContextVar"}
