"""Routing statistics, GPU counters and TensorBoard for the trainer.

Legend: E experts (global), M modalities; one record per MoE layer.

- ``RoutingRecorder`` hooks every MoE layer and adds up, between two ``reduce``
  calls, what each forward routed (read from ``layer.last_routing``, on its device,
  so there is no host sync per step): kept tokens per expert [E], kept tokens per
  expert per modality [M, E] (when the task passes modality ids), dispatched and
  kept assignments (drop rate), kept assignments with a ~zero combine weight, router
  entropy, skipped forwards (non-finite router values under ``on_nonfinite='skip'``)
  and all-to-all bytes. ``reduce``
  sums those over the data-parallel group (every rank routes its own tokens, so
  this is the job-wide count, expert-parallel ranks included) and returns one
  ``LayerRouting`` per layer.
- ``GPUMonitor`` reads utilisation, memory and power through NVML (nvidia-ml-py)
  when this process trains on a CUDA GPU; elsewhere it is off and says so once.
- ``all_reduce_mean`` averages logged floats over a group.

Where the numbers go (JSONL, TensorBoard, the console) is ``moe.trainer.sinks``.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from moe.layer import MoELayer
from moe.recompute import is_recomputing


@dataclass
class LayerRouting:
    """Job-wide routing counts of one MoE layer over an interval."""

    name: str
    tokens_per_expert: torch.Tensor  # LongTensor[E], kept assignments
    by_modality: Optional[torch.Tensor]  # LongTensor[M, E] or None
    dispatched: int
    kept: int
    entropy: float  # mean router entropy over the forwards seen
    bytes_sent: int
    forwards: int
    tokens: int  # tokens the layer's routers saw (each counted once, whatever k)
    zero_weight: int = 0  # kept assignments whose combine weight is below moe.routing_types.ZERO_WEIGHT
    skipped: int = 0  # forwards skipped for non-finite router values (on_nonfinite='skip')

    @property
    def drop_rate(self) -> float:
        return 0.0 if self.dispatched == 0 else 1.0 - self.kept / self.dispatched

    @property
    def zero_weight_rate(self) -> float:
        """Fraction of kept assignments with a ~zero combine weight (computed, adding ~nothing to y)."""
        return 0.0 if self.kept == 0 else self.zero_weight / self.kept

    @property
    def load_cv(self) -> float:
        """Coefficient of variation (population std / mean) of the kept tokens per expert.

        0 at perfect balance, sqrt(E - 1) when one expert takes everything; 0 when
        nothing was kept.
        """
        t = self.tokens_per_expert.double()
        mean = float(t.mean()) if t.numel() else 0.0
        return 0.0 if mean == 0.0 else float(((t - mean) ** 2).mean().sqrt()) / mean

    @property
    def load(self) -> torch.Tensor:
        """Fraction of kept assignments per expert [E] (zeros when nothing was routed)."""
        total = self.tokens_per_expert.sum()
        return self.tokens_per_expert.double() / total if total > 0 else self.tokens_per_expert.double()


class _LayerAccumulator:
    """Running sums for one layer. Device-side counts stay on the routing's device
    (no host sync per forward); host-known numbers (token counts, bytes) are ints."""

    def __init__(self, num_experts: int, num_modalities: int):
        self.E, self.M = num_experts, num_modalities
        self.reset()

    def reset(self) -> None:
        # [E kept per expert | M*E kept per (modality, expert) | dispatched, kept, entropy sum, zero weight]
        self.sums: Optional[torch.Tensor] = None
        self.has_mod = False
        self.bytes = self.forwards = self.seen = self.skipped = 0

    @torch.no_grad()
    def add(self, layer: MoELayer) -> None:
        routing = layer.last_routing
        if routing is None:
            return
        E, M = self.E, self.M
        if self.sums is None:
            self.sums = torch.zeros(E + M * E + 4, dtype=torch.float64, device=routing.experts.device)
        s = self.sums
        s[:E] += routing.tokens_per_expert.to(s.device, torch.float64)
        by_modality = routing.tokens_by_modality(M)
        if by_modality is not None:
            s[E: E + M * E] += by_modality.reshape(-1).to(s.device, torch.float64)
            self.has_mod = True
        s[E + M * E] += routing.dispatched.sum()
        s[E + M * E + 1] += routing.kept.sum()
        s[E + M * E + 2] += routing.entropy().to(s.device, torch.float64)
        s[E + M * E + 3] += routing.zero_weight_count().to(s.device, torch.float64)
        if layer.dispatcher is not None:
            self.bytes += int(layer.dispatcher.bytes_sent)
        self.forwards += 1
        self.seen += routing.num_tokens
        self.skipped += int(routing.skipped)

    def pack(self) -> torch.Tensor:
        E, M = self.E, self.M
        sums = self.sums.cpu() if self.sums is not None else torch.zeros(E + M * E + 4, dtype=torch.float64)
        host = torch.tensor([float(self.has_mod), self.bytes, self.forwards, self.seen, self.skipped],
                            dtype=torch.float64)
        return torch.cat([sums, host])

    def unpack(self, name: str, flat: torch.Tensor) -> LayerRouting:
        E, M = self.E, self.M
        tokens = flat[:E].round().long()
        by_mod = flat[E: E + M * E].round().long().view(M, E)
        dispatched, kept, entropy, zero, has_mod, nbytes, forwards, seen, skipped = flat[E + M * E:].tolist()
        return LayerRouting(name, tokens, by_mod if has_mod > 0 else None, int(round(dispatched)),
                            int(round(kept)), entropy / forwards if forwards else 0.0, int(nbytes), int(forwards),
                            int(round(seen)), zero_weight=int(round(zero)), skipped=int(round(skipped)))


class RoutingRecorder:
    """Adds up each MoE layer's routing after every forward (see module doc)."""

    def __init__(self, layers: Sequence[MoELayer], names: Optional[Sequence[str]] = None, *,
                 training: Optional[bool] = None):
        """``training``: count only forwards in train mode (True), eval mode (False) or both (None)."""
        self.layers = list(layers)
        self.training = training
        self.names = list(names) if names is not None else [f"moe{i}" for i in range(len(self.layers))]
        if len(self.names) != len(self.layers):
            raise ValueError(f"RoutingRecorder: {len(self.names)} names for {len(self.layers)} layers")
        self.acc = [_LayerAccumulator(layer.config.num_experts, max(1, layer.config.num_modalities))
                    for layer in self.layers]
        self.enabled = True
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(module, args, output):
            # a block recomputed in the backward (activation checkpointing) was counted in its forward
            if self.enabled and (self.training is None or module.training == self.training) and not is_recomputing():
                self.acc[i].add(module)
        return hook

    def reset(self) -> None:
        for a in self.acc:
            a.reset()

    def reduce(self, group=None, *, reset: bool = True) -> List[LayerRouting]:
        """Sum every rank's counts over ``group`` (collective: all its ranks call it)."""
        if not self.layers:
            return []
        packed = [a.pack() for a in self.acc]
        flat = torch.cat(packed)
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            device = _collective_device(group)
            buf = flat.to(device)
            dist.all_reduce(buf, group=group)
            flat = buf.cpu()
        out, offset = [], 0
        for name, a, p in zip(self.names, self.acc, packed):
            out.append(a.unpack(name, flat[offset: offset + p.numel()]))
            offset += p.numel()
        if reset:
            self.reset()
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _collective_device(group=None) -> torch.device:
    """NCCL needs CUDA tensors; gloo takes CPU ones."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(values: Dict[str, float], group=None) -> Dict[str, float]:
    """Average a dict of floats over ``group`` (same keys on every rank, in any order)."""
    if not values or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device(group))
    dist.all_reduce(t, group=group)
    t /= dist.get_world_size(group)
    return dict(zip(keys, t.cpu().tolist()))


# --------------------------------------------------------------------------------------
# Dense bf16 tensor-core peaks per device in TFLOP/s (vendor datasheets; sparsity not counted),
# matched against the NVML device name: the first key contained in it wins (most specific first).
PEAK_BF16_TFLOPS = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0), ("GH200", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("A10G", 70.0), ("A10", 125.0), ("A6000", 155.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0),
    ("V100", 125.0),  # fp16 tensor cores (V100 has no bf16)
)


def peak_tflops_for(device_name: Optional[str]) -> Optional[float]:
    """The dense bf16 peak (TFLOP/s) of a GPU named ``device_name`` (NVML's name), or None if unknown."""
    if not device_name:
        return None
    name = device_name.upper()
    for key, peak in PEAK_BF16_TFLOPS:
        if key.upper() in name:
            return peak
    return None


class GPUMonitor:
    """NVML counters of this process's GPU; ``available`` False on CPU (with ``reason``)."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.available, self.reason, self._handle = False, "", None
        self._nvml: Optional[ModuleType] = None  # pynvml, once NVML is initialised
        if not enabled:
            self.reason = "disabled in the config (telemetry.gpu_stats: false)"
            return
        if device.type != "cuda":
            self.reason = "training on CPU, no CUDA GPU in use"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            # NVML counts physical GPUs; honour CUDA_VISIBLE_DEVICES when it lists plain indices.
            visible = [v for v in __import__("os").environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
            if visible and all(v.strip().isdigit() for v in visible) and index < len(visible):
                index = int(visible[index])
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
            self.available = True
        except Exception as e:  # noqa: BLE001 - missing library / driver: telemetry just goes off
            self.reason = f"NVML unavailable ({type(e).__name__}: {e})"

    def _live(self) -> Optional[ModuleType]:
        """pynvml while the counters are on (``available``), else None."""
        return self._nvml if self.available else None

    @property
    def name(self) -> Optional[str]:
        """NVML's name of this GPU (e.g. "NVIDIA H100 80GB HBM3"), or None when off."""
        nvml = self._live()
        if nvml is None:
            return None
        try:
            name = nvml.nvmlDeviceGetName(self._handle)
        except Exception:  # noqa: BLE001
            return None
        return name.decode() if isinstance(name, bytes) else str(name)

    def read(self) -> Dict[str, float]:
        """{gpu_util_pct, gpu_mem_used_gb, gpu_mem_total_gb, gpu_power_w} or {} when off."""
        n = self._live()
        if n is None:
            return {}
        h, out = self._handle, {}
        try:
            out["gpu_util_pct"] = float(n.nvmlDeviceGetUtilizationRates(h).gpu)
            mem = n.nvmlDeviceGetMemoryInfo(h)
            out["gpu_mem_used_gb"] = mem.used / 2**30
            out["gpu_mem_total_gb"] = mem.total / 2**30
            out["gpu_power_w"] = n.nvmlDeviceGetPowerUsage(h) / 1000.0
        except Exception:  # noqa: BLE001 - a counter this GPU does not expose
            pass
        return out

    def close(self) -> None:
        nvml = self._live()
        if nvml is not None:
            try:
                nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
            self.available = False
