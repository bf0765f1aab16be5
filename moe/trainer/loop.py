"""The training loop: the schedule of one optimizer step, the loop, and the cadence of evals and checkpoints.

``run(cfg)`` is the whole job: start (or reuse) the process group, build the
parallel groups and the task, train, and always tear down what it started.
``Trainer(cfg, groups=..., device=...).fit()`` is the loop itself.

One optimizer step s, on every rank (``StepSchedule`` holds the numbers):

    the global batch of s = samples 0 .. G-1, sample j a function of (seed, s, j)
    this data-parallel rank takes its contiguous share of G / dp samples,
    cut into A = G / (micro * dp) micro-batches of ``micro`` samples
    engine.forward_backward: for each micro-batch m
        torch.manual_seed(f(seed, s, global index of m))   # parallel.rng: dropout, random routing:
        loss_m = task.loss(micro-batch m); backward(loss_m / A)   # every block re-seeds from it
      then gradients reduced: dense over dp, experts over edp (parallel.grads)
      (pp > 1: parallel.pipeline runs the micro-batches through the stages with torch's
      schedule, the same numbers; logs gathered over the stages)
    engine.clip_grad_norm(grad_clip)      # global norm, every parameter counted once
    engine.step(lr = schedule(s))
    every MoE layer's expert bias updated once, from the load of the whole global batch
    (train.precision bf16/fp16: every forward under autocast, parallel.precision; fp16: the losses
      scaled before the backward, gradients unscaled before the norm, and a step whose norm is not
      finite skipped: no update, no expert-bias update, counted in train/skipped_steps)
    every rank of the world: stop now? (one-integer all-reduce: did any rank get SIGTERM/SIGINT;
      if so every rank saves a checkpoint of step s and the run ends, moe.trainer.preemption)

A micro-batch is the routing group: capacity, drops and balancing losses are those
of one process running the same micro-batch. So any layout with the same
``train.global_batch_size`` and ``train.micro_batch_size`` trains the same model
(LIMoE: the same dp size too, its contrastive negatives are gathered over dp).
Everything that changes the numbers is a function of (config, step), and
checkpoints hold the parameters, the optimizer state and the step, so N steps in
one go or N/2 + resume + N/2 give the same losses and parameters.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from moe.models import compile_blocks
from moe.models.activation_checkpointing import apply_activation_checkpointing
from parallel.dims import ProcessGroups
from parallel.launch import build_groups, explain_timeout, init_distributed
from parallel.objects import all_gather_objects
from parallel.pipeline import PipelineEngine
from parallel.precision import LossScaler, Precision
from parallel.rng import micro_batch_scope, micro_batch_seed, seed_everything
from parallel.tensor import clear_megatron_state

from ..modes import eval_mode
from ..tasks.base import Task
from . import checkpoint as ckpt
from . import plots, report
from . import resume as start
from .config import ConfigError, TrainConfig, resolve_sections
from .fused import fuse_norms
from .health import RoutingHealth
from .engines import build_engine
from .layout import check_layout, check_pipeline
from .optim import lr_at
from .profiling import StepProfiler
from .preemption import StopSignals
from .report import TrainResult
from .schedule import StepSchedule
from .setup import make_task
from .sinks import Sinks
from .telemetry import GPUMonitor, LayerRouting, RoutingRecorder, all_reduce_mean

__all__ = ["Trainer", "TrainResult", "StepSchedule", "run"]


def _model_config(cfg: TrainConfig) -> Dict:
    """What trainer.json records of the model (compared on resume): the task and its model
    section resolved (preset expanded, every default), or as given when it cannot be resolved
    (a task passed in by the caller under a name that is no importable builder)."""
    try:
        model = resolve_sections(cfg)["model"]
    except ConfigError:
        model = dict(cfg.model)
    return {"task": cfg.task.name, "model": model}


# --------------------------------------------------------------------------------------
class Trainer:
    """Runs ``cfg.train.steps`` optimizer steps of ``task`` (see the module docstring).

    ``groups``: the rank's ``parallel.ProcessGroups`` (``parallel.launch.build_groups``;
    world-1 groups for one process). ``device``: where the model trains. ``task``: an
    already-built task (``moe.tasks.Task``), else built from the config (``task_builder``:
    the builder to call, ``moe.trainer.setup.make_task``). ``log``: the console function.
    What the run reports and when: ``moe.trainer.report``.
    """

    def __init__(self, cfg: TrainConfig, *, groups: ProcessGroups, device: Union[str, torch.device] = "cpu",
                 task: Optional[Task] = None, task_builder: Optional[Callable] = None,
                 log: Optional[Callable[[str], None]] = None):
        if not isinstance(groups, ProcessGroups):
            raise TypeError("Trainer: groups must be a parallel.ProcessGroups (parallel.launch.build_groups() "
                            f"gives world-1 groups for one process), got {type(groups).__name__}")
        self.cfg, self.groups = cfg, groups
        self.device = torch.device(device)
        self.rank, self.world = groups.rank, groups.dims.world_size
        self.is_main = self.rank == 0
        self._log_fn = log
        self.schedule = StepSchedule.from_config(cfg.train, groups.dims.dp, groups.dp_rank)
        seed_everything(cfg.train.seed)
        self.stage_plan = check_pipeline(cfg, self.world) if groups.dims.pp > 1 else None
        self.task = task if task is not None else make_task(cfg, groups, self.device, task_builder,
                                                            pipeline=self.stage_plan)
        if cfg.train.compile:
            compile_blocks(self.task.model)
        if cfg.train.activation_checkpointing != "none":
            apply_activation_checkpointing(self.task.model, cfg.train.activation_checkpointing)
        self.model = self.task.model
        self.precision = Precision(cfg.train.precision)
        self.scaler: Optional[LossScaler] = LossScaler() if self.precision.loss_scaling else None
        self.fused = cfg.fused_choice(self.device.type)
        if self.fused.norm == "apex":
            fuse_norms(self.model)
        self.moe_layers = list(self.task.moe_layers())
        for layer in self.moe_layers:  # the expert bias moves once per optimizer step (apply_expert_bias_update)
            layer.defer_expert_bias_update = True
        self.engine = build_engine(cfg, self.task, groups, device=self.device, precision=self.precision,
                                   optimizer_kind=self.fused.optimizer, num_micro=self.schedule.accumulation,
                                   micro_batch_size=self.schedule.micro)
        self.optimizer = self.engine.optimizer
        self.out_dir = cfg.train.out_dir
        self.ckpt_root = os.path.join(self.out_dir, "checkpoints")
        self.plot_dir = os.path.join(self.out_dir, "plots")
        self.step = 0
        self.run_id: Optional[str] = None  # set by maybe_resume: new, or the resumed checkpoint's
        self.memory: Optional[List[Dict[str, int]]] = None  # every rank's engine.memory() after the first step
        self.model_config = _model_config(cfg)
        qualified = {id(m): n for n, m in self.model.named_modules()}
        names = [qualified.get(id(layer)) or f"moe{i}" for i, layer in enumerate(self.moe_layers)]
        self.train_rec = RoutingRecorder(self.moe_layers, names, training=True)
        self.eval_rec = RoutingRecorder(self.moe_layers, names, training=False)
        self.health = RoutingHealth(cfg.telemetry.idle_expert_steps, cfg.telemetry.drop_jump)
        flops = getattr(self.task, "flops_per_sample", None)  # a custom task may not say
        self.flops_per_sample: Optional[int] = flops() if callable(flops) else None
        self.peak_flops: Optional[float] = None  # FLOP/s of all devices together, for train/mfu (fit)
        self.profiler = StepProfiler(cfg.telemetry.profile, self.out_dir, self.rank, self.device)
        self.stop = StopSignals(self.world)

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.groups.dp_group

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # ---- checkpoints -----------------------------------------------------------------
    def maybe_resume(self, say: Callable[[str], None]) -> Optional[str]:
        """Continue from the checkpoint ``train.resume`` asks for (``moe.trainer.resume.resume_run``:
        refusals, ``train.overwrite``, loading); sets ``step`` and ``run_id``. Collective."""
        tcfg = self.cfg.train
        begun = start.resume_run(resume=tcfg.resume, overwrite=tcfg.overwrite, steps=tcfg.steps,
                                 out_dir=self.out_dir, root=self.ckpt_root, model=self.model, engine=self.engine,
                                 groups=self.groups, model_config=self.model_config, scaler=self.scaler, say=say)
        self.step, self.run_id = begun.step, begun.run_id
        return begun.path

    def save(self) -> str:
        meta = {"task": self.cfg.task.name, "ep": self.groups.dims.ep, "config": self.cfg.to_dict(),
                "model_config": self.model_config}
        if self.scaler is not None:
            meta["loss_scaler"] = self.scaler.state_dict()
        return ckpt.save_checkpoint(self.ckpt_root, self.step, self.model, self.engine.checkpoint_optimizer(),
                                    meta=meta,
                                    keep=self.cfg.train.keep_checkpoints, groups=self.groups, run_id=self.run_id)

    # ---- eval ------------------------------------------------------------------------
    def evaluate(self, sinks: Sinks, result: TrainResult) -> Dict[str, float]:
        self.eval_rec.reset()
        with eval_mode(self.model), self.precision.autocast(self.device.type):
            metrics = {k: float(v) for k, v in self.task.evaluate(max_batches=self.cfg.train.eval_batches).items()}
        routing = self._stage_routing(self.eval_rec.reduce(self.dp_group))
        if self.is_main:
            result.history.append({"step": self.step, **{f"eval/{k}": v for k, v in metrics.items()}})
            if self.cfg.telemetry.plots and routing:
                path = plots.plot_routing(routing, self.plot_dir, self.step, title=self.cfg.task.name)
                if path:
                    result.plots.append(path)
                    sinks.writer.image("routing", path, self.step)
        sinks.eval(self.step, metrics, routing)
        return metrics

    # ---- the loop --------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg = self.cfg
        result = TrainResult(step=0, out_dir=self.out_dir)
        notes: List[str] = []
        try:  # before anything is written into out_dir: a refused run leaves it as it was
            result.checkpoint = self.maybe_resume(notes.append)
        except BaseException:
            self.train_rec.close()
            self.eval_rec.close()
            raise
        if self.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            with open(os.path.join(self.out_dir, "config.yaml"), "w") as f:
                f.write(cfg.to_yaml(redacted=True))  # secret-looking values masked (moe.trainer.redact)
        self._barrier()
        sinks = Sinks(self.out_dir, enabled=self.is_main, tensorboard=cfg.telemetry.tensorboard,
                      progress_bar=cfg.telemetry.progress_bar, total_steps=cfg.train.steps, log=self._log_fn)
        gpu = GPUMonitor(self.device, enabled=cfg.telemetry.gpu_stats)
        self.stop.arm()  # SIGTERM/SIGINT from here on: stop after a step, with a checkpoint
        try:
            description = report.describe_run(cfg, self.model, self.groups, moe_layers=len(self.moe_layers),
                                              stage_plan=self.stage_plan, device=self.device,
                                              schedule=self.schedule, precision=self.precision)
            self.peak_flops = report.report_start(sinks, cfg, description=description, precision=self.precision,
                                                  fused=self.fused, gpu=gpu, flops_per_sample=self.flops_per_sample,
                                                  world=self.world, samples_per_step=self.schedule.global_batch,
                                                  notes=notes)
            sinks.open_bar(self.step)
            self._train_steps(result, sinks, gpu)
            sinks.close_bar()
            if self.stop.stopped_by is None:
                result.final_metrics = self.evaluate(sinks, result)
            here = os.path.abspath(ckpt.step_dir(self.ckpt_root, self.step))
            checkpoint = result.checkpoint
            if checkpoint is None or os.path.abspath(checkpoint) != here:
                checkpoint = self.save()
            result.checkpoint, result.step, result.stopped_by = checkpoint, self.step, self.stop.stopped_by
            if self.is_main:
                stopped = (self.stop.stopped_line(self.step, cfg.train.steps, os.path.abspath(checkpoint))
                           if result.stopped_by else None)
                report.report_end(sinks, cfg, result, checkpoint=checkpoint, plot_dir=self.plot_dir,
                                  out_dir=self.out_dir, stopped_line=stopped)
            if result.stopped_by:  # no rank exits (75) before rank 0 printed its last line
                self._barrier()
            return result
        finally:
            self.stop.disarm()
            self.profiler.close()  # a run that ends inside the window writes what it recorded
            sinks.close()
            gpu.close()
            self.train_rec.close()
            self.eval_rec.close()

    def _micro_input(self, m: int) -> Tuple[dict, int]:
        """This rank's micro-batch ``m`` of the current step and its torch seed."""
        sched, seed = self.schedule, self.cfg.train.seed
        batch = self.task.micro_batch(self.step, sched.first_sample + m * sched.micro, sched.micro, seed=seed)
        return batch, micro_batch_seed(seed, self.step, sched.micro_index(m))

    def _micro_loss(self, m: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Forward of this rank's micro-batch ``m`` of the current step: (loss, logs)."""
        batch, seed = self._micro_input(m)
        with micro_batch_scope(seed), self.precision.autocast(self.device.type):
            loss, logs = self.task.loss(batch)
        value = float(loss.detach())
        self._check_finite(value, m)
        return loss, {**{k: float(v) for k, v in logs.items()}, "loss": value}

    def _check_finite(self, value: float, m: int) -> None:
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {self.step + 1} on rank {self.rank} (micro-batch "
                                     f"{m}); stopping (the last checkpoint under {self.ckpt_root} is intact)")

    def _forward_backward(self) -> List[Dict[str, float]]:
        engine, num_micro = self.engine, self.schedule.accumulation
        if isinstance(engine, PipelineEngine):  # pp > 1: the stages run the micro-batches' forwards themselves
            logs = engine.forward_backward(num_micro, self._micro_input)
            for m, entry in enumerate(logs):  # the same logs on every stage: every rank stops together
                self._check_finite(entry["loss"], m)
            return logs
        return engine.forward_backward(num_micro, self._micro_loss)

    def _optimizer_step(self, lr: float) -> Tuple[List[Dict[str, float]], float, bool]:
        """Forward/backward of the step's micro-batches, clip, update: (micro logs, grad norm, skipped).

        fp16 (``parallel.precision.LossScaler``): the losses are scaled before the backward, the
        reduced gradients unscaled before the norm; a non-finite global norm skips the update
        (parameters, optimizer state and expert biases unchanged) and backs the scale off.
        """
        scaler = self.scaler
        if scaler is not None:
            self.engine.loss_scale = scaler.scale
        micro_logs = self._forward_backward()
        if scaler is not None:
            self.engine.unscale_grads(1.0 / scaler.scale)
        grad_norm = self.engine.clip_grad_norm(self.cfg.optim.grad_clip)
        if scaler is not None and scaler.update(math.isfinite(grad_norm)):
            self.engine.skip_step()
            for layer in self.moe_layers:
                layer.discard_expert_bias_update()
            return micro_logs, grad_norm, True
        self.engine.step(lr)
        for layer in self.moe_layers:
            layer.apply_expert_bias_update()
        return micro_logs, grad_norm, False

    def _stage_routing(self, routing: List[LayerRouting]) -> List[LayerRouting]:
        """Routing statistics of every pipeline stage's MoE layers (in block order), from this stage's."""
        if self.stage_plan is None:
            return routing
        every = all_gather_objects(routing, self.groups.pp_group)
        merged = [r for part in every for r in part]
        return sorted(merged, key=lambda r: [int(t) if t.isdigit() else t for t in r.name.split(".")])

    def _train_steps(self, result: TrainResult, sinks: Sinks, gpu: GPUMonitor) -> None:
        cfg, tcfg = self.cfg, self.cfg.train
        self.model.train()
        self.train_rec.reset()
        window: Dict[str, float] = {}
        window_steps, busy = 0, 0.0  # busy: seconds spent in training steps (evals/saves excluded)
        while self.step < tcfg.steps:
            self.profiler.begin(self.step + 1)
            t0 = time.perf_counter()
            lr = lr_at(self.step, cfg.optim, tcfg.steps)
            micro_logs, grad_norm, skipped = self._optimizer_step(lr)
            if skipped:
                sinks.line(self._skipped_line())
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            busy += time.perf_counter() - t0
            self.step += 1
            traced = self.profiler.end(self.step)
            if traced:
                sinks.line(traced)
            if self.memory is None:  # after this run's first step every buffer exists
                self.memory = self._gather_memory()
                if self.is_main:
                    report.report_memory(sinks, self.memory, step=self.step, out_dir=self.out_dir)
            keys = set.intersection(*(set(logs) for logs in micro_logs))
            step_logs = {k: sum(logs[k] for logs in micro_logs) / len(micro_logs) for k in keys}
            step_logs["grad_norm"] = grad_norm
            result.losses.append(step_logs["loss"])
            window_steps += 1
            for k, v in step_logs.items():
                window[k] = window.get(k, 0.0) + v
            sinks.tick()
            if self.step % tcfg.log_every == 0 or self.step == tcfg.steps:
                self._log_window(result, sinks, gpu, window, window_steps, busy, lr)
                window, window_steps, busy = {}, 0, 0.0
            if self.step < tcfg.steps and self.stop.should_stop():  # collective: every rank, after this step
                if window_steps:
                    self._log_window(result, sinks, gpu, window, window_steps, busy, lr)
                sinks.line(self.stop.stopping_line(self.step, tcfg.steps))
                break
            if tcfg.eval_every and self.step % tcfg.eval_every == 0 and self.step < tcfg.steps:
                self.evaluate(sinks, result)
            if tcfg.checkpoint_every and self.step % tcfg.checkpoint_every == 0:
                result.checkpoint = self.save()

    def _skipped_line(self) -> str:
        """What the job prints after a step the fp16 loss scaler skipped."""
        scaler = self.scaler
        assert scaler is not None, "only the fp16 loss scaler skips a step"
        return (f"step {self.step + 1}: gradients overflowed in fp16, the step is skipped (parameters "
                f"unchanged); loss scale -> {scaler.scale:g}, {scaler.skipped_steps} skipped "
                "so far (train/skipped_steps)")

    def _gather_memory(self) -> List[Dict[str, int]]:
        """Every rank's ``engine.memory()`` (bytes of parameters, gradients, optimizer state), in rank
        order. Collective over the world."""
        mine = {k: int(v) for k, v in self.engine.memory().items()}
        return all_gather_objects(mine) if self.world > 1 else [mine]

    def _log_window(self, result: TrainResult, sinks: Sinks, gpu: GPUMonitor, window: Dict[str, float], n: int,
                    elapsed: float, lr: float) -> None:
        """The log window of the last ``n`` steps (``window``: their summed logs; ``elapsed``: seconds
        of training): the means over the steps and the dp ranks and the routing counts of the whole job
        (collective), reported on rank 0 (``moe.trainer.report.report_window``)."""
        keys = sorted(window)
        if self.world > 1:  # ranks must agree on the keys they reduce
            every = all_gather_objects(keys)
            keys = sorted(set.intersection(*(set(k) for k in every)))
        means = all_reduce_mean({k: window[k] / n for k in keys}, self.dp_group)
        if self.scaler is not None:  # the same on every rank
            means.update(loss_scale=self.scaler.scale, skipped_steps=float(self.scaler.skipped_steps))
        routing = self._stage_routing(self.train_rec.reduce(self.dp_group))
        if not self.is_main:
            return
        report.report_window(sinks, result.history, self.health, step=self.step, lr=lr, means=means,
                             routing=routing, steps=n, seconds=elapsed, hardware=gpu.read(),
                             samples_per_step=self.schedule.global_batch, flops_per_sample=self.flops_per_sample,
                             peak_flops=self.peak_flops)


# --------------------------------------------------------------------------------------
def run(cfg: TrainConfig, *, task_builder: Optional[Callable] = None,
        log: Optional[Callable[[str], None]] = None) -> TrainResult:
    """The whole job: process group (from torchrun / SLURM / none), groups, task, ``fit``.

    The process group is destroyed afterwards if this call created it, also when
    training raises (checkpoints already written stay intact). Its collectives wait at
    most ``parallel.timeout_s`` for a peer; a timeout error gets a note naming the key.
    ``result.stopped_by`` is set when SIGTERM/SIGINT stopped the run early
    (``moe.trainer.preemption``; ``python -m moe.train`` then exits with ``EXIT_PREEMPTED``).
    """
    ctx = init_distributed(cfg.parallel.backend, device=cfg.train.device, timeout_s=cfg.parallel.timeout_s)
    try:
        check_layout(cfg, dist.get_world_size())  # also for Python callers that skipped python -m moe.train
        p = cfg.parallel
        groups = build_groups(p.ep, tp=p.tp, pp=p.pp, etp=p.etp, sequence_parallel=p.sequence_parallel,
                              timeout=ctx.timeout)
        trainer = Trainer(cfg, groups=groups, device=ctx.device, task_builder=task_builder, log=log)
        return trainer.fit()
    except Exception as e:
        if ctx.world_size > 1:
            explain_timeout(e, cfg.parallel.timeout_s)  # a hung peer: name parallel.timeout_s
        raise
    finally:
        clear_megatron_state()
        ctx.close()
