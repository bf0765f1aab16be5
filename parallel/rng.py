"""The determinism contract, in one place: every random draw is a function of
(seed, step, sample or micro-batch, block, name), never of the rank, the layout or what ran before.

So any data / expert / tensor / pipeline layout of the same global batch draws the same
numbers as one process, and N steps in one go or N/2 + resume + N/2 draw the same numbers.
Every seed formula of the project lives here; callers name the stream they want.

The streams (what each draw depends on, who draws from it):

- start-up, ``seed_everything(seed)``: Python's ``random``, numpy's and torch's global
  generators, once per process before anything is built (``moe.trainer.loop``).
- weights, ``init_generator(seed, name, index)``: one ``torch.Generator`` per parameter
  name (and GLOBAL expert index), ``moe.models.init_weights``; a tensor-parallel piece is
  cut from the global tensor drawn the same way, so the layout never shows.
- training samples, ``sample_rng(seed, step, index, salt)``: one numpy generator per
  sample ``index`` of step ``step``'s GLOBAL batch; ``salt`` names the task, so two
  tasks with one seed draw different streams (``moe.tasks``: LM windows, LIMoE pairs).
- data-set items, ``data_rng(seed, *keys)``: a data set's own draws, keyed by its seed
  and e.g. the split, the item index and a salt naming the draw (``moe.data``: the
  corpus split, LM windows, the shapes items and held-out combos).
- micro-batches, ``micro_batch_seed(seed, step, micro_index)``: torch's global generator
  at the start of a micro-batch's forward, ``micro_index`` its index in the GLOBAL batch
  (draws before the first block). ``micro_batch_scope(seed)`` seeds it and opens the block
  scope below; the loop (``moe.trainer.loop``) and the pipeline stages
  (``parallel.pipeline``) both run a micro-batch under it.
- blocks, ``block_seed(micro_seed, index)``: inside the scope every block re-seeds torch's
  global generator from the micro-batch's seed and its GLOBAL block index before it runs
  (``seed_block``), so what a block draws (dropout, GShard's random second expert, noisy
  top-k noise, jitter, the ``random`` drop policy) does not depend on which blocks ran
  before it in this process: a pipeline stage draws what one process draws.
- tensor-parallel pieces, ``tp_rank_seed(base, rank)``: ``tp_rank_fork(rank)`` draws one
  ``base`` from the (replicated) block stream and forks torch's generator seeded from
  ``(base, tp rank)``; the only stream that depends on a rank, on purpose (the pieces of
  one tensor get independent dropout masks), and the stream outside stays identical on
  every tp rank.

Activation checkpointing does not add a stream: a recomputed block re-runs from the saved
generator states (``moe.recompute``). The one piece of state here is the context variable
holding the current micro-batch's seed: scoped by ``micro_batch_scope``, not a module global.
"""
from __future__ import annotations

import contextlib
import contextvars
import random
import zlib
from typing import Iterator, Optional

import numpy as np
import torch

__all__ = [
    "block_seed",
    "data_rng",
    "init_generator",
    "micro_batch_scope",
    "micro_batch_seed",
    "sample_rng",
    "seed_block",
    "seed_everything",
    "tp_rank_fork",
    "tp_rank_seed",
]

_SEED_MOD = 2**63 - 1  # torch seeds are int64; every formula stays below it

_MICRO_SEED: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("micro_batch_seed", default=None)


# ----------------------------------------------------------------------------- the formulas

def micro_batch_seed(seed: int, step: int, micro_index: int) -> int:
    """Torch seed of GLOBAL micro-batch ``micro_index`` of optimizer step ``step``."""
    return (seed * 1_000_003 + step * 7919 + micro_index * 104_729 + 17) % _SEED_MOD


def block_seed(micro_seed: int, index: int) -> int:
    """Torch seed of GLOBAL block ``index`` in the micro-batch seeded ``micro_seed``."""
    return (micro_seed * 1_000_033 + (index + 1) * 2_654_435_761) % _SEED_MOD


def init_generator(seed: int, name: str, index: int = 0) -> torch.Generator:
    """CPU generator of parameter ``name`` (``index``: the GLOBAL expert, 0 for the others)."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()) * 7_919 + index) % _SEED_MOD)
    return g


def sample_rng(seed: int, step: int, index: int, salt: int) -> np.random.Generator:
    """The generator of sample ``index`` of step ``step``'s global batch: a function of
    (seed, step, index) only (``salt`` keeps different tasks' streams apart)."""
    return np.random.default_rng([salt, seed, step, index])


def data_rng(seed: int, *keys: int) -> np.random.Generator:
    """A data set's generator for ``keys`` (split id, item index, a salt naming the draw):
    the same item draws the same numbers whatever order items are read in."""
    return np.random.default_rng([seed, *keys])


def tp_rank_seed(base: int, rank: int) -> int:
    """Torch seed of tensor-parallel rank ``rank``'s fork, from the replicated draw ``base``."""
    return (base + 1_000_003 * (rank + 1)) % _SEED_MOD


# ----------------------------------------------------------------------------- seeding torch

def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (once per process, at start-up)."""
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


@contextlib.contextmanager
def micro_batch_scope(seed: Optional[int]) -> Iterator[None]:
    """Run one micro-batch: torch seeded with ``seed`` (its ``micro_batch_seed``) and, inside,
    every block re-seeding from ``(seed, block index)`` (``seed_block``). ``None`` leaves the
    generator alone and makes ``seed_block`` a no-op."""
    if seed is not None:
        torch.manual_seed(seed)
    token = _MICRO_SEED.set(seed)
    try:
        yield
    finally:
        _MICRO_SEED.reset(token)


def seed_block(index: int) -> None:
    """Seed torch for GLOBAL block ``index`` of the current micro-batch (no-op outside ``micro_batch_scope``)."""
    seed = _MICRO_SEED.get()
    if seed is not None:
        torch.manual_seed(block_seed(seed, index))


@contextlib.contextmanager
def tp_rank_fork(rank: int) -> Iterator[None]:
    """Torch's generator forked and seeded for tensor-parallel rank ``rank`` (CPU and the
    current CUDA device); the stream outside advances by one draw, the same on every rank."""
    base = int(torch.randint(0, 2**62, (), dtype=torch.long))
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(tp_rank_seed(base, rank))
        yield
