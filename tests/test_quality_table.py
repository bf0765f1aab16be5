"""tools/quality_table.py without training: commands, metrics parsing and the table."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def qt():
    spec = importlib.util.spec_from_file_location("quality_table", ROOT / "tools" / "quality_table.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["quality_table"] = mod
    spec.loader.exec_module(mod)
    return mod


def _sets(cmd):
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]


def test_command_single_process_and_dense_twin(qt, tmp_path):
    cmd = qt.command("c.yaml", "dense", 2, tmp_path / "r", ["model.preset=tiny_gshard"], 1, 64, "tiny_gshard")
    sets = _sets(cmd)
    assert cmd[1:3] == ["-m", "moe.train"] and "train.seed=2" in sets and "model.init_seed=2" in sets
    assert "parallel.ep=1" in sets and "train.micro_batch_size=64" in sets
    # The variant's preset comes after the user's, so it wins.
    assert sets.index("model.preset=tiny_gshard_dense") > sets.index("model.preset=tiny_gshard")
    cmd4 = qt.command("c.yaml", "top1", 0, tmp_path / "r", [], 4, None, "tiny_limoe")
    assert "--nproc_per_node=4" in cmd4 and "parallel.ep=1" not in _sets(cmd4)
    assert "model.moe.router.top_k=1" in _sets(cmd4)
    with pytest.raises(SystemExit, match="no model.preset"):
        qt.command("c.yaml", "dense", 0, tmp_path / "r", [], 1, 8, None)


def test_final_eval_summary_and_markdown(qt, tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = [{"step": 10, "train/loss": 1.0}, {"step": 10, "eval/zero_shot_accuracy": 0.5},
            {"step": 20, "eval/zero_shot_accuracy": 0.75, "eval/zero_shot_accuracy_all": 0.5}, {"step": 20}]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert qt.final_eval(path)["eval/zero_shot_accuracy"] == 0.75
    runs = [{"variant": "moe", "seed": s, "ok": True, "eval/zero_shot_accuracy": a, "wall_s": 10.0}
            for s, a in ((0, 0.8), (1, 0.9))]
    runs.append({"variant": "moe", "seed": 2, "ok": False})
    rows = qt.summarise(runs, ["moe"])
    assert rows[0]["seeds"] == [0, 1] and rows[0]["eval/zero_shot_accuracy"]["mean"] == pytest.approx(0.85)
    table = qt.markdown(rows)
    assert "| moe | 0,1 | 0.850 (0.800-0.900) | 10 |" in table and "val loss" not in table
    (tmp_path / "empty.jsonl").write_text(json.dumps({"step": 1, "train/loss": 2.0}) + "\n")
    with pytest.raises(RuntimeError, match="no eval record"):
        qt.final_eval(tmp_path / "empty.jsonl")
