"""The seam between the training loop and the parallel engines.

The loop calls only an engine's verbs, whatever the layout underneath:

- ``forward_backward(num_micro, loss_fn)``: zero the gradients, run ``loss_fn(m)`` for
  the step's micro-batches m = 0..num_micro-1 on this rank, back-propagate each loss
  divided by ``num_micro``, and leave the reduced gradient of the global-batch mean
  loss in ``.grad``; returns each micro-batch's logs.
- ``clip_grad_norm(max_norm)``: the global gradient norm (every parameter counted once,
  whichever rank holds it), after clipping to ``max_norm`` when it is exceeded.
- ``step(lr)``: one optimizer step at learning rate ``lr``.
- ``model`` / ``optimizer``: what checkpoints save and load (through ``checkpoint_optimizer``).
- ``memory()``: bytes of parameters, gradients and optimizer state this rank holds.

Mixed precision (``parallel.precision``): the forward runs under the engine's
``precision.autocast`` (the loop's ``loss_fn`` for these engines, the schedule for a
pipeline); with fp16 loss scaling the loop sets ``loss_scale`` before ``forward_backward``
(every micro-batch loss is multiplied by it before its backward), then calls
``unscale_grads(1 / loss_scale)`` before ``clip_grad_norm``, and ``skip_step()`` instead of
``step`` when the global norm is not finite.

``ReplicatedEngine`` is data + expert parallelism with a replicated optimizer (ZeRO
stage 0): dense gradients averaged over the data-parallel group, expert gradients
over the expert-data-parallel group (``parallel.grads``). ``parallel.pipeline.
PipelineEngine`` has the same verbs, except that a pipeline splits the forward, so its
``forward_backward(num_micro, micro)`` takes ``micro(m) -> (micro-batch m, its seed)``
and runs the task's pieces itself. The ZeRO engines (``parallel.zero_deepspeed``,
``parallel.zero_fsdp``) implement the same verbs.

What is model- or trainer-specific is injected, never imported: the optimizer as
``make_optimizer(model)`` (``MakeOptimizer``; the trainer's builds the job's AdamW,
``moe.trainer.optim``), a pipeline's task, FSDP2's ``parallel.sharding.ShardingPlan``.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .checks import check_int
from .dims import ProcessGroups
from .grads import allreduce_gradients, clip_gradients, sync_replicas
from .optim_view import AdamView
from .precision import FP32, Precision

LossFn = Callable[[int], Tuple[torch.Tensor, Dict[str, float]]]
MakeOptimizer = Callable[[nn.Module], torch.optim.Optimizer]  # the optimizer of a model's parameters


def _local_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor on this rank (a DTensor's local shard)."""
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


class EngineBase:
    """The verbs every engine shares once ``.grad`` holds the reduced gradient: ``clip_grad_norm`` and ``step``
    (a subclass sets ``model``, ``groups`` and ``optimizer``)."""

    model: nn.Module
    groups: ProcessGroups
    optimizer: torch.optim.Optimizer
    precision: Precision = FP32
    loss_scale: float = 1.0  # fp16: the loss scaler's scale for the next forward_backward
    _adam_view: Optional[AdamView] = None  # checkpoint_optimizer's view until after_checkpoint_load

    def accumulate(self, num_micro: int, loss_fn: LossFn) -> List[Dict[str, float]]:
        """Zero the gradients, then back-propagate ``loss_fn(m) / num_micro`` for every micro-batch m on this
        rank (the gradients add up); returns each micro-batch's logs. The reduction over ranks is the caller's."""
        check_int("num_micro", num_micro, minimum=1)
        self.optimizer.zero_grad(set_to_none=True)
        logs = []
        for m in range(num_micro):
            loss, micro_logs = loss_fn(m)
            scaled = loss if self.loss_scale == 1.0 else loss * self.loss_scale  # fp16: a power of two, exact
            (scaled / num_micro).backward()
            logs.append(micro_logs)
        return logs

    def clip_grad_norm(self, max_norm: Optional[float]) -> float:
        return clip_gradients(self.model, max_norm, self.groups)

    @torch.no_grad()
    def unscale_grads(self, factor: float) -> None:
        """Multiply every gradient this rank holds by ``factor`` (fp16: ``1 / loss_scale``, after the reduction)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor)

    def skip_step(self) -> None:
        """The step whose gradients were not finite (fp16 overflow): drop them, leave the parameters
        and the optimizer state as they are."""
        self.optimizer.zero_grad(set_to_none=True)

    def memory(self) -> Dict[str, int]:
        """Bytes this rank holds of parameters, gradients and optimizer state, from the live tensors
        (a DTensor counts its local shard). ZeRO engines that keep gradients or state in their own
        buffers override it."""
        return {"params": sum(_local_bytes(p) for p in self.model.parameters()),
                "grads": sum(_local_bytes(p.grad) for p in self.model.parameters() if p.grad is not None),
                "optimizer": sum(_local_bytes(v) for state in self.optimizer.state.values() for v in state.values()
                                 if isinstance(v, torch.Tensor))}

    def checkpoint_optimizer(self) -> torch.optim.Optimizer:
        """What checkpoints save and load as the optimizer state: an Adam/AdamW-like object whose
        ``param_groups`` hold the model's parameters and whose ``state[p]`` holds that parameter's
        ``step`` / ``exp_avg`` / ``exp_avg_sq`` (``moe.trainer.checkpoint``). Here the optimizer itself;
        an engine that keeps the state elsewhere (flat ZeRO partitions) returns a per-parameter view, and
        so does this one for an optimizer that keeps ``step`` per group (apex FusedAdam: ``parallel.optim_view``)."""
        if isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            return self.optimizer
        self._adam_view = AdamView(self.optimizer)
        return self._adam_view.view()

    def after_checkpoint_load(self) -> None:
        """Called after a checkpoint was loaded into ``checkpoint_optimizer()`` (and the model): an engine
        with a view pushes the loaded state into its own buffers."""
        view, self._adam_view = self._adam_view, None
        if view is not None:
            view.push()

    def step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()


class LossEngine(EngineBase):
    """An engine that runs the loop's ``loss_fn(m)`` itself for every micro-batch m: the replicated
    and the ZeRO engines (``parallel.pipeline.PipelineEngine`` splits the forward and takes the
    micro-batch inputs instead)."""

    def forward_backward(self, num_micro: int, loss_fn: LossFn) -> List[Dict[str, float]]:
        """Back-propagate ``loss_fn(m) / num_micro`` for every micro-batch m and leave the reduced
        gradient of the global-batch mean loss in ``.grad``; returns each micro-batch's logs."""
        raise NotImplementedError


class ReplicatedEngine(LossEngine):
    """Replicated parameters and optimizer over the data-parallel ranks (see the module doc).

    ``model``: the rank's model (expert parameters marked by ``parallel.grads``);
    ``groups``: its ``parallel.ProcessGroups`` (world-1 groups for one process);
    ``make_optimizer``: builds the optimizer for the model's parameters.
    """

    def __init__(self, model: nn.Module, groups: ProcessGroups, make_optimizer: MakeOptimizer,
                 *, precision: Precision = FP32):
        self.model, self.groups, self.precision = model, groups, precision
        sync_replicas(model, groups)
        self.optimizer = make_optimizer(model)

    def forward_backward(self, num_micro: int, loss_fn: LossFn) -> List[Dict[str, float]]:
        logs = self.accumulate(num_micro, loss_fn)
        allreduce_gradients(self.model, self.groups)
        return logs
