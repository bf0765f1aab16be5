"""Layout invariance, end to end through ``python -m moe.train`` on the byte-level LM.

With the same ``train.global_batch_size`` and ``train.micro_batch_size``, 2 processes
at ep=2, 2 at dp=2 (ep=1) and 4 at ep=2 x edp=2 log the same ``train/loss`` at every
step as 1 process with gradient accumulation, and end with the same parameters
(fp32 round-off, relative 1e-4). Two routing set-ups:

- dropless, expert-bias policy (its bias moves once per step from the global load),
  gradient clipping at 0.05 so that every step is clipped by the global norm;
- GShard top-2 at capacity factor 1.0 (random 2nd expert, capacity drops) with
  dropout 0.1: every random draw is seeded per micro-batch, not per rank.
"""
from __future__ import annotations

import pytest

from tests.helpers.layout import CAPACITY, TINY_LM, assert_same_training, run_layout

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LM = TINY_LM

CAPACITY = CAPACITY + ["model.dropout=0.1"]  # dropout too: its masks are seeded per micro-batch

LAYOUTS = [  # (processes, overrides)
    (2, ["parallel.ep=2"]),
    (2, ["parallel.ep=1"]),
    (4, ["parallel.ep=2"]),
]


@pytest.mark.parametrize("routing", ["dropless", "capacity"])
def test_every_layout_trains_the_same_model_as_one_process(routing, tmp_path):
    extra = CAPACITY if routing == "capacity" else []
    oracle = run_layout(LM, 1, tmp_path / "single", overrides=extra)
    assert len(oracle.metrics) == 5
    assert "global batch 8 = micro 2 x accumulation 4 x dp 1" in oracle.stdout
    if routing == "capacity":  # the capacity really drops tokens, so the test covers drops
        assert max(row["train/drop_rate"] for row in oracle.metrics) > 0
    for i, (nproc, overrides) in enumerate(LAYOUTS):
        run = run_layout(LM, nproc, tmp_path / f"layout{i}", overrides=overrides + extra)
        assert_same_training(run, oracle, rtol=1e-4)


def test_the_oracle_can_fail(tmp_path):
    """Another micro-batch size is another routing group: the helper must see the difference."""
    extra = CAPACITY
    a = run_layout(LM, 1, tmp_path / "mb2", overrides=extra)
    b = run_layout(LM, 1, tmp_path / "mb4", overrides=extra + ["train.micro_batch_size=4"])
    with pytest.raises(AssertionError, match="train/loss|parameter"):
        assert_same_training(b, a, rtol=1e-4)
