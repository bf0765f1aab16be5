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
