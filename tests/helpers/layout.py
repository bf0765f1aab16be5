"""The layout oracle: run one config under N processes through ``python -m moe.train`` and compare.

``run_layout(config, nproc, out_dir, overrides=[...])`` writes the config as YAML,
runs it (one process directly, several under ``torch.distributed.run`` on
loopback), and returns a ``LayoutRun``: the per-step ``train/*`` metrics from
``metrics.jsonl`` (``log_every`` is forced to 1) and the final parameters, loaded
from the run's last checkpoint into a single-process model (experts gathered by
their global index, tensor-parallel pieces at their global offsets), so runs of any
layout compare tensor by tensor; also the evaluation rows and the checkpoint path.

``assert_same_training(a, b, rtol)``: the same steps, ``train/loss`` and
``train/grad_norm`` equal at every step within ``rtol`` (relative), the same drop
rate and routed-token count, and every parameter equal within ``rtol`` in relative
L2 norm. Every later parallelism test (tensor, pipeline, ZeRO) uses
these two functions with its own layouts.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence

import torch
import yaml

from .distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class LayoutRun:
    nproc: int
    overrides: List[str]
    metrics: List[Dict[str, float]]  # one row per step: {"step": s, "train/loss": ..., ...}
    params: Dict[str, torch.Tensor]  # final parameters of the whole model (all experts)
    stdout: str
    evals: List[Dict[str, float]]  # the evaluation rows: {"step": s, "eval/val_loss": ..., ...}
    checkpoint: str  # the run's last checkpoint directory

    def losses(self) -> List[float]:
        return [row["train/loss"] for row in self.metrics]

    def describe(self) -> str:
        return f"{self.nproc} process(es) {' '.join(self.overrides)}".strip()


def _final_params(cfg_dict: Mapping, path: str) -> Dict[str, torch.Tensor]:
    from moe.trainer import checkpoint as ckpt
    from moe.trainer.config import from_dict
    from moe.trainer.setup import make_task

    cfg = from_dict(copy.deepcopy(dict(cfg_dict)))
    task = make_task(cfg, None, torch.device("cpu"))  # no groups: one process holds every expert
    ckpt.load_checkpoint(path, task.model)
    return {n: p.detach().clone() for n, p in task.model.named_parameters()}


def run_layout(config: Mapping, nproc: int, out_dir, *, overrides: Sequence[str] = (), timeout: float = 300
               ) -> LayoutRun:
    """Run ``config`` (a plain dict as YAML holds it) on ``nproc`` processes with ``--set`` overrides."""
    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    run_dir = os.path.join(out_dir, "run")
    raw = copy.deepcopy(dict(config))
    raw.setdefault("train", {}).update({"out_dir": run_dir, "log_every": 1})
    raw.setdefault("telemetry", {}).update({"tensorboard": False, "plots": False, "progress_bar": False,
                                            "gpu_stats": False})
    path = os.path.join(out_dir, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    launcher = [sys.executable, "-m", "moe.train"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", "-m", "moe.train"]
    cmd = launcher + ["--config", path] + [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    from moe.trainer import checkpoint as ckpt
    from moe.trainer.config import apply_overrides

    path = ckpt.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    if path is None:
        raise AssertionError(f"the run in {run_dir} wrote no checkpoint")
    effective = apply_overrides(copy.deepcopy(raw), list(overrides))
    return LayoutRun(nproc, list(overrides), [r for r in rows if "train/loss" in r],
                     _final_params(effective, path), proc.stdout,
                     [r for r in rows if any(k.startswith("eval/") for k in r)], path)


# The tiny LM every layout test trains: dropless expert-bias routing, every step clipped at 0.05
# (so the global gradient norm counts). Adam eps 1e-6, not 1e-8: the key part of attn.qkv.bias
# has an exactly zero true gradient (softmax is shift-invariant), and with eps 1e-8 Adam scales
# its round-off noise up to lr-sized steps, so that parameter would hold noise, not a value.
TINY_LM = {
    "task": "lm",
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ffn": 64, "max_seq_len": 32, "moe_every": 2,
              "moe": {"num_experts": 4, "d_ffn": 64,
                      "router": {"policy": "expert_bias", "top_k": 2, "capacity_factor": None,
                                 "expert_bias_rate": 0.01},
                      "aux_losses": {"load_balancing": 0.01, "z_loss": 0.001}}},
    "data": {"max_bytes": 60_000, "eval_batches": 1, "eval_batch_size": 4},
    "optim": {"lr": 3e-3, "warmup_steps": 0, "grad_clip": 0.05, "eps": 1e-6},
    "train": {"steps": 5, "global_batch_size": 8, "micro_batch_size": 2, "seed": 7, "checkpoint_every": 0},
}
# The tiny LIMoE of the layout tests (two blocks, the second MoE; 2 micro-batches of 4 pairs).
TINY_LIMOE = {
    "task": "limoe",
    "model": {"preset": "tiny_limoe", "d_model": 32, "n_layers": 2, "n_heads": 2, "d_ffn": 64, "embed_dim": 16,
              "moe": {"num_experts": 4, "d_ffn": 32}},
    "data": {"zeroshot_size": 16, "val_size": 16, "eval_batch_size": 16},
    "optim": {"lr": 1e-3, "warmup_steps": 0, "eps": 1e-6},
    "train": {"steps": 5, "global_batch_size": 8, "micro_batch_size": 4, "seed": 3, "checkpoint_every": 0},
}
# ... and the LM's GShard top-2 variant at capacity factor 1.0, which drops tokens.
CAPACITY = ["model.moe.router.policy=gshard", "model.moe.router.capacity_factor=1.0", "optim.grad_clip=1.0"]


def final_eval(run: LayoutRun, step: int) -> Dict[str, float]:
    """The last evaluation row the run logged at ``step``."""
    rows = [r for r in run.evals if r["step"] == step]
    assert rows, run.stdout[-2000:]
    return rows[-1]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / max(||b||, tiny), in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_same_training(run: LayoutRun, oracle: LayoutRun, *, rtol: float = 1e-4) -> None:
    """``run`` logged the same ``train/loss`` at every step and ended with the same parameters as ``oracle``."""
    what = f"{run.describe()} vs {oracle.describe()}"
    assert [r["step"] for r in run.metrics] == [r["step"] for r in oracle.metrics], what
    for a, b in zip(run.metrics, oracle.metrics):
        rel = abs(a["train/loss"] - b["train/loss"]) / max(abs(b["train/loss"]), 1e-30)
        assert rel <= rtol, f"{what}: step {a['step']} train/loss {a['train/loss']!r} vs {b['train/loss']!r} (rel {rel:.2e})"
    for a, b in zip(run.metrics, oracle.metrics):  # the same norm, drops and routed-token count
        for key, tol in (("train/grad_norm", rtol), ("train/drop_rate", 1e-9), ("train/routed_tokens", 0.0)):
            if key in b:
                assert key in a and abs(a[key] - b[key]) <= tol * max(abs(b[key]), 1.0), \
                    f"{what}: step {a['step']} {key} {a.get(key)!r} vs {b[key]!r}"
    assert run.params.keys() == oracle.params.keys(), what
    worst = max(oracle.params, key=lambda n: relative_error(run.params[n], oracle.params[n]))
    err = relative_error(run.params[worst], oracle.params[worst])
    assert err <= rtol, f"{what}: parameter {worst} differs by {err:.2e} (relative L2)"


def assert_same_with_drops(config: Mapping, nproc: int, overrides: Sequence[str], out_dir) -> None:
    """``config`` with ``CAPACITY`` (which really drops tokens) under ``overrides`` on ``nproc`` processes
    trains like one process."""
    oracle = run_layout(config, 1, os.path.join(str(out_dir), "single"), overrides=CAPACITY)
    assert max(row["train/drop_rate"] for row in oracle.metrics) > 0  # the capacity really drops
    run = run_layout(config, nproc, os.path.join(str(out_dir), "layout"), overrides=CAPACITY + list(overrides))
    assert_same_training(run, oracle, rtol=1e-4)


def assert_reload_across(config: Mapping, key: str, save: int, load: int, out_dir) -> None:
    """A checkpoint of ``config`` saved at ``parallel.<key>=save`` resumes at ``=load`` with the same
    parameters and the same final evaluation (nothing left to train)."""
    saved = run_layout(config, save, os.path.join(str(out_dir), "save"), overrides=[f"parallel.{key}={save}"])
    resumed = copy.deepcopy(dict(config))
    resumed["train"] = {**resumed["train"], "resume": str(saved.checkpoint)}
    loaded = run_layout(resumed, load, os.path.join(str(out_dir), "load"), overrides=[f"parallel.{key}={load}"])
    steps = config["train"]["steps"]
    assert f"resumed from {saved.checkpoint} at step {steps}" in loaded.stdout
    assert loaded.metrics == []  # nothing left to train: the run only evaluates
    a, b = final_eval(saved, steps), final_eval(loaded, steps)
    assert abs(b["eval/val_loss"] - a["eval/val_loss"]) <= 1e-5 * abs(a["eval/val_loss"])
    for name in saved.params:
        assert loaded.params[name].equal(saved.params[name]), name
