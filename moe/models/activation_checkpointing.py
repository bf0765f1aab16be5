"""Turning activation checkpointing on in a model: which blocks and MoE layers recompute in the backward.

``moe.recompute`` is the mechanism (a checkpointed region with a routing tape, replayed bit for
bit); this module is the plan: it walks a model's transformer ``Block`` s and ``moe.MoELayer`` s
and sets their ``recompute`` flag for ``train.activation_checkpointing`` (``moe.recompute.MODES``):

- ``moe``: every MoE layer checkpoints router + dispatch + experts + combine (its shared expert
  and aux losses too); attention and the dense MLPs keep their activations.
- ``block``: every transformer block checkpoints ``Block.forward`` whole; a model that calls the
  two halves itself (LIMoE) gets each half checkpointed instead.
- ``none``: off.
"""
from __future__ import annotations

from torch import nn

from ..layer import MoELayer
from ..recompute import MODES
from .transformer import Block

__all__ = ["apply_activation_checkpointing"]


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Turn on checkpointing ``mode`` (one of ``moe.recompute.MODES``) in ``model`` (in place; returns it).

    ``moe``: every ``moe.MoELayer`` in ``model`` (a bare layer too). ``block``: every transformer
    ``Block`` (``moe.models.transformer``); a model without blocks is refused. ``none`` turns it
    off. Call it once after building the model, before ``torch.compile`` would be (the trainer
    refuses ``train.compile`` with checkpointing).
    """
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is not allowed; choose one of "
                         f"{', '.join(map(repr, MODES))}")
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if mode == "block" and not blocks:
        raise ValueError(f"activation checkpointing 'block' needs transformer blocks (moe.models.transformer.Block); "
                         f"{type(model).__name__} has none (use 'moe' for MoE layers)")
    if mode != "none" and any("attend" in vars(b) or "feed_forward" in vars(b) for b in blocks):
        raise ValueError(f"activation checkpointing {mode!r}: the blocks of {type(model).__name__} are compiled "
                         "(moe.models.compile_blocks); torch.compile with checkpointing is not supported")
    for block in blocks:
        block.recompute = mode == "block"
    for layer in layers:
        layer.recompute = mode == "moe"
    return model
