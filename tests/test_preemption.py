"""Preemption and faults: a signal stops every rank after the same step with a checkpoint and exit
status 75, and the resumed run equals one never stopped; a rank killed under torchrun
``--max-restarts=1`` comes back from the last checkpoint and ends with the same parameters; a hung
peer ends the job after ``parallel.timeout_s`` with an error naming the key.

The oracle of every equality is an uninterrupted run of the same config and layout (the same
numbers bit for bit: resuming restores parameters, optimizer state and step, and every random
number is a function of (seed, step)). Faults come from ``tests.helpers.faults`` (the rank signals,
kills or hangs itself at a given step); the signalled step is drawn at random, and the checks of
the stopped run name it.
"""
from __future__ import annotations

import copy
import json
import os
import random
import re
import signal
import subprocess
import sys
from datetime import timedelta
from typing import Dict, List, Mapping, Sequence

import pytest
import torch
import yaml

from parallel.checks import ConfigError
from moe.trainer import checkpoint as ckpt
from moe.trainer.config import from_dict
from moe.trainer.preemption import EXIT_PREEMPTED
from tests.helpers.distributed import free_port
from tests.helpers.layout import ROOT, TINY_LM, _final_params, assert_same_training, run_layout
from tests.helpers.toy import toy_config

TOY = toy_config("unused", train={"checkpoint_every": 0, "eval_every": 0}).to_dict()
PP2 = ["parallel.pp=2"]  # TINY_LM on 2 pipeline stages, one block each, 4 micro-batches per step
LM = copy.deepcopy(TINY_LM)
LM["train"]["checkpoint_every"] = 2


def _write(config: Mapping, out_dir) -> str:
    """``config`` as ``run_layout`` writes it (run dir ``out_dir/run``, a row per step, no telemetry)."""
    raw = copy.deepcopy(dict(config))
    raw.setdefault("train", {}).update({"out_dir": os.path.join(str(out_dir), "run"), "log_every": 1})
    raw.setdefault("telemetry", {}).update({"tensorboard": False, "plots": False, "progress_bar": False,
                                            "gpu_stats": False})
    os.makedirs(str(out_dir), exist_ok=True)
    path = os.path.join(str(out_dir), "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    return path


def _env(fault: str = "", **extra) -> Dict[str, str]:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **extra}
    env.pop("MOE_TEST_FAULT", None)
    if fault:
        env["MOE_TEST_FAULT"] = fault
    return env


def _args(path: str, overrides: Sequence[str]) -> List[str]:
    return ["-m", "tests.helpers.faults", "--config", path] + [a for o in overrides for a in ("--set", o)]


