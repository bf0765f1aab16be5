"""Which engine trains the job, and everything it is given: the one place the trainer builds its engine.

The engines live in ``parallel/`` and import nothing from ``moe/``; ``build_engine`` picks one
from the config and injects what is model- or trainer-specific:

- ``parallel.pp > 1``: ``parallel.pipeline.PipelineEngine`` over the task (its model built for
  this rank's stage, ``model.pipe``), with a sample micro-batch to size the stage tensors;
- ``parallel.zero_stage`` 1-3 on ``parallel.zero_engine_name``: ``deepspeed`` runs
  ``parallel.zero_deepspeed.DeepSpeedEngine`` (with ``optim.grad_clip``), ``fsdp2`` runs
  ``parallel.zero_fsdp.FSDP2Engine`` (with the model's FSDP units,
  ``moe.models.sharding.sharding_plan``);
- otherwise ``parallel.engine.ReplicatedEngine`` (ZeRO stage 0).

Every engine gets the optimizer as ``make_optimizer(model)``: the job's AdamW
(``moe.trainer.optim.build_optimizer``, weight decay on matrices only) of the implementation
``train.fused`` chose (``moe.trainer.fused``; always torch's own under ZeRO).
"""
from __future__ import annotations

from typing import Union

import torch

from parallel.dims import ProcessGroups
from parallel.engine import LossEngine, MakeOptimizer, ReplicatedEngine
from parallel.pipeline import PipelineEngine
from parallel.precision import Precision
from parallel.zero_deepspeed import DeepSpeedEngine
from parallel.zero_fsdp import FSDP2Engine

from ..models.sharding import sharding_plan
from ..models.transformer import TransformerModel
from ..tasks import ModelTask, Task
from .config import OptimConfig, TrainConfig
from .optim import build_optimizer

__all__ = ["build_engine", "optimizer_builder"]


def optimizer_builder(cfg: OptimConfig, kind: str = "torch") -> MakeOptimizer:
    """``make_optimizer(model)`` for the engines: ``build_optimizer(model, cfg, kind=kind)``."""
    return lambda model: build_optimizer(model, cfg, kind=kind)


def build_engine(cfg: TrainConfig, task: Task, groups: ProcessGroups, *, device: torch.device, precision: Precision,
                 optimizer_kind: str, num_micro: int, micro_batch_size: int) -> Union[PipelineEngine, LossEngine]:
    """The engine that trains ``task.model`` under ``cfg`` on this rank (see the module doc).

    ``optimizer_kind``: the AdamW implementation (``FusedChoice.optimizer``); ``num_micro``: the
    micro-batches per step on this rank (gradient accumulation); ``micro_batch_size``: samples per
    micro-batch. Under ``parallel.pp > 1`` the task must be a ``moe.tasks.ModelTask`` (the model inputs and
    output loss the pipeline calls) whose model is a ``TransformerModel`` built for this rank's stage (its
    ``pipe``, a ``parallel.pipeline.StageRole``).
    """
    model, p = task.model, cfg.parallel
    make_optimizer = optimizer_builder(cfg.optim, optimizer_kind)
    if groups.dims.pp > 1:
        if not isinstance(task, ModelTask) or not isinstance(model, TransformerModel) or model.pipe is None:
            raise ValueError("parallel.pp > 1 needs a task whose model was built for its pipeline stage "
                             "(moe.tasks built-in tasks)")
        sample = task.micro_batch(0, 0, micro_batch_size, seed=cfg.train.seed)
        return PipelineEngine(task, groups, model.pipe, make_optimizer, schedule=p.pp_schedule, num_micro=num_micro,
                              sample_batch=sample, device=device, precision=precision)
    if p.zero_stage > 0:
        if p.zero_engine_name == "deepspeed":
            return DeepSpeedEngine(model, groups, make_optimizer, stage=p.zero_stage, num_micro=num_micro,
                                   device=device, grad_clip=cfg.optim.grad_clip, precision=precision)
        if p.zero_engine_name == "fsdp2":
            return FSDP2Engine(model, groups, make_optimizer, sharding_plan(model), stage=p.zero_stage,
                               num_micro=num_micro, device=device, precision=precision)
        raise ValueError(f"parallel.zero_engine: {p.zero_engine_name!r} is no ZeRO engine; allowed: 'deepspeed', "
                         "'fsdp2'")
    return ReplicatedEngine(model, groups, make_optimizer, precision=precision)
