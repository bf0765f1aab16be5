"""Where the trainer's numbers go: one pure formatting step, then the sinks.

- ``train_row`` / ``format_train_line`` / ``format_eval_line`` are pure functions:
  numbers in, a row dict or a console line out (tested without any file or process).
- ``Sinks`` writes a row everywhere it belongs, on rank 0 only: ``metrics.jsonl`` (train and eval rows)
  (one JSON object per line), TensorBoard (``ScalarWriter``), the progress bar's
  postfix, and the console/log function. Other ranks get a ``Sinks`` that does nothing.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch

from moe.models.flops import TRAIN_FLOPS_PER_FORWARD

from .telemetry import LayerRouting

__all__ = ["train_row", "format_train_line", "format_eval_line", "ScalarWriter", "Sinks"]

_NOT_AUX = ("loss", "grad_norm")
# Routing-health keys: shown in the console line by name (cv, idle), not as task logs.
_HEALTH = ("train/load_cv", "train/zero_weight_rate", "train/skipped_forwards", "train/idle_experts")
_THROUGHPUT = ("train/model_flops_per_step", "train/model_tflops_per_s", "train/mfu")


def train_row(step: int, lr: float, means: Mapping[str, float], *, seconds: float, samples: int,
              routing: Sequence[LayerRouting], hardware: Mapping[str, float], flops_per_sample: Optional[float] = None,
              samples_per_step: int = 0, peak_flops: Optional[float] = None) -> Dict[str, float]:
    """The metrics row of a log window: ``train/*`` means, speed, routing health and ``gpu/*`` counters.

    ``means``: per-step means over the window (``loss``, ``grad_norm``, task logs);
    ``samples``: samples trained in the window (all ranks); ``routing``: the window's
    job-wide routing counts per MoE layer. ``train/routed_tokens``: tokens the first MoE
    layer routed in the window, all ranks together, each token once (tensor-parallel
    ranks route the same tokens; they count once). With MoE layers, the mean over layers
    of ``train/load_cv`` (coefficient of variation of the kept tokens per expert) and
    ``train/zero_weight_rate`` (kept assignments with a ~zero combine weight), and
    ``train/skipped_forwards`` (layer forwards skipped for non-finite router values).

    Throughput in model FLOPs (``moe.models.flops``: training = 3 x forward, active parameters)
    when ``flops_per_sample`` (forward FLOPs of one sample) is given: ``train/model_flops_per_step``
    (``samples_per_step`` samples), ``train/model_tflops_per_s`` (all devices together) and, with
    ``peak_flops`` (FLOP/s of all devices together), ``train/mfu`` = achieved / peak.
    """
    speed = {"samples_per_s": samples / max(seconds, 1e-9)}
    tokens = routing[0].tokens if routing else 0
    if tokens:
        speed["tokens_per_s"] = tokens / max(seconds, 1e-9)
    drop = sum(r.drop_rate for r in routing) / len(routing) if routing else 0.0
    counts = {"train/routed_tokens": float(tokens)} if routing else {}
    if routing:
        counts["train/load_cv"] = sum(r.load_cv for r in routing) / len(routing)
        counts["train/zero_weight_rate"] = sum(r.zero_weight_rate for r in routing) / len(routing)
        counts["train/skipped_forwards"] = float(sum(r.skipped for r in routing))
    if flops_per_sample:
        achieved = TRAIN_FLOPS_PER_FORWARD * flops_per_sample * samples / max(seconds, 1e-9)
        counts["train/model_flops_per_step"] = float(TRAIN_FLOPS_PER_FORWARD * flops_per_sample * samples_per_step)
        counts["train/model_tflops_per_s"] = achieved / 1e12
        if peak_flops:
            counts["train/mfu"] = achieved / peak_flops
    return {"step": step, "train/lr": lr, "train/drop_rate": drop, **counts,
            **{f"train/{k}": float(v) for k, v in means.items()},
            **{f"train/{k}": v for k, v in speed.items()},
            **{f"gpu/{k}": float(v) for k, v in hardware.items()}}


def _rate(row: Mapping[str, float]) -> str:
    if "train/tokens_per_s" in row:
        return f"{row['train/tokens_per_s']:.0f} tok/s"
    return f"{row['train/samples_per_s']:.1f} samples/s"


def _aux(row: Mapping[str, float]) -> Dict[str, float]:
    skip = {f"train/{k}" for k in _NOT_AUX} | {"train/lr", "train/drop_rate", "train/samples_per_s",
                                               "train/tokens_per_s", "train/routed_tokens", *_HEALTH,
                                               *_THROUGHPUT}
    return {k[len("train/"):]: v for k, v in row.items() if k.startswith("train/") and k not in skip}


def format_train_line(row: Mapping[str, float], total_steps: int) -> str:
    """``step 4/10 | loss 1.2345 | lr 1.00e-03 | 812 tok/s | drop 0.3% | cv 0.12 | <task logs> | gpu ...``.

    ``cv``: the load coefficient of variation, when the row has MoE layers; ``idle N``
    when N experts are collapsed (``train/idle_experts`` > 0); ``mfu`` when a peak is known.
    """
    parts = [f"step {row['step']}/{total_steps}", f"loss {row['train/loss']:.4f}", f"lr {row['train/lr']:.2e}",
             _rate(row), f"drop {100 * row['train/drop_rate']:.1f}%"]
    if "train/load_cv" in row:
        parts.append(f"cv {row['train/load_cv']:.2f}")
    if row.get("train/idle_experts", 0) > 0:
        parts.append(f"idle {int(row['train/idle_experts'])}")
    if "train/mfu" in row:
        parts.append(f"mfu {100 * row['train/mfu']:.1f}%")
    parts += [f"{k} {v:.4g}" for k, v in _aux(row).items()]
    if "gpu/gpu_util_pct" in row:
        parts.append(f"gpu {row.get('gpu/gpu_util_pct', 0):.0f}% {row.get('gpu/gpu_mem_used_gb', 0):.1f}GB "
                     f"{row.get('gpu/gpu_power_w', 0):.0f}W")
    return " | ".join(parts)


def format_eval_line(step: int, metrics: Mapping[str, float]) -> str:
    """``eval @ step 8: val_loss 1.234, perplexity 3.43``."""
    return f"eval @ step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())


class ScalarWriter:
    """TensorBoard ``SummaryWriter`` on rank 0 when enabled; otherwise does nothing."""

    def __init__(self, log_dir: str, enabled: bool):
        self._w = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._w = SummaryWriter(log_dir=log_dir)

    @property
    def enabled(self) -> bool:
        return self._w is not None

    def scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        if self._w is None:
            return
        for k, v in values.items():
            self._w.add_scalar(f"{prefix}/{k}" if prefix else k, float(v), step)

    def routing(self, prefix: str, layers: Sequence[LayerRouting], step: int) -> None:
        """Per layer: drop rate, load CV, zero-weight rate, router entropy, kept tokens and load per expert."""
        if self._w is None:
            return
        for lr in layers:
            base = f"{prefix}/{lr.name}"
            self._w.add_scalar(f"{base}/drop_rate", lr.drop_rate, step)
            self._w.add_scalar(f"{base}/router_entropy", lr.entropy, step)
            self._w.add_scalar(f"{base}/load_cv", lr.load_cv, step)
            self._w.add_scalar(f"{base}/zero_weight_rate", lr.zero_weight_rate, step)
            load = lr.load
            for e in range(load.numel()):
                self._w.add_scalar(f"{base}/tokens_per_expert/e{e:03d}", int(lr.tokens_per_expert[e]), step)
            if load.numel():
                self._w.add_scalar(f"{base}/max_load_over_mean", float(load.max() * load.numel()), step)
            if lr.by_modality is not None:
                for m in range(lr.by_modality.shape[0]):
                    for e in range(lr.by_modality.shape[1]):
                        self._w.add_scalar(f"{base}/tokens_by_modality/m{m}_e{e:03d}",
                                           int(lr.by_modality[m, e]), step)

    def image(self, tag: str, path: str, step: int) -> None:
        if self._w is None:
            return
        try:
            import matplotlib.image as mpimg

            img = mpimg.imread(path)
            self._w.add_image(tag, torch.from_numpy(img[..., :3].copy()).permute(2, 0, 1), step)
        except Exception:  # noqa: BLE001 - the PNG on disk is what matters
            pass

    def flush(self) -> None:
        if self._w is not None:
            self._w.flush()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None


class Sinks:
    """Every destination of the trainer's rows and lines (all no-ops unless ``enabled``).

    ``out_dir``: where ``metrics.jsonl`` and ``tb/`` go; ``log``: the console function
    (default: ``tqdm.write`` to stdout, so lines do not break the bar); ``progress_bar``:
    show a bar on stderr when it is a terminal (plain log lines otherwise).
    """

    def __init__(self, out_dir: str, *, enabled: bool, tensorboard: bool, progress_bar: bool, total_steps: int,
                 log: Optional[Callable[[str], None]] = None):
        self.enabled, self.total_steps, self._log = enabled, total_steps, log
        self.jsonl = os.path.join(out_dir, "metrics.jsonl")
        self.writer = ScalarWriter(os.path.join(out_dir, "tb"), enabled=enabled and tensorboard)
        self._want_bar = enabled and progress_bar
        self.bar = None

    def line(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._log is not None:
            self._log(msg)
            return
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()

    def open_bar(self, initial: int) -> None:
        if self._want_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total_steps, initial=initial, desc="train", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def train(self, row: Mapping[str, float], routing: Sequence[LayerRouting]) -> None:
        """One log window: JSONL line, TensorBoard scalars and routing, bar postfix, console line."""
        if not self.enabled:
            return
        self.writer.scalars("", {k: v for k, v in row.items() if k != "step"}, int(row["step"]))
        self.writer.routing("moe", routing, int(row["step"]))
        self.writer.flush()
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(dict(row)) + "\n")
        if self.bar is not None:
            post = {"loss": f"{row['train/loss']:.4f}", "rate": _rate(row), "drop": f"{100 * row['train/drop_rate']:.1f}%"}
            post.update({k: f"{v:.3g}" for k, v in list(_aux(row).items())[:3]})
            self.bar.set_postfix(post, refresh=False)
        self.line(format_train_line(row, self.total_steps))

    def eval(self, step: int, metrics: Mapping[str, float], routing: Sequence[LayerRouting]) -> None:
        if not self.enabled:
            return
        self.writer.scalars("eval", metrics, step)
        self.writer.routing("eval_moe", routing, step)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"step": step, **{f"eval/{k}": float(v) for k, v in metrics.items()}}) + "\n")
        self.line(format_eval_line(step, metrics))

    def close(self) -> None:
        self.close_bar()
        self.writer.close()
