"""The training loop: AdamW, LR schedule, gradient reduction, evals, checkpoints, telemetry.

``run(cfg)`` is the whole job: start (or reuse) the process group, build the
parallel groups and the task, train, and always tear down what it started.
``Trainer(cfg, groups=..., device=...).fit()`` is the loop itself.

One optimizer step, on every rank:

    torch.manual_seed(f(seed, step, rank))       # dropout / random routing: resumable
    loss, logs = task.loss(next(batches))        # batches are a function of (seed, step, rank)
    loss.backward()
    allreduce_gradients(model, groups)           # dense over dp, experts over edp
    clip by the global grad norm                 # expert grads summed over the ep group
    AdamW step with lr = schedule(step)

Everything that changes the numbers is a function of (config, step, rank), and
checkpoints hold the parameters, the AdamW state and the step, so training N
steps in one go or N/2 + resume + N/2 gives the same losses and parameters.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from moe.models import compile_blocks
from parallel.grads import allreduce_gradients, is_expert_param

from . import checkpoint as ckpt
from . import plots
from .config import TrainConfig
from .optim import build_optimizer, lr_at
from .telemetry import GPUMonitor, LayerRouting, RoutingRecorder, ScalarWriter, all_reduce_mean


@dataclass
class TrainResult:
    """What ``fit`` returns on every rank (``history`` and plots are filled on rank 0)."""

    step: int
    losses: List[float] = field(default_factory=list)  # this rank's loss of every step run in this call
    history: List[Dict[str, float]] = field(default_factory=list)
    final_metrics: Dict[str, float] = field(default_factory=dict)
    checkpoint: Optional[str] = None
    plots: List[str] = field(default_factory=list)
    out_dir: str = ""


# --------------------------------------------------------------------------------------
def global_grad_norm(model: nn.Module, groups) -> torch.Tensor:
    """L2 norm of the whole model's gradient after reduction (call after allreduce_gradients).

    Dense gradients are equal on every rank; each expert-parallel rank holds other
    experts, so their squared norms are summed over the ep group.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    device = params[0].grad.device
    dense = torch.zeros((), dtype=torch.float64, device=device)
    expert = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        sq = p.grad.detach().double().pow(2).sum()
        if is_expert_param(p):
            expert += sq
        else:
            dense += sq
    if groups is not None and groups.dims.ep > 1:
        dist.all_reduce(expert, group=groups.ep_group)
    return (dense + expert).sqrt()


def clip_gradients(model: nn.Module, max_norm: Optional[float], groups) -> float:
    """Scale gradients so the global norm is at most ``max_norm`` (None/0: no clipping)."""
    norm = global_grad_norm(model, groups)
    if max_norm and float(norm) > max_norm:
        scale = max_norm / (float(norm) + 1e-6)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    return float(norm)


@torch.no_grad()
def sync_replicas(model: nn.Module, groups) -> None:
    """Make replicas bit-identical: dense tensors from the first rank of the dp group,
    expert tensors from the first rank of the edp group."""
    if groups is None:
        return
    for p in list(model.parameters()) + list(model.buffers()):
        group, ranks = ((groups.edp_group, groups.group_ranks["edp"]) if is_expert_param(p)
                        else (groups.dp_group, groups.group_ranks["dp"]))
        if len(ranks) > 1:
            dist.broadcast(p.data, src=ranks[0], group=group)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of optimizer step ``step`` on ``rank`` (independent of the layout history)."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729 + 17) % (2**63 - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def make_task(cfg: TrainConfig, groups, device: torch.device, task_builder: Optional[Callable] = None):
    """Build the task: ``task_builder`` if given, a ``module:function`` name, or ``moe.tasks.build_task``.

    Every builder is called as ``builder(name, model_cfg, data_cfg, groups=..., device=...)``.
    """
    name = cfg.task.name
    if task_builder is None:
        if ":" in name:
            module, fn = name.split(":")
            try:
                task_builder = getattr(importlib.import_module(module), fn)
            except (ImportError, AttributeError) as e:
                raise ValueError(f"config key 'task.name': cannot import task builder {name!r} ({e})") from None
        else:
            from moe.tasks import build_task as task_builder
    return task_builder(name, dict(cfg.model), dict(cfg.data), groups=groups, device=str(device))


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _layer_names(model: nn.Module, layers: List[nn.Module]) -> List[str]:
    qualified = {id(m): n for n, m in model.named_modules()}
    return [qualified.get(id(l), f"moe{i}") or f"moe{i}" for i, l in enumerate(layers)]