def _ranks(config: Mapping, nproc: int, out_dir, overrides: Sequence[str] = (), *, fault: str = "",
           hung: Sequence[int] = (), timeout: float = 240) -> List[subprocess.CompletedProcess]:
    """Run every rank as its own process (no torchrun): each rank's exit status is seen here.

    The ``hung`` ranks are killed (SIGKILL) once the others have ended.
    """
    path, port = _write(config, out_dir), str(free_port())
    procs = [subprocess.Popen([sys.executable, *_args(path, overrides)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=_env(fault, RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port) if nproc > 1 else _env(fault))
             for r in range(nproc)]
    done = {}
    try:
        for r in sorted(range(nproc), key=lambda r: r in hung):
            if r in hung:
                procs[r].kill()
            out, err = procs[r].communicate(timeout=timeout)
            done[r] = subprocess.CompletedProcess(procs[r].args, procs[r].returncode, out, err)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [done[r] for r in range(nproc)]


def _latest_step(out_dir) -> int:
    path = ckpt.latest_checkpoint(os.path.join(str(out_dir), "run", "checkpoints"))
    assert path is not None, f"no checkpoint under {out_dir}"
    return int(os.path.basename(path).split("_")[-1])


def _stop_and_resume(config: Mapping, nproc: int, out_dir, overrides: Sequence[str], fault: str, step: int,
                     steps: int, who: str):
    """Stop a run with ``fault`` and check every rank's exit and the job's lines; then resume it."""
    what = f"{fault} on {nproc} process(es)"
    done = _ranks(config, nproc, out_dir, overrides, fault=fault)
    for rank, proc in enumerate(done):
        assert proc.returncode == EXIT_PREEMPTED, \
            f"{what}: rank {rank} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = done[0].stdout.strip().splitlines()
    name = fault.split("@")[0]
    assert f"stopping after step {step} of {steps}: {name} received by {who}; saving a checkpoint" in lines, \
        f"{what}:\n{done[0].stdout}"
    assert lines[-1].startswith(f"stopped by {name} after step {step} of {steps}; checkpoint: ") and \
        lines[-1].endswith(f"step_{step:08d}; exit code {EXIT_PREEMPTED}; continue with train.resume: auto "
                           "in the same train.out_dir"), f"{what}: last line {lines[-1]!r}"
    assert _latest_step(out_dir) == step, what
    rows = _rows(out_dir)
    assert [r["step"] for r in rows] == list(range(1, step + 1)), f"{what}: logged steps {[r['step'] for r in rows]}"
    return run_layout(config, nproc, out_dir, overrides=list(overrides) + ["train.resume=auto"])


def _resumed_from(stdout: str, step: int) -> bool:
    return any("resumed from" in line and f"step_{step:08d}" in line for line in stdout.splitlines())


def _rows(out_dir) -> List[Dict[str, float]]:
    with open(os.path.join(str(out_dir), "run", "metrics.jsonl")) as f:
        return [r for r in map(json.loads, filter(str.strip, f)) if "train/loss" in r]


@pytest.fixture(scope="module")
def toy_oracle(tmp_path_factory):
    return run_layout(TOY, 1, tmp_path_factory.mktemp("toy_oracle"))


@pytest.fixture(scope="module")
def pp2_oracle(tmp_path_factory):
    return run_layout(LM, 2, tmp_path_factory.mktemp("pp2_oracle"), overrides=PP2)


@pytest.mark.distributed
@pytest.mark.slow
def test_sigterm_on_one_process_saves_exits_75_and_resumes_to_the_same_parameters(toy_oracle, tmp_path):
    steps = TOY["train"]["steps"]
    k = random.randrange(1, steps)  # the signal arrives while step k runs
    resumed = _stop_and_resume(TOY, 1, tmp_path, (), f"SIGTERM@{k}:0", k, steps, "this process")
    assert _resumed_from(resumed.stdout, k), f"SIGTERM at step {k}: not resumed from it\n{resumed.stdout}"
    assert_same_training(resumed, toy_oracle, rtol=0.0)


@pytest.mark.distributed
@pytest.mark.slow
def test_sigint_stops_like_sigterm(tmp_path):
    k = random.randrange(1, TOY["train"]["steps"])
    done = _ranks(TOY, 1, tmp_path, fault=f"SIGINT@{k}:0")
    assert done[0].returncode == EXIT_PREEMPTED, f"SIGINT at step {k}: exit {done[0].returncode}\n{done[0].stderr}"
    assert done[0].stdout.strip().splitlines()[-1].startswith(f"stopped by SIGINT after step {k} of ")
    assert _latest_step(tmp_path) == k and "Traceback" not in done[0].stderr


@pytest.mark.distributed
@pytest.mark.slow
def test_sigterm_on_one_pipeline_stage_stops_both_after_the_same_step(pp2_oracle, tmp_path):
    """Only rank 1 (the last stage) gets the signal; both ranks stop after step k, save it and exit 75."""
    steps = LM["train"]["steps"]
    k = random.randrange(1, steps)
    resumed = _stop_and_resume(LM, 2, tmp_path, PP2, f"SIGTERM@{k}:1", k, steps, "rank 1")
    assert _resumed_from(resumed.stdout, k), f"SIGTERM at step {k}: not resumed from it\n{resumed.stdout}"
    assert_same_training(resumed, pp2_oracle, rtol=0.0)


@pytest.mark.distributed
@pytest.mark.slow
def test_a_rank_killed_under_torchrun_restarts_from_the_checkpoint_with_the_same_parameters(pp2_oracle, tmp_path):
    """Rank 1 SIGKILLs itself during step 4 (checkpoint every 2 steps); torchrun restarts both ranks once."""
    marker = tmp_path / "killed"
    path = _write(LM, tmp_path)
    # --standalone: the c10d rendezvous, a fresh store per restart (the static one of --master_port keeps
    # the first workers' addresses, so restarted workers cannot connect)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           *_args(path, PP2 + ["train.resume=auto"])]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(f"SIGKILL@4:1:{marker}"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    assert marker.read_text() == "rank 1 killed itself\n", "the fault never fired"
    assert "failed (exitcode: -9) local_rank: 1" in proc.stderr, proc.stderr[-3000:]
    assert _resumed_from(proc.stdout, 2), proc.stdout
    rows = {r["step"]: r for r in _rows(tmp_path)}  # steps 3 and 4 ran twice: the restart's rows are last
    assert sorted(rows) == [r["step"] for r in pp2_oracle.metrics]
    for want in pp2_oracle.metrics:
        assert rows[want["step"]]["train/loss"] == want["train/loss"], f"step {want['step']}"
    params = _final_params(LM, ckpt.latest_checkpoint(os.path.join(str(tmp_path), "run", "checkpoints")))
    for name, want in pp2_oracle.params.items():
        assert torch.equal(params[name], want), name


@pytest.mark.distributed
@pytest.mark.slow
def test_a_hung_peer_ends_the_job_after_parallel_timeout_s(tmp_path):
    """Rank 1 sleeps in step 2; rank 0 waits in the data-parallel gradient all-reduce (a subgroup)."""
    done = _ranks(TOY, 2, tmp_path, ["parallel.timeout_s=3", "train.steps=3"], fault="HANG@2:1", hung=[1],
                  timeout=120)
    rank0 = done[0]
    assert rank0.returncode == 1, f"rank 0 exited {rank0.returncode}\n{rank0.stderr[-3000:]}"
    assert "Timed out waiting 3000ms" in rank0.stderr, rank0.stderr[-3000:]
    assert ("a collective waited longer than parallel.timeout_s=3 s for its peers: another rank hung or died"
            in rank0.stderr), rank0.stderr[-3000:]
    assert done[1].returncode == -signal.SIGKILL  # still asleep when rank 0 had ended: killed by _ranks


@pytest.mark.parametrize("value, message", [
    (0, "it must be in (0.0, 604800.0]"), (-5, "it must be in (0.0, 604800.0]"), (True, "it must be a number"),
    (float("inf"), "it must be a finite number"), ("10m", "it must be a number")])
def test_parallel_timeout_s_is_checked_naming_the_key(value, message):
    with pytest.raises(ConfigError, match=r"config key 'parallel\.timeout_s': got .*; " + re.escape(message)):
        from_dict({"task": "lm", "model": {}, "parallel": {"timeout_s": value}})
    cfg = from_dict({"task": "lm", "model": {}})
    assert cfg.parallel.timeout_s == 600.0 and cfg.train.checkpoint_every == 1000  # the documented defaults


def test_a_restarted_worker_of_a_multi_node_torchrun_stops_naming_the_store_setting():
    from parallel.launch import LaunchEnv, LaunchError, attempt_store

    launch = LaunchEnv(3, 16, 3, "127.0.0.1", 29500, "torchrun")
    shared = {"TORCHELASTIC_USE_AGENT_STORE": "True", "GROUP_WORLD_SIZE": "2"}
    with pytest.raises(LaunchError, match=r"TORCHELASTIC_RESTART_COUNT=1\) on one of 2 nodes .* "
                                          "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        attempt_store(launch, timedelta(seconds=1), {**shared, "TORCHELASTIC_RESTART_COUNT": "1"})
    # the first attempt, or a store of its own per rendezvous round: torch's env:// as usual
    assert attempt_store(launch, timedelta(seconds=1), {**shared, "TORCHELASTIC_RESTART_COUNT": "0"}) is None
    assert attempt_store(launch, timedelta(seconds=1), {**shared, "TORCHELASTIC_USE_AGENT_STORE": "False",
                                                        "TORCHELASTIC_RESTART_COUNT": "1"}) is None
