"""Which blocks each pipeline stage holds: the stage plan (pure; no processes needed).

Legend (words, no glossary letters): ``n_blocks`` transformer blocks, ``pp`` pipeline
ranks, ``virtual_stages`` chunks per rank, ``n_chunks = pp x virtual_stages`` model
chunks (the units ``torch.distributed.pipelining`` calls stages).

The blocks are cut into ``n_chunks`` contiguous chunks; chunk c runs on pipeline rank
``c % pp`` ("loop" placement: rank r holds chunks r, r + pp, r + 2 pp, ...; with one
virtual stage chunk c is simply stage c). Chunk 0 also holds the embeddings, the last chunk the final
norm, the head and the task loss.

The cut (``plan_stages``), in order of precedence:

- ``counts``: an explicit list of ``n_chunks`` block counts (``parallel.pp_blocks``), each >= 1;
- ``virtual_stages`` > 1 (the interleaved schedule): ``n_blocks / n_chunks`` blocks per
  chunk; ``n_chunks`` must divide ``n_blocks``, so every chunk of the interleaved
  schedule has the same work;
- otherwise the balanced cut: the contiguous split that minimises the largest chunk
  cost, where a block costs what the caller says (``costs``; the trainer passes each
  block's forward FLOPs per token, ``TransformerConfig.block_flops_per_token``: attention
  projections and scores, plus the FFN's ACTIVE FLOPs: an MoE block counts its k
  experts of its expert width, and its router); ties go to the cut with fewer blocks
  in the earlier chunks (the first stage also embeds, the last also runs the head).

Blocks keep their GLOBAL index wherever they live (``model.transformer.blocks.<i>``), so
parameter names and checkpoints do not depend on the plan.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from .checks import ConfigError

__all__ = ["StagePlan", "plan_stages", "balanced_cut"]


@dataclass(frozen=True)
class StagePlan:
    """The cut of the blocks into ``pp * virtual_stages`` chunks (see the module doc).

    ``chunks[c]``: the global block indices of chunk c (contiguous, ascending).
    """

    pp: int
    virtual_stages: int
    chunks: Tuple[Tuple[int, ...], ...]

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    @property
    def num_blocks(self) -> int:
        return sum(len(c) for c in self.chunks)

    def rank_of_chunk(self, c: int) -> int:
        """The pipeline rank (index in the pp group) that runs chunk ``c``."""
        return c % self.pp

    def chunks_of_rank(self, r: int) -> List[int]:
        """Chunks of pipeline rank ``r`` in execution order."""
        return list(range(r, self.num_chunks, self.pp))

    def blocks_of_rank(self, r: int) -> List[int]:
        """Every block pipeline rank ``r`` holds (ascending)."""
        return [b for c in self.chunks_of_rank(r) for b in self.chunks[c]]

    def is_first(self, r: int) -> bool:
        """Whether rank ``r`` holds chunk 0 (the embeddings)."""
        return self.rank_of_chunk(0) == r

    def is_last(self, r: int) -> bool:
        """Whether rank ``r`` holds the last chunk (final norm, head, loss)."""
        return self.rank_of_chunk(self.num_chunks - 1) == r

    def describe(self) -> str:
        parts = []
        for c, blocks in enumerate(self.chunks):
            span = f"{blocks[0]}" if len(blocks) == 1 else f"{blocks[0]}-{blocks[-1]}"
            parts.append(f"chunk {c} (rank {self.rank_of_chunk(c)}): blocks {span}")
        return "; ".join(parts)


def balanced_cut(costs: Sequence[float], parts: int) -> List[int]:
    """Block counts of the contiguous cut of ``costs`` into ``parts`` non-empty chunks whose
    largest chunk cost is smallest (ties: the earlier chunks get fewer blocks)."""
    n = len(costs)
    if not 1 <= parts <= n:
        raise ValueError(f"balanced_cut: cannot cut {n} blocks into {parts} non-empty chunks")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[p][i]: smallest max-chunk cost of cutting the LAST i blocks into p chunks
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for p in range(1, parts + 1):
        for i in range(p, n + 1):
            start = n - i
            for take in range(1, i - (p - 1) + 1):  # the first of these p chunks takes `take` blocks
                best[p][i] = min(best[p][i], max(prefix[start + take] - prefix[start], best[p - 1][i - take]))
    limit = best[parts][n]
    # the optimum fixed, each chunk in turn takes the fewest blocks that let the rest stay within it
    counts, start = [], 0
    for p in range(parts, 0, -1):
        rest = n - start
        take = next(t for t in range(1, rest - (p - 1) + 1)
                    if prefix[start + t] - prefix[start] <= limit and best[p - 1][rest - t] <= limit)
        counts.append(take)
        start += take
    return counts


def plan_stages(costs: Sequence[float], pp: int, *, virtual_stages: int = 1,
                counts: Optional[Sequence[int]] = None) -> StagePlan:
    """The ``StagePlan`` of a model whose block i costs ``costs[i]`` (see the module doc for the rule).

    ``len(costs)`` is the number of blocks (``model.n_layers``); the costs matter only to the
    balanced cut. Raises ``ConfigError`` naming ``parallel.pp`` / ``parallel.virtual_stages`` /
    ``parallel.pp_blocks`` when the blocks do not split that way.
    """
    n, chunks = len(costs), pp * virtual_stages
    if chunks > n:
        key, value = ("parallel.pp", pp) if virtual_stages == 1 else ("parallel.virtual_stages", virtual_stages)
        raise ConfigError(f"config key '{key}': got {value}; pp x virtual_stages = {pp} x {virtual_stages} = "
                          f"{chunks} pipeline chunks need at least that many blocks, the model has "
                          f"model.n_layers={n}")
    if counts is not None:
        counts = list(counts)
        if len(counts) != chunks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in counts):
            raise ConfigError(f"config key 'parallel.pp_blocks': got {counts}; it must list {chunks} block counts "
                              f"(one per pipeline chunk: pp x virtual_stages = {pp} x {virtual_stages}), each >= 1")
        if sum(counts) != n:
            raise ConfigError(f"config key 'parallel.pp_blocks': got {counts}, which sums to {sum(counts)}; the "
                              f"counts must add up to model.n_layers={n}")
    elif virtual_stages > 1:
        if n % chunks:
            raise ConfigError(f"config key 'parallel.virtual_stages': got {virtual_stages}; the interleaved schedule "
                              f"cuts the model.n_layers={n} blocks into pp x virtual_stages = {chunks} equal chunks, "
                              f"so {chunks} must divide {n} (or list the cut in parallel.pp_blocks)")
        counts = [n // chunks] * chunks
    else:
        counts = balanced_cut(costs, chunks)
    out, start = [], 0
    for k in counts:
        out.append(tuple(range(start, start + k)))
        start += k
    return StagePlan(pp=pp, virtual_stages=virtual_stages, chunks=tuple(out))