# --------------------------------------------------------------------------------------
class Trainer:
    """Runs ``cfg.train.steps`` optimizer steps of ``task`` (see the module docstring).

    ``groups``: ``parallel.ProcessGroups`` (None only for a world of 1 without a
    process group). ``task``: an already-built task, else built from the config.
    """

    def __init__(self, cfg: TrainConfig, *, groups=None, device="cpu", task=None,
                 task_builder: Optional[Callable] = None, log: Optional[Callable[[str], None]] = None):
        self.cfg, self.groups = cfg, groups
        self.device = torch.device(device)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.is_main = self.rank == 0
        self._log_fn = log
        self.dp_rank = groups.dp_rank if groups is not None else 0
        self.dp_size = groups.dims.dp if groups is not None else 1
        seed_everything(cfg.train.seed)
        self.task = task if task is not None else make_task(cfg, groups, self.device, task_builder)
        if cfg.train.compile:
            compile_blocks(self.task.model)
        self.model: nn.Module = self.task.model
        sync_replicas(self.model, groups)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.out_dir = cfg.train.out_dir
        self.ckpt_root = os.path.join(self.out_dir, "checkpoints")
        self.plot_dir = os.path.join(self.out_dir, "plots")
        self.step = 0
        layers = list(self.task.moe_layers())
        names = _layer_names(self.model, layers)
        self.train_rec = RoutingRecorder(layers, names, training=True)
        self.eval_rec = RoutingRecorder(layers, names, training=False)

    # ---- logging ---------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if not self.is_main:
            return
        if self._log_fn is not None:
            self._log_fn(msg)
            return
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()

    @property
    def dp_group(self):
        return self.groups.dp_group if self.groups is not None else None

    # ---- checkpoints -----------------------------------------------------------------
    def _barrier(self) -> None:
        if dist.is_initialized() and self.world > 1:
            dist.barrier()

    def maybe_resume(self) -> Optional[str]:
        resume = self.cfg.train.resume
        if resume is None:
            if self.is_main and ckpt.list_checkpoints(self.ckpt_root):
                self.log(f"note: {self.ckpt_root} holds checkpoints; starting fresh "
                         "(set train.resume=auto to continue from the latest)")
            return None
        path = ckpt.latest_checkpoint(self.ckpt_root) if resume == "auto" else ckpt.resolve_checkpoint(resume)
        if path is None:
            self.log(f"resume=auto: no checkpoint under {self.ckpt_root} yet; starting fresh")
            return None
        self.step = ckpt.load_checkpoint(path, self.model, self.optimizer)
        self.log(f"resumed from {path} at step {self.step}")
        return path

    def save(self) -> str:
        meta = {"task": self.cfg.task.name, "ep": self.groups.dims.ep if self.groups else 1,
                "config": self.cfg.to_dict()}
        return ckpt.save_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer, meta=meta,
                                    keep=self.cfg.train.keep_checkpoints)

    # ---- eval ------------------------------------------------------------------------
    def evaluate(self, writer: ScalarWriter, result: TrainResult) -> Dict[str, float]:
        self.model.eval()
        self.eval_rec.reset()
        try:
            with torch.no_grad():
                metrics = dict(self.task.evaluate(max_batches=self.cfg.train.eval_batches))
        finally:
            self.model.train()
        routing = self.eval_rec.reduce(self.dp_group)
        metrics = {k: float(v) for k, v in metrics.items()}
        if self.is_main:
            writer.scalars("eval", metrics, self.step)
            writer.routing("eval_moe", routing, self.step)
            result.history.append({"step": self.step, **{f"eval/{k}": v for k, v in metrics.items()}})
            if self.cfg.telemetry.plots and routing:
                path = self._routing_plot(routing)
                if path:
                    result.plots.append(path)
                    writer.image("routing", path, self.step)
            text = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            self.log(f"eval @ step {self.step}: {text}")
        return metrics

    def _routing_plot(self, routing: List[LayerRouting]) -> Optional[str]:
        by_mod = {r.name: r.by_modality for r in routing if r.by_modality is not None}
        if by_mod and any(int(c.sum()) > 0 for c in by_mod.values()):
            path = os.path.join(self.plot_dir, f"routing_by_modality_step_{self.step:08d}.png")
            return plots.plot_modality_routing(by_mod, path, step=self.step,
                                               title=f"{self.cfg.task.name}: eval routing by modality")
        counts = {r.name: r.tokens_per_expert for r in routing}
        path = os.path.join(self.plot_dir, f"expert_load_step_{self.step:08d}.png")
        return plots.plot_expert_load(counts, path, step=self.step)

    # ---- the loop --------------------------------------------------------------------
    def _describe(self) -> str:
        n_all = sum(p.numel() for p in self.model.parameters())
        n_exp = sum(p.numel() for p in self.model.parameters() if is_expert_param(p))
        dims = self.groups.dims.sizes() if self.groups is not None else {"dp": 1, "ep": 1, "edp": 1}
        layout = ", ".join(f"{k}={dims[k]}" for k in ("dp", "ep", "edp"))
        return (f"task {self.cfg.task.name}: {len(self.train_rec.layers)} MoE layer(s), params on this rank "
                f"{_count(n_all)} ({_count(n_exp)} in experts); world {self.world} ({layout}); "
                f"device {self.device}; batch {self.cfg.train.batch_size}/rank; steps {self.cfg.train.steps}")

    def fit(self) -> TrainResult:
        cfg, tcfg = self.cfg, self.cfg.train
        result = TrainResult(step=0, out_dir=self.out_dir)
        if self.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            with open(os.path.join(self.out_dir, "config.yaml"), "w") as f:
                f.write(cfg.to_yaml())
        self._barrier()
        writer = ScalarWriter(os.path.join(self.out_dir, "tb"), enabled=self.is_main and cfg.telemetry.tensorboard)
        gpu = GPUMonitor(self.device, enabled=cfg.telemetry.gpu_stats)
        bar = None
        try:
            self.log(self._describe())
            if not gpu.available:
                self.log(f"GPU telemetry off: {gpu.reason}")
            result.checkpoint = self.maybe_resume()
            if self.is_main and cfg.telemetry.progress_bar and sys.stderr.isatty():
                from tqdm import tqdm

                bar = tqdm(total=tcfg.steps, initial=self.step, desc="train", dynamic_ncols=True,
                           file=sys.stderr, mininterval=1.0)
            self._train_steps(result, writer, gpu, bar)
            if bar is not None:
                bar.close()
                bar = None
            result.final_metrics = self.evaluate(writer, result)
            here = os.path.abspath(ckpt.step_dir(self.ckpt_root, self.step))
            if result.checkpoint is None or os.path.abspath(result.checkpoint) != here:
                result.checkpoint = self.save()
            result.step = self.step
            if self.is_main:
                self._finish(result)
            return result
        finally:
            if bar is not None:
                bar.close()
            writer.close()
            gpu.close()
            self.train_rec.close()
            self.eval_rec.close()

    def _train_steps(self, result: TrainResult, writer: ScalarWriter, gpu: GPUMonitor, bar) -> None:
        cfg, tcfg = self.cfg, self.cfg.train
        self.model.train()
        self.train_rec.reset()
        batches = iter(self.task.train_batches(dp_rank=self.dp_rank, dp_size=self.dp_size,
                                               batch_size=tcfg.batch_size, seed=tcfg.seed,
                                               start_step=self.step))
        window: Dict[str, float] = {}
        window_steps, busy = 0, 0.0  # busy: seconds spent in training steps (evals/saves excluded)
        while self.step < tcfg.steps:
            t0 = time.perf_counter()
            torch.manual_seed(step_seed(tcfg.seed, self.step, self.rank))
            try:
                batch = next(batches)
            except StopIteration:
                raise RuntimeError(f"the task's train_batches ended at step {self.step}; "
                                   f"it must yield at least train.steps={tcfg.steps} batches") from None
            lr = lr_at(self.step, cfg.optim, tcfg.steps)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            loss, logs = self.task.loss(batch)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at step {self.step + 1} on rank {self.rank}; "
                                         f"stopping (the last checkpoint under {self.ckpt_root} is intact)")
            loss.backward()
            if self.groups is not None:
                allreduce_gradients(self.model, self.groups)
            grad_norm = clip_gradients(self.model, cfg.optim.grad_clip, self.groups)
            self.optimizer.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            busy += time.perf_counter() - t0
            self.step += 1
            result.losses.append(value)
            window_steps += 1
            for k, v in {"loss": value, "grad_norm": grad_norm, **{k: float(v) for k, v in logs.items()}}.items():
                window[k] = window.get(k, 0.0) + v
            if bar is not None:
                bar.update(1)
            if self.step % tcfg.log_every == 0 or self.step == tcfg.steps:
                self._log_window(result, writer, gpu, bar, window, window_steps, busy, lr)
                window, window_steps, busy = {}, 0, 0.0
            if tcfg.eval_every and self.step % tcfg.eval_every == 0 and self.step < tcfg.steps:
                self.evaluate(writer, result)
            if tcfg.checkpoint_every and self.step % tcfg.checkpoint_every == 0:
                result.checkpoint = self.save()

    def _log_window(self, result, writer, gpu, bar, window, n, elapsed, lr) -> None:
        keys = sorted(window)
        if dist.is_initialized() and self.world > 1:  # ranks must agree on the keys they reduce
            every = [None] * self.world
            dist.all_gather_object(every, keys)
            keys = sorted(set.intersection(*(set(k) for k in every)))
        means = all_reduce_mean({k: window[k] / n for k in keys}, self.dp_group)
        routing = self.train_rec.reduce(self.dp_group)
        if not self.is_main:
            return
        tokens = routing[0].tokens if routing else 0
        samples = n * self.cfg.train.batch_size * self.dp_size
        speed = {"samples_per_s": samples / max(elapsed, 1e-9)}
        if tokens:
            speed["tokens_per_s"] = tokens / max(elapsed, 1e-9)
        drop = sum(r.drop_rate for r in routing) / len(routing) if routing else 0.0
        hw = gpu.read()
        row = {"step": self.step, "train/lr": lr, "train/drop_rate": drop,
               **{f"train/{k}": v for k, v in means.items()}, **{f"train/{k}": v for k, v in speed.items()},
               **{f"gpu/{k}": v for k, v in hw.items()}}
        result.history.append(row)
        writer.scalars("", {k: v for k, v in row.items() if k != "step"}, self.step)
        writer.routing("moe", routing, self.step)
        writer.flush()
        with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        aux = {k: v for k, v in means.items() if k not in ("loss", "grad_norm")}
        rate = (f"{speed['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in speed
                else f"{speed['samples_per_s']:.1f} samples/s")
        parts = [f"step {self.step}/{self.cfg.train.steps}", f"loss {means['loss']:.4f}", f"lr {lr:.2e}",
                 rate, f"drop {100 * drop:.1f}%"]
        parts += [f"{k} {v:.4g}" for k, v in aux.items()]
        if hw:
            parts.append(f"gpu {hw.get('gpu_util_pct', 0):.0f}% {hw.get('gpu_mem_used_gb', 0):.1f}GB "
                         f"{hw.get('gpu_power_w', 0):.0f}W")
        if bar is not None:
            post = {"loss": f"{means['loss']:.4f}", "rate": rate, "drop": f"{100 * drop:.1f}%"}
            post.update({k: f"{v:.3g}" for k, v in list(aux.items())[:3]})
            bar.set_postfix(post, refresh=False)
        self.log(" | ".join(parts))

    def _finish(self, result: TrainResult) -> None:
        if self.cfg.telemetry.plots and result.history:
            result.plots.append(plots.plot_history(result.history, os.path.join(self.plot_dir, "history.png"),
                                                   title=f"{self.cfg.task.name}"))
        self.log(f"checkpoint: {os.path.abspath(result.checkpoint)}")
        if result.plots:
            self.log(f"plots: {os.path.abspath(self.plot_dir)} (latest: {os.path.basename(result.plots[-1])}"
                     + (f", {os.path.basename(result.plots[-2])}" if len(result.plots) > 1 else "") + ")")
        if self.cfg.telemetry.tensorboard:
            self.log(f"tensorboard: tensorboard --logdir {os.path.abspath(os.path.join(self.out_dir, 'tb'))}")
        acc = result.final_metrics.get("zero_shot_accuracy")
        if acc is not None:
            self.log(f"zero-shot accuracy: {acc:.2f}")


# --------------------------------------------------------------------------------------
def run(cfg: TrainConfig, *, task_builder: Optional[Callable] = None,
        log: Optional[Callable[[str], None]] = None) -> TrainResult:
    """The whole job: process group (from torchrun / SLURM / none), groups, task, ``fit``.

    The process group is destroyed afterwards if this call created it, also when
    training raises (checkpoints already written stay intact).
    """
    from parallel.launch import build_groups, init_distributed

    ctx = init_distributed(cfg.parallel.backend, device=cfg.train.device)
    try:
        groups = build_groups(cfg.parallel.ep, tp=cfg.parallel.tp, pp=cfg.parallel.pp, etp=cfg.parallel.etp)
        trainer = Trainer(cfg, groups=groups, device=ctx.device, task_builder=task_builder, log=log)
        return trainer.fit()
    finally:
        ctx.close()
