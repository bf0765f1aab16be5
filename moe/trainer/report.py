"""What a training run tells its reader: the start-up lines, the memory report after the
first step, each log window's row, and the closing lines.

Plain functions of what they are given, writing through ``moe.trainer.sinks.Sinks`` (rank 0
writes, other ranks' sinks do nothing) and into ``<out_dir>``. The loop
(``moe.trainer.loop.Trainer``) decides when each runs and does the collectives that gather
what they report (every rank's memory, the window's means and routing counts); nothing
here talks to other ranks.

- ``describe_run``: the first line (task, parameters, layout, device, batch, precision);
- ``report_start``: the start-up lines, and the device peak behind ``train/mfu`` (``mfu_peak``);
- ``report_memory``: ``memory.json`` and its console line;
- ``report_window``: one log window's row (``metrics.jsonl``, TensorBoard, console) and its
  routing-health warnings;
- ``report_end``: the history plot and the closing lines (checkpoint, plots, TensorBoard,
  zero-shot accuracy, how a stopped run continues).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from moe.models.flops import TRAIN_FLOPS_PER_FORWARD
from parallel.dims import ProcessGroups
from parallel.grads import is_expert_param
from parallel.precision import Precision
from parallel.stages import StagePlan

from . import plots
from .config import TelemetryConfig, TrainConfig
from .fused import FusedChoice
from .health import RoutingHealth
from .schedule import StepSchedule
from .sinks import Sinks, train_row
from .telemetry import GPUMonitor, LayerRouting, peak_tflops_for

__all__ = ["TrainResult", "describe_run", "mfu_peak", "report_start", "report_memory", "report_window",
           "report_end"]


@dataclass
class TrainResult:
    """What ``Trainer.fit`` returns on every rank (``history`` and plots are filled on rank 0)."""

    step: int
    losses: List[float] = field(default_factory=list)  # this rank's mean micro-batch loss of every step run
    history: List[Dict[str, float]] = field(default_factory=list)
    final_metrics: Dict[str, float] = field(default_factory=dict)
    checkpoint: Optional[str] = None
    plots: List[str] = field(default_factory=list)
    out_dir: str = ""
    stopped_by: Optional[str] = None  # "SIGTERM" / "SIGINT": stopped early by a signal (moe.trainer.preemption)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


# ---- start-up ----------------------------------------------------------------------------
def describe_run(cfg: TrainConfig, model: nn.Module, groups: ProcessGroups, *, moe_layers: int,
                 stage_plan: Optional[StagePlan], device: torch.device, schedule: StepSchedule,
                 precision: Precision) -> str:
    """The run's first line: the task, ``moe_layers`` MoE layers and the parameters on this rank (those
    in experts apart), the layout (dp, ep, edp always; tp, etp when split; sequence parallelism, ZeRO,
    the pipeline ``stage_plan``), the device, the batch ``schedule``, the steps and the precision."""
    n_all = sum(p.numel() for p in model.parameters())
    n_exp = sum(p.numel() for p in model.parameters() if is_expert_param(p))
    dims = groups.dims.sizes()
    layout = ", ".join(f"{k}={dims[k]}" for k in ("dp", "tp", "ep", "etp", "edp") if k in ("dp", "ep", "edp")
                       or dims[k] > 1)
    if groups.dims.sequence_parallel and dims["tp"] > 1:
        layout += ", sequence parallel"
    p = cfg.parallel
    if p.zero_stage > 0:
        layout += f", ZeRO stage {p.zero_stage} on {p.zero_engine_name}"
    if stage_plan is not None:
        layout += (f", pp={dims['pp']} ({p.pp_schedule}"
                   + (f", {p.virtual_stages} virtual stages" if p.virtual_stages > 1 else "")
                   + f"; {stage_plan.describe()})")
    where = " on this pipeline stage" if stage_plan is not None else ""
    return (f"task {cfg.task.name}: {moe_layers} MoE layer(s){where}, params on this rank "
            f"{_count(n_all)} ({_count(n_exp)} in experts); world {groups.dims.world_size} ({layout}); "
            f"device {device}; {schedule.describe()}; steps {cfg.train.steps}; "
            f"precision {precision.name}")


def mfu_peak(telemetry: TelemetryConfig, gpu_name: Optional[str], *, flops_per_sample: Optional[int],
             world: int, samples_per_step: int) -> Tuple[Optional[float], Optional[str]]:
    """The device peak behind ``train/mfu``: (FLOP/s of all ``world`` devices together, the line that says
    so), from ``telemetry.peak_tflops``, else the known peak of the GPU named ``gpu_name``; (None, None)
    when the peak or the model's forward FLOPs per sample is unknown (no MFU then)."""
    peak, source = telemetry.peak_tflops, "telemetry.peak_tflops"
    if peak is None:
        peak, source = peak_tflops_for(gpu_name), f"the dense bf16 peak of {gpu_name}"
    if peak is None or flops_per_sample is None:
        return None, None
    flops = TRAIN_FLOPS_PER_FORWARD * flops_per_sample * samples_per_step
    return peak * 1e12 * world, (f"model FLOPs per step {flops:.3e} (3 x forward, active parameters); MFU "
                                 f"against {peak:g} TFLOP/s per device ({source}) x {world} device(s)")


