"""The training loop on a tiny toy task: 1 process and 4 processes (ep=2), crash safety, CLI.

The toy task lives in ``tests/helpers/toy.py``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from moe.trainer import checkpoint as ckpt
from moe.trainer.loop import run
from moe.trainer.optim import lr_at
from moe.trainer.telemetry import RoutingRecorder
from tests.helpers.distributed import free_port, run_distributed
from tests.helpers.toy import SEQ, toy_config, trainer_in_group

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------
def test_lr_schedule_warmup_cosine_constant():
    cfg = toy_config("unused").optim
    lrs = [lr_at(s, cfg, 10) for s in range(10)]
    assert lrs[0] == pytest.approx(cfg.lr / 2) and lrs[1] == pytest.approx(cfg.lr)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert lr_at(10, cfg, 10) == pytest.approx(cfg.lr * cfg.min_lr_ratio)
    const = toy_config("unused", optim={"schedule": "constant", "warmup_steps": 0}).optim
    assert {lr_at(s, const, 10) for s in range(10)} == {const.lr}
    lin = toy_config("unused", optim={"schedule": "linear", "warmup_steps": 0, "min_lr_ratio": 0.0}).optim
    assert lr_at(5, lin, 10) == pytest.approx(lin.lr / 2)


def test_single_process_run_writes_everything(tmp_path):
    cfg = toy_config(tmp_path / "run", telemetry={"tensorboard": True, "plots": True},
                     train={"steps": 8, "eval_every": 4, "checkpoint_every": 4})
    lines = []
    result = run(cfg, log=lines.append)
    assert not dist.is_initialized(), "run() must destroy the process group it created"
    assert result.step == 8 and len(result.losses) == 8
    assert all(torch.isfinite(torch.tensor(result.losses)))
    # final lines: checkpoint, plots, tensorboard, then exactly one zero-shot accuracy line, last
    assert lines[-1].startswith("zero-shot accuracy: ") and len(lines[-1].split(": ")[1]) == 4
    assert sum(line.startswith("zero-shot accuracy") for line in lines) == 1
    assert any(line.startswith("checkpoint: ") and "step_00000008" in line for line in lines)
    assert any(line.startswith("GPU telemetry off") for line in lines)
    assert any(line.startswith("step 2/8 | loss ") and "drop " in line for line in lines)
    run_dir = tmp_path / "run"
    assert ckpt.latest_checkpoint(str(run_dir / "checkpoints")).endswith("step_00000008")
    assert (run_dir / "checkpoints" / "step_00000004" / ".metadata").is_file()
    pngs = sorted(p.name for p in (run_dir / "plots").iterdir())
    assert "routing_by_modality_step_00000004.png" in pngs and "routing_by_modality_step_00000008.png" in pngs
    assert "history.png" in pngs
    assert all((run_dir / "plots" / p).stat().st_size > 1000 for p in pngs)
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(run_dir / "tb"))
    every = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in every if "train/loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    evals = [r for r in every if "train/loss" not in r]
    assert [r["step"] for r in evals] == [4, 8] and all("eval/val_loss" in r for r in evals), evals
    assert {"train/loss", "train/lr", "train/drop_rate", "train/tokens_per_s", "train/mse"} <= set(rows[0])
    assert (run_dir / "config.yaml").is_file()


def test_deterministic_given_seed(tmp_path):
    a = run(toy_config(tmp_path / "a"), log=lambda m: None)
    b = run(toy_config(tmp_path / "b"), log=lambda m: None)
    c = run(toy_config(tmp_path / "c", train={"seed": 4}), log=lambda m: None)
    assert a.losses == b.losses
    assert a.losses != c.losses


def _four_ranks(rank, world, out_dir):
    cfg = toy_config(out_dir, parallel={"ep": 2}, train={"steps": 4, "global_batch_size": 16, "eval_every": 2,
                                                         "checkpoint_every": 0},
                     telemetry={"plots": True})
    trainer = trainer_in_group(cfg)
    result = trainer.fit()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    first = trainer.model.moe.experts.first_expert
    # routing telemetry is summed over every rank (EP ranks included)
    rec = RoutingRecorder(trainer.task.moe_layers(), training=False)
    trainer.model.eval()
    with torch.no_grad():
        trainer.task.evaluate()
    (routing,) = rec.reduce(trainer.groups.dp_group)
    local = trainer.model.moe.last_stats
    return {"losses": result.losses, "params": params, "first_expert": first, "routing": routing,
            "local_tokens": local["tokens_per_expert"], "metrics": result.final_metrics,
            "plots": result.plots, "ckpt": result.checkpoint}


@pytest.mark.distributed
def test_four_processes_expert_parallel(tmp_path):
    out = run_distributed(_four_ranks, 4, str(tmp_path / "ep2"), timeout=120)
    # world 4, ep=2: ep groups [0,1] [2,3]; edp groups [0,2] [1,3]
    assert [o["first_expert"] for o in out] == [0, 2, 0, 2]
    for o in out:
        assert len(o["losses"]) == 4 and all(torch.isfinite(torch.tensor(o["losses"])))
    dense = [n for n in out[0]["params"] if ".experts." not in n]
    for r in range(1, 4):  # dense replicas stay bit-identical over dp
        for n in dense:
            assert torch.equal(out[0]["params"][n], out[r]["params"][n]), n
    for a, b in ((0, 2), (1, 3)):  # expert replicas over edp
        assert torch.equal(out[a]["params"]["moe.experts.w1"], out[b]["params"]["moe.experts.w1"])
    assert not torch.equal(out[0]["params"]["moe.experts.w1"], out[1]["params"]["moe.experts.w1"])
    assert out[0]["metrics"] == out[1]["metrics"]
    assert out[0]["plots"] and os.path.isfile(out[0]["plots"][-1]) and not out[1]["plots"]
    assert out[0]["ckpt"].endswith("step_00000004")
    routing = out[0]["routing"]
    assert routing.tokens == 4 * 16 * SEQ and routing.forwards == 4
    assert torch.equal(routing.tokens_per_expert, sum(o["local_tokens"] for o in out))
    assert torch.equal(routing.by_modality.sum(0), routing.tokens_per_expert)
    assert int(routing.tokens_per_expert.sum()) == routing.kept <= routing.dispatched == 4 * 16 * SEQ * 2


def test_crash_keeps_last_checkpoint_and_destroys_group(tmp_path):
    cfg = toy_config(tmp_path / "crash", data={"fail_at_step": 4}, train={"checkpoint_every": 2, "steps": 8})
    with pytest.raises(RuntimeError, match="toy failure at step 4"):
        run(cfg, log=lambda m: None)
    assert not dist.is_initialized()
    root = str(tmp_path / "crash" / "checkpoints")
    assert ckpt.latest_checkpoint(root).endswith("step_00000004")
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(root)] == ["step_00000002", "step_00000004"]


def test_nonfinite_loss_stops_with_clear_error(tmp_path):
    cfg = toy_config(tmp_path / "nan", optim={"lr": 1e30, "grad_clip": None, "warmup_steps": 0},
                     train={"steps": 30, "checkpoint_every": 0, "eval_every": 0})
    with pytest.raises(FloatingPointError, match=r"loss is (nan|inf) at step \d+"):
        run(cfg, log=lambda m: None)
    assert not dist.is_initialized()


@pytest.mark.distributed
def test_cli_under_torchrun_two_processes(tmp_path):
    cfg_path = tmp_path / "toy.yaml"
    cfg_path.write_text(toy_config(tmp_path / "cli").to_yaml())
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "moe.train", "--config", str(cfg_path),
           "--set", "parallel.ep=2", "--set", "train.steps=4", "--set", "telemetry.progress_bar=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.strip().splitlines()
    assert "step 4/4 | loss" in proc.stdout and "world 2 (dp=2, ep=2, edp=1)" in proc.stdout
    assert out[-1].startswith("zero-shot accuracy: 0.")


def test_cli_reports_config_errors(tmp_path):
    cfg_path = tmp_path / "toy.yaml"
    cfg_path.write_text(toy_config(tmp_path / "cli").to_yaml())
    proc = subprocess.run([sys.executable, "-m", "moe.train", "--config", str(cfg_path), "--set", "train.stepz=3"],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "config key 'train.stepz' is not known" in proc.stderr
