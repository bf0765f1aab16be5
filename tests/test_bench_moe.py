"""tools/bench_moe.py runs end to end on a tiny shape and writes every figure to --json.

Speed is never asserted here: only that each implementation ran and reported numbers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *extra):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "bench_moe.py"), "--T", "64", "--d", "16", "--f", "32",
           "--E", "4", "--k", "2", "--warmup", "0", "--repeats", "1", "--threads", "1", "--json", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, json.loads(out.read_text())


def test_bench_moe_tiny_with_deepspeed(tmp_path):
    pytest.importorskip("deepspeed")
    stdout, data = _run(tmp_path, "--backends", "cpp", "torch")
    impls = {r["impl"] for r in data["rows"]}
    assert impls == {"ideal", "ours/cpp/dropless", "ours/cpp/cf1.25", "ours/torch/dropless", "ours/torch/cf1.25",
                     "deepspeed/dropless", "deepspeed/cf1.25"}
    for row in data["rows"]:
        assert row["median_s"] > 0 and row["min_s"] <= row["median_s"] <= row["max_s"]
        assert row["vs_ideal"] is not None
        assert row["peak_bytes"] > 0 and "rss_peak_bytes" in row  # profiler-measured tensor bytes on CPU
        if row["impl"].startswith("ours/"):
            assert row["deepspeed_vs_ours"] is not None
    assert data["machine"] and data["command"].startswith("python tools/bench_moe.py")
    assert "| custom | ideal |" in stdout


def test_bench_moe_rejects_half_a_shape(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_moe.py"), "--T", "64"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "needs all of --T --d --f --E --k" in proc.stderr


def test_sweep_shapes_are_other_shapes_the_ideal_can_run():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import bench_moe

    for regime, shapes in bench_moe.SWEEP.items():
        assert shapes and all(cfg != bench_moe.REGIMES[regime] for cfg in shapes)
        for cfg in shapes:
            assert (cfg["T"] * cfg["k"]) % cfg["E"] == 0, (regime, cfg)  # the ideal's T*k/E rows per expert


def test_verdict_checks_each_target_per_regime():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import bench_moe

    def row(regime, impl, t, mem, ds):
        return dict(regime=regime, impl=impl, vs_ideal=t, mem_vs_ideal=mem, deepspeed_vs_ours=ds)

    rows = [row("fine", "ideal", 1.0, 1.0, None),
            row("fine", "ours/cpp/dropless", 0.9, 0.4, 1.64),  # DeepSpeed margin 1.64 < 1.8
            row("fine:1/2/3/4/5", "ours/cpp/cf1.25", 1.2, 0.5, 2.0),  # a sweep shape: time 1.2 > 1.15
            row("compute", "ours/cpp/dropless", 1.0, 1.1, 1.3),
            row("custom", "ours/cpp/dropless", 1.0, 1.0, 1.0)]  # no DeepSpeed target for a custom shape
    fine, compute, custom = bench_moe.verdict(rows)
    assert fine.startswith("targets, fine: ")
    assert "time vs ideal <= 1.15: missed by 1/2 (fine:1/2/3/4/5 ours/cpp/cf1.25 1.20) (worst 1.20)" in fine
    assert "peak vs ideal <= 1.15: met (worst 0.50)" in fine
    assert "DeepSpeed / ours >= 1.8: missed by 1/2 (fine ours/cpp/dropless 1.64) (worst 1.64)" in fine
    assert compute == ("targets, compute: time vs ideal <= 1.15: met (worst 1.00) | peak vs ideal <= 1.15: met "
                       "(worst 1.10) | DeepSpeed / ours >= 1.2: met (worst 1.30)")
    assert "DeepSpeed" not in custom
