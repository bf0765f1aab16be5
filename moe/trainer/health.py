"""Routing health: warning lines when a layer's routing goes bad during training.

``RoutingHealth.update`` reads each log window's job-wide routing counts (one
``LayerRouting`` per MoE layer, from ``RoutingRecorder.reduce``) and returns the
window's health numbers for the metrics row and the warning lines to print:

- an expert collapse: an expert that got no tokens for at least
  ``telemetry.idle_expert_steps`` consecutive training steps. Routing is summed per
  log window, so the streak grows by whole windows (an expert idle for a whole window
  of ``train.log_every`` steps got no token in any of them). Warned once when the
  streak reaches the limit; an expert that gets tokens again starts a new streak.
  ``train/idle_experts`` counts the experts (all layers) whose streak is at the limit.
- a drop-rate jump: a layer's drop rate rose by more than ``telemetry.drop_jump``
  (absolute: 0.1 = 10 percentage points) from its previous window.
- zero combine weights: at least ``ZERO_WEIGHT_WARN`` of a layer's kept assignments
  have a combine weight below ``moe.routing_types.ZERO_WEIGHT`` (a sigmoid router
  whose scores underflow: y ~ 0 with nothing dropped). Warned when it starts.
- skipped forwards: a layer skipped forwards in the window because its router logits
  or state (expert bias, noise logits) were not finite (``on_nonfinite='skip'``).
  Warned every window it happens.

It keeps only host-side numbers (no collective, no device sync); the trainer calls it
on rank 0.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..routing_types import ZERO_WEIGHT
from .telemetry import LayerRouting

__all__ = ["RoutingHealth", "ZERO_WEIGHT_WARN"]

# Share of a layer's kept assignments with a ~zero combine weight that earns a warning.
ZERO_WEIGHT_WARN = 0.5


def _experts(ids: Sequence[int]) -> str:
    shown = ", ".join(str(e) for e in ids[:8])
    return f"expert{'s' if len(ids) > 1 else ''} {shown}{', ...' if len(ids) > 8 else ''}"


class RoutingHealth:
    """Per-layer streaks and last drop rates across log windows (see the module doc).

    ``idle_steps``: steps without tokens that make an expert collapsed (0: no check);
    ``drop_jump``: the drop-rate rise between two windows that earns a warning (None: no check).
    """

    def __init__(self, idle_steps: int = 100, drop_jump: Optional[float] = 0.1):
        self.idle_steps, self.drop_jump = idle_steps, drop_jump
        self._idle: Dict[str, torch.Tensor] = {}  # layer -> LongTensor[E]: steps since each expert's last token
        self._drop: Dict[str, float] = {}
        self._zero_warned: Dict[str, bool] = {}

    def update(self, step: int, window_steps: int,
               layers: Sequence[LayerRouting]) -> Tuple[Dict[str, float], List[str]]:
        """One log window ending at ``step`` that ran ``window_steps`` steps: (row fields, warning lines)."""
        first = step - window_steps + 1
        span = f"steps {first}-{step}" if window_steps > 1 else f"step {step}"
        warnings: List[str] = []
        collapsed = 0
        for lr in layers:
            if lr.skipped:
                warnings.append(f"warning: layer {lr.name} skipped {lr.skipped} of {lr.forwards} forward(s) in {span}: "
                                "its router logits or state (expert bias, noise logits) are not finite "
                                "(on_nonfinite='skip'); nothing was routed through it then")
            if self.idle_steps:
                got_none = lr.tokens_per_expert == 0
                before = self._idle.get(lr.name, torch.zeros_like(lr.tokens_per_expert))
                now = torch.where(got_none, before + window_steps, torch.zeros_like(before))
                self._idle[lr.name] = now
                reached = now >= self.idle_steps
                collapsed += int(reached.sum())
                new = torch.nonzero(reached & (before < self.idle_steps)).flatten().tolist()
                if new and lr.kept:
                    top = float(lr.tokens_per_expert.max()) / float(lr.tokens_per_expert.sum())
                    warnings.append(f"warning: routing collapse in layer {lr.name}: {_experts(new)} got no tokens "
                                    f"for {int(now[new].min())} steps (up to step {step}); load CV "
                                    f"{lr.load_cv:.2f}, the busiest expert takes {100 * top:.1f}% of the "
                                    "kept assignments")
                elif new:
                    warnings.append(f"warning: layer {lr.name} routed no tokens at all for {int(now[new].min())} "
                                    f"steps (up to step {step})")
            drop = lr.drop_rate
            prev = self._drop.get(lr.name)
            if self.drop_jump is not None and prev is not None and lr.dispatched and drop - prev > self.drop_jump:
                warnings.append(f"warning: drop rate of layer {lr.name} jumped from {100 * prev:.1f}% to "
                                f"{100 * drop:.1f}% in {span} (capacity overflow: the router concentrates tokens "
                                "on fewer experts, or the capacity factor is too small)")
            if lr.dispatched:
                self._drop[lr.name] = drop
            zero = lr.zero_weight_rate >= ZERO_WEIGHT_WARN
            if zero and not self._zero_warned.get(lr.name, False):
                warnings.append(f"warning: layer {lr.name}: {100 * lr.zero_weight_rate:.1f}% of its kept assignments "
                                f"in {span} have a combine weight below {ZERO_WEIGHT:g}, so its output is ~0 with "
                                "nothing dropped (a sigmoid router whose scores underflow does this)")
            self._zero_warned[lr.name] = zero
        fields = {"train/idle_experts": float(collapsed)} if self.idle_steps and layers else {}
        return fields, warnings