def report_start(sinks: Sinks, cfg: TrainConfig, *, description: str, precision: Precision, fused: FusedChoice,
                 gpu: GPUMonitor, flops_per_sample: Optional[int], world: int, samples_per_step: int,
                 notes: Sequence[str]) -> Optional[float]:
    """The start-up lines: ``description`` (``describe_run``), the precision, the fused kernels, why GPU
    telemetry is off, the MFU peak (``mfu_peak``), then ``notes`` (what resuming did). Returns the peak
    FLOP/s of all devices (None: no ``train/mfu``)."""
    sinks.line(description)
    sinks.line(f"precision {precision.name}: {precision.describe(cfg.engine_kind)}")
    sinks.line(fused.describe())
    if not gpu.available:
        sinks.line(f"GPU telemetry off: {gpu.reason}")
    peak, line = mfu_peak(cfg.telemetry, gpu.name, flops_per_sample=flops_per_sample, world=world,
                          samples_per_step=samples_per_step)
    if line is not None:
        sinks.line(line)
    for note in notes:
        sinks.line(note)
    return peak


# ---- during the run ----------------------------------------------------------------------
def report_memory(sinks: Sinks, every: Sequence[Mapping[str, int]], *, step: int, out_dir: str) -> None:
    """Every rank's bytes of parameters, gradients and optimizer state (``every[r]``: rank r's
    ``engine.memory()`` after step ``step``): all of them in ``<out_dir>/memory.json``, one line
    with the least and the most on the console. Rank 0 only."""
    with open(os.path.join(out_dir, "memory.json"), "w") as f:
        json.dump({"step": step, "bytes_per_rank": list(every)}, f, indent=1)
    parts = []
    for key, name in (("params", "params"), ("grads", "grads"), ("optimizer", "optimizer state")):
        low, high = min(m[key] for m in every), max(m[key] for m in every)
        parts.append(f"{name} {_mib(low)}" + (f"-{_mib(high)}" if high != low else "") + " MiB")
    sinks.line(f"memory per rank after step {step} ({len(every)} rank(s), each in memory.json): "
               + ", ".join(parts))


def report_window(sinks: Sinks, history: List[Dict[str, float]], health: RoutingHealth, *, step: int, lr: float,
                  means: Mapping[str, float], routing: Sequence[LayerRouting], steps: int, seconds: float,
                  hardware: Mapping[str, float], samples_per_step: int, flops_per_sample: Optional[int],
                  peak_flops: Optional[float]) -> None:
    """One log window of ``steps`` steps ending at ``step`` (``seconds`` of training in it): its row
    (``moe.trainer.sinks.train_row`` of the job-wide ``means`` and ``routing`` counts, the ``hardware``
    counters, throughput and MFU, the routing health) appended to ``history`` and written to every
    sink, then the health warnings. Rank 0 only."""
    row = train_row(step, lr, means, seconds=seconds, samples=steps * samples_per_step, routing=routing,
                    hardware=hardware, flops_per_sample=flops_per_sample, samples_per_step=samples_per_step,
                    peak_flops=peak_flops)
    fields, warnings = health.update(step, steps, routing)
    row.update(fields)
    history.append(row)
    sinks.train(row, routing)
    for line in warnings:
        sinks.line(line)


# ---- the end -----------------------------------------------------------------------------
def report_end(sinks: Sinks, cfg: TrainConfig, result: TrainResult, *, checkpoint: str, plot_dir: str,
               out_dir: str, stopped_line: Optional[str]) -> None:
    """The history plot (``telemetry.plots``, appended to ``result.plots``) and the closing lines: the
    ``checkpoint``, the plots, the TensorBoard command, the zero-shot accuracy, and ``stopped_line``
    (a run stopped by a signal: how to continue). Rank 0 only."""
    if cfg.telemetry.plots and result.history:
        result.plots.append(plots.plot_history(result.history, os.path.join(plot_dir, "history.png"),
                                               title=f"{cfg.task.name}"))
    sinks.line(f"checkpoint: {os.path.abspath(checkpoint)}")
    if result.plots:
        sinks.line(f"plots: {os.path.abspath(plot_dir)} (latest: {os.path.basename(result.plots[-1])}"
                   + (f", {os.path.basename(result.plots[-2])}" if len(result.plots) > 1 else "") + ")")
    if cfg.telemetry.tensorboard:
        sinks.line(f"tensorboard: tensorboard --logdir {os.path.abspath(os.path.join(out_dir, 'tb'))}")
    acc = result.final_metrics.get("zero_shot_accuracy")
    if acc is not None:
        sinks.line(f"zero-shot accuracy: {acc:.2f}")
    if stopped_line is not None:
        sinks.line(stopped_line)
