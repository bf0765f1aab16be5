"""``fit_batch``: a few Adam steps of a task on one batch (the "a few steps reduce the loss" tests)."""
from __future__ import annotations

from typing import Tuple

import torch


def fit_batch(task, batch: dict, steps: int, lr: float = 3e-3) -> Tuple[float, float]:
    """Train ``task.model`` with Adam on ``batch`` for ``steps`` steps; (first task loss, task loss after)."""
    opt = torch.optim.Adam(task.model.parameters(), lr=lr)
    first = None
    for _ in range(steps):
        loss, logs = task.loss(batch)
        first = logs["task_loss"] if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, task.loss(batch)[1]["task_loss"]
