"""Activation checkpointing (``train.activation_checkpointing: none | moe | block``) that replays routing.

Checkpointing keeps only the inputs of a region in the forward and runs the region again in
the backward to get back the tensors its gradient needs. That is exact only if the second
run computes what the first one did. An MoE layer is where that goes wrong in other
frameworks: its forward draws random numbers (GShard's random second expert, noisy top-k
noise, Switch jitter, the ``random`` drop policy) and changes state (the expert-bias load and,
in library use, the bias itself; ``last_routing`` and the other statistics). A recompute that
routes differently sends tokens to other experts than the gradient of the first forward
assumes: wrong gradients, shape mismatches, or NaNs.

How this module makes the recompute change nothing:

- ``checkpoint(fn, *args)`` runs ``fn`` under ``torch.utils.checkpoint.checkpoint``
  (``use_reentrant=False``, ``preserve_rng_state=True``, ``early_stop=False``) with a
  ``Tape`` of its own. The first call of ``fn`` (the forward) records on the tape; every
  later call (a recompute in the backward) replays from it.
- Each MoE layer that routes inside the region routes through ``Router.route_on_tape``
  (``moe.router``), which writes one ``RouteRecord`` per forward: the state of the random
  generators the router draws from (the ``generator`` it was given, and torch's global CPU
  RNG, which routing uses without one), a copy of the expert bias it routed with, and the
  decisions it took (experts, GShard's dispatched mask, slot positions, hence kept/dropped).
  In the recompute it reads its record back, routes again from those generator states and
  that bias (the caller's generator is put back as it was afterwards), and checks that the
  decisions are the recorded ones, raising ``RuntimeError`` if not (never a silent wrong
  gradient). The differentiable part of the routing (logits, weights,
  probs, the noisy top-k load) is thus recomputed from the same random draws, so its gradient
  is the one without checkpointing, bit for bit. (Reusing the forward's Routing tensors instead
  would not do: their autograd graph is the one checkpointing frees, and the jitter and noise
  values enter the gradient, so they must be drawn again, identically.)
- The layer's side effects happen in the first forward only: the expert-bias load (and a
  non-deferred bias update), ``last_routing`` and the exchange byte counts; forward hooks that
  count (the trainer's routing telemetry) skip a recompute (``is_recomputing``). The recompute
  also leaves ``Experts.last_rows`` and the dispatcher's statistics as the latest forward set
  them (under pipelining other micro-batches ran in between).
- Everything else random in a block (dropout, the tensor-parallel per-rank forks seeded from
  the global RNG) is replayed by ``preserve_rng_state``.
- ``early_stop=False``: the recompute always runs the whole region, so under expert
  parallelism every rank replays every all-to-all of the region, in the order of the first
  forward (ranks backpropagate their layers in the same order).

Modes (``MODES``: ``moe`` checkpoints every MoE layer, ``block`` every transformer block) are
turned on by ``moe.models.activation_checkpointing.apply_activation_checkpointing(model, mode)``,
which walks the model's blocks and MoE layers and sets their ``recompute`` flag; this module is
a leaf below the layer and the models.

Without gradients (evaluation, ``torch.no_grad``) nothing is checkpointed. ``torch.compile``
(``moe.models.compile_blocks``, ``train.compile``) together with checkpointing is refused.
"""
from __future__ import annotations

import contextvars
from typing import Any, Callable, List, Optional

import torch
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

__all__ = ["MODES", "Tape", "checkpoint", "current_tape", "is_recomputing"]

MODES = ("none", "moe", "block")

_TAPE: contextvars.ContextVar = contextvars.ContextVar("recompute_tape", default=None)


class Tape:
    """The routing records of one checkpointed region: written by its forward, read by its recomputes.

    A record is whatever its writer needs to replay (``moe.router.RouteRecord``); it names its
    writer in ``record.layer``, which the recompute's ``next`` checks.
    """

    def __init__(self) -> None:
        self.records: List[Any] = []
        self.calls = 0  # completed or running calls of the region's function
        self.cursor = 0

    @property
    def replaying(self) -> bool:
        """True while the region runs again in the backward (its second and later calls)."""
        return self.calls > 1

    def add(self, record: Any) -> None:
        self.records.append(record)

    def next(self, layer: str) -> Any:
        """The next record of the recompute, which must belong to ``layer``."""
        if self.cursor >= len(self.records):
            raise RuntimeError(f"{layer}: activation checkpointing recomputed more MoE routings than the first "
                               f"forward made ({len(self.records)}); the checkpointed region is not deterministic")
        record = self.records[self.cursor]
        if record.layer != layer:
            raise RuntimeError(f"{layer}: activation checkpointing recomputed the layers in another order than the "
                               f"first forward (expected {record.layer} here)")
        self.cursor += 1
        return record


def current_tape() -> Optional[Tape]:
    """The tape of the checkpointed region running now (None outside any, and inside ``torch.compile``,
    which cannot trace a context variable; the trainer refuses compile with checkpointing)."""
    if torch.compiler.is_compiling():
        return None
    return _TAPE.get()


def is_recomputing() -> bool:
    """True while a checkpointed region runs again in the backward: forward hooks that count
    (``moe.trainer.telemetry.RoutingRecorder``) skip it, the forward already counted."""
    tape = current_tape()
    return tape is not None and tape.replaying


def checkpoint(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, checkpointed with a routing tape (module doc); plain without gradients."""
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    tape = Tape()

    def region(*a, **kw):
        tape.calls += 1
        tape.cursor = 0
        token = _TAPE.set(tape)
        try:
            out = fn(*a, **kw)
        finally:
            _TAPE.reset(token)
        if tape.replaying and tape.cursor != len(tape.records):
            raise RuntimeError(f"activation checkpointing: the recompute routed {tape.cursor} MoE layer(s), the "
                               f"first forward {len(tape.records)}; the checkpointed region is not deterministic")
        return out

    return _torch_checkpoint(region, *args, use_reentrant=False, preserve_rng_state=True, early_stop=False,
                             **kwargs)
