"""``eval_mode(model)``: run a block in eval mode and restore the previous mode afterwards."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ["eval_mode"]


@contextlib.contextmanager
def eval_mode(model: nn.Module, *, no_grad: bool = True) -> Iterator[nn.Module]:
    """Switch ``model`` (and its children) to eval mode for the block, without autograd when
    ``no_grad``; the previous train/eval mode of the model comes back also when the block raises.

    Only the top module's flag is remembered: a model whose children were in mixed modes
    comes back with all children in the top module's mode (what ``model.train(flag)`` does).
    """
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            yield model
    finally:
        model.train(was_training)
