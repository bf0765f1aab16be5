"""Mixed precision: what ``train.precision`` (fp32 | bf16 | fp16) means for every engine.

The one rule (Switch Transformer's selective precision, AMP's master weights):

- parameters, gradients and the optimizer state stay fp32 (the "master weights"): the
  model is never cast; ``torch.autocast`` runs the matmuls of the forward (and so their
  backward) in the compute dtype, bf16 or fp16;
- the router (logits, jitter, noise, softmax / sigmoid, top-k), the balancing losses and
  the task's loss reduction run in fp32, outside autocast (``fp32_region``);
- the expert MLPs, which ``F.grouped_mm`` runs outside autocast's op list, cast their rows
  and weights to the compute dtype themselves (``compute_dtype``);
- fp16 adds dynamic loss scaling (``LossScaler``): the loss is multiplied by the scale
  before the backward, the reduced gradients are unscaled before clipping, and a step
  whose global gradient norm is not finite is skipped (no optimizer update, counted)
  while the scale backs off; after ``growth_interval`` finite steps in a row it grows.

Engines add their own communication dtype on top (``describe`` says what each does):
FSDP2 gathers parameters in the compute dtype and reduce-scatters gradients in fp32
(``MixedPrecisionPolicy(param_dtype, reduce_dtype=fp32)``); DeepSpeed gets the same key
(``parallel.zero_deepspeed``); a pipeline sends the residual stream between stages in fp32,
the dtype autocast leaves it in, so every layout trains the same numbers.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, Optional

import torch

__all__ = ["PRECISIONS", "FP32", "Precision", "LossScaler", "compute_dtype", "fp32_region"]

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """``name``: "fp32", "bf16" or "fp16"; ``dtype``: the compute dtype (None for fp32)."""

    name: str = "fp32"

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise ValueError(f"train.precision: got {self.name!r}; allowed: {', '.join(PRECISIONS)}")

    @property
    def dtype(self) -> Optional[torch.dtype]:
        return _DTYPES[self.name]

    @property
    def mixed(self) -> bool:
        return self.dtype is not None

    @property
    def loss_scaling(self) -> bool:
        return self.name == "fp16"

    def autocast(self, device_type: str):
        """The forward's context: autocast to the compute dtype (nothing for fp32)."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.dtype)

    def describe(self, engine: str) -> str:
        """What this precision means on ``engine`` ("replicated", "pipeline", "fsdp2", "deepspeed")."""
        if not self.mixed:
            return f"fp32 everywhere ({engine})"
        name = self.name
        common = f"{name} autocast compute; fp32 master weights, gradients and AdamW state; router and losses fp32"
        comm = {"replicated": "gradients all-reduced in fp32",
                "pipeline": "fp32 activations between stages, gradients all-reduced in fp32",
                "fsdp2": f"FSDP2 MixedPrecisionPolicy(param_dtype={name}, reduce_dtype=fp32)",
                "deepspeed": (f"DeepSpeed torch_autocast {name} (its bf16/fp16 modes off), fp32 parameters, "
                              "gradient reduction and partitions" if name == "bf16" else
                              "DeepSpeed in fp32 (no fp16 mode of its own): losses scaled before its backward, its "
                              "reduced partitions unscaled; fp32 gradient reduction and partitions")}[engine]
        scaling = "; dynamic loss scaling (skipped steps counted)" if self.loss_scaling else ""
        return f"{common}; {comm}{scaling}"


FP32 = Precision("fp32")


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype an op outside autocast's list (grouped GEMMs) should compute ``t`` in: the autocast dtype
    when autocast is on for ``t``'s device and ``t`` is fp32, else ``t``'s own dtype."""
    device_type = t.device.type
    if t.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


@contextlib.contextmanager
def fp32_region(device_type: str) -> Iterator[None]:
    """Autocast off: what runs inside computes in the dtype of its (fp32) inputs."""
    with torch.autocast(device_type, enabled=False):
        yield


class LossScaler:
    """Dynamic loss scaling for fp16 (module doc). ``scale`` multiplies the loss before the backward;
    ``update(finite)`` after each step: a non-finite step backs the scale off by ``backoff`` (never
    below ``min_scale``) and counts a skipped step; ``growth_interval`` finite steps in a row grow it
    by ``growth``. ``state_dict`` / ``load_state_dict`` carry it through checkpoints."""

    def __init__(self, init_scale: float = 2.0 ** 16, *, growth: float = 2.0, backoff: float = 0.5,
                 growth_interval: int = 2000, min_scale: float = 1.0):
        if not (init_scale > 0 and growth > 1 and 0 < backoff < 1 and growth_interval >= 1 and min_scale > 0):
            raise ValueError(f"LossScaler: init_scale={init_scale} > 0, growth={growth} > 1, 0 < backoff={backoff} "
                             f"< 1, growth_interval={growth_interval} >= 1, min_scale={min_scale} > 0 are required")
        self.scale = float(init_scale)
        self.growth, self.backoff = growth, backoff
        self.growth_interval, self.min_scale = growth_interval, min_scale
        self.good_steps = 0
        self.skipped_steps = 0

    def update(self, finite: bool) -> bool:
        """Record one step; returns True when the step must be skipped (its gradients were not finite)."""
        if not finite:
            self.scale = max(self.min_scale, self.scale * self.backoff)
            self.good_steps = 0
            self.skipped_steps += 1
            return True
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth
            self.good_steps = 0
        return False

    def state_dict(self) -> Dict[str, float]:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.skipped_steps = int(state["skipped_steps"])
