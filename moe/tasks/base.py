"""The contract between a training task and the trainer.

A task owns its model and data. The trainer only calls:

- ``task.micro_batch(step, start, count, *, seed)``: a batch dict (tensors already
  on the task's device) holding samples ``start .. start + count - 1`` of the GLOBAL
  batch of optimizer step ``step``. Sample j of step s depends only on
  ``(seed, s, j)``: not on the rank, the data-parallel size or the micro-batch size,
  so every layout trains on the same global batch (the trainer gives each
  data-parallel rank its contiguous slice, cut into micro-batches), and a resumed
  run continues the very same stream.
- ``task.loss(batch) -> (total, logs)``: ``total`` = task loss + the sum of every MoE
  aux loss (already weighted by its coefficient); ``logs`` maps ``"loss"``,
  ``"task_loss"`` and each aux-loss name (summed over layers) to floats.
- ``task.evaluate(max_batches=None) -> {name: float}``: deterministic; every rank
  calls it (an expert-parallel forward needs all ranks of the EP group) and it runs
  on the local model. LM: ``val_loss``, ``perplexity``; LIMoE:
  ``zero_shot_accuracy``, ``val_contrastive_loss`` (+ a few extra keys).
- ``task.moe_layers()``: the model's ``moe.MoELayer`` s, for telemetry.

A ``ModelTask`` also splits ``loss`` for pipeline parallelism (``parallel.pipeline``):
``model_inputs(batch)`` (the model's positional inputs) and ``output_loss(outputs,
batch)`` (the task loss of the model's outputs, without the aux losses). Built with
``pipeline=`` (a ``parallel.stages.StagePlan`` with pp > 1) its model holds only this
rank's stage.

``moe.tasks.TASKS`` maps each task name to its class; ``moe.tasks.build_task(name,
model_cfg, data_cfg, groups=None, device="cpu")`` builds one from plain YAML dicts.
A ``ModelTask`` subclass validates both sections without building anything
(``configs_from_dicts``); a bad value raises ``moe.checks.ConfigError`` naming the
key path (``model.moe.router.top_k``, ``data.seq_len``). ``groups`` (a
``parallel.ProcessGroups``, or anything with ``ep_group`` and ``dp_group``
attributes) supplies the groups handed to every MoE layer. This module imports
none of the task classes.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Protocol, Tuple, Type, runtime_checkable

import torch

from ..config_build import FromDict
from parallel.checks import check_int
from parallel.dims import ProcessGroups
from parallel.pipeline import StageRole
from parallel.precision import fp32_region
from parallel.rng import sample_rng  # the task authors' name for it (CONTRIBUTING, "Adding a task")
from parallel.stages import StagePlan
from parallel.tensor import TensorParallel

from ..models.presets import resolve_model_config

__all__ = ["Task", "ModelTask", "DataConfig", "sample_rng", "loss_logs"]


@runtime_checkable
class Task(Protocol):
    model: torch.nn.Module

    def micro_batch(self, step: int, start: int, count: int, *, seed: int) -> dict: ...

    def loss(self, batch: dict) -> Tuple[torch.Tensor, Dict[str, float]]: ...

    def evaluate(self, *, max_batches: Optional[int] = None) -> Dict[str, float]: ...

    def moe_layers(self) -> list: ...


class DataConfig(FromDict):
    """Base of a task's ``data`` section dataclass: ``from_dict(d)`` reads the YAML ``data``
    section (``moe.config_build``), errors naming ``data.<key>``."""

    DICT_PATH = "data"


class ModelTask:
    """What the built-in tasks share: their configs, device and model, ``from_dicts`` and ``moe_layers``.

    A subclass sets ``name`` (its preset task), ``config_cls``, ``data_config_cls`` and ``model_cls``,
    and defines ``make_batch(step, indices, *, seed)``: the batch of those sample indices of
    step ``step``'s global batch, each drawn with ``sample_rng(seed, step, index, salt)`` (``parallel.rng``).
    """

    name: str
    config_cls: Type[FromDict]  # the model section's config (a ``moe.models.transformer.FlatModelConfig``)
    data_config_cls: Type[DataConfig]
    model_cls: type

    def __init__(self, model_config, data_config, *, groups: Optional[ProcessGroups] = None, device="cpu",
                 pipeline: Optional[StagePlan] = None):
        self.model_config, self.data_config = model_config, data_config
        self.device = torch.device(device)
        pipe = None
        if pipeline is not None and pipeline.pp > 1:
            if groups is None or groups.dims.pp != pipeline.pp:
                raise ValueError(f"pipeline: a plan for pp={pipeline.pp} needs ProcessGroups with that pp size")
            pipe = StageRole.from_groups(pipeline, groups)
        extra = {"pipe": pipe} if pipe is not None else {}
        self.model = self.model_cls(model_config, ep_group=getattr(groups, "ep_group", None),
                                    dp_group=getattr(groups, "dp_group", None),
                                    tp=TensorParallel.from_groups(groups),
                                    group_timeout=getattr(groups, "timeout", None), **extra).to(self.device)

    @classmethod
    def configs_from_dicts(cls, model_cfg: Optional[Mapping[str, Any]], data_cfg: Optional[Mapping[str, Any]]):
        """Validate the ``model`` (preset resolved) and ``data`` YAML sections: ``(model_config, data_config)``.

        Builds no weights and reads no data; every problem is a ``ConfigError`` naming its key path.
        """
        resolved = resolve_model_config({} if model_cfg is None else model_cfg, task=cls.name)
        model = cls.config_cls.from_dict(resolved, "model")
        data = cls.data_config_cls.from_dict({} if data_cfg is None else data_cfg, "data")
        cls.check_configs(model, data)
        return model, data

    @classmethod
    def check_configs(cls, model_config, data_config) -> None:
        """Checks across the two sections (a subclass adds its own); raise ``ConfigError``."""

    @classmethod
    def from_dicts(cls, model_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any], *,
                   groups: Optional[ProcessGroups] = None, device="cpu", pipeline: Optional[StagePlan] = None):
        model, data = cls.configs_from_dicts(model_cfg, data_cfg)
        return cls(model, data, groups=groups, device=device, pipeline=pipeline)

    def moe_layers(self) -> list:
        return self.model.moe_layers()

    def flops_per_sample(self) -> int:
        """Forward model FLOPs of one training sample: the model config's ``flops_per_sample``
        (``moe.models.flops``)."""
        return self.model_config.flops_per_sample()

    def model_inputs(self, batch: dict) -> tuple:
        """The model's positional inputs taken from a batch."""
        raise NotImplementedError

    def output_loss(self, outputs: tuple, batch: dict) -> Tuple[torch.Tensor, Dict[str, float]]:
        """(task loss, extra float logs) of the model's outputs (``model.run_pieces``) on a batch."""
        raise NotImplementedError

    def fp32_output_loss(self, outputs: tuple, batch: dict) -> Tuple[torch.Tensor, Dict[str, float]]:
        """``output_loss`` in fp32 whatever the precision: floating outputs cast to fp32, autocast off
        (under bf16/fp16 the loss and its reductions stay fp32, ``parallel.precision``)."""
        cast = tuple(o.float() if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in outputs)
        device_type = next((o.device.type for o in cast if isinstance(o, torch.Tensor)), "cpu")
        with fp32_region(device_type):
            return self.output_loss(cast, batch)

    def loss(self, batch: dict) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Task loss + every aux loss, and the logs (see ``Task``)."""
        outputs, aux = self.model.run_pieces(*self.model_inputs(batch))
        task_loss, extra = self.fp32_output_loss(outputs, batch)
        total, logs = loss_logs(task_loss, aux)
        logs.update(extra)
        return total, logs

    def micro_batch(self, step: int, start: int, count: int, *, seed: int) -> dict:
        """Samples ``start .. start + count - 1`` of the global batch of ``step`` (see ``Task``)."""
        check_micro_batch_args(step, start, count, seed)
        return self.make_batch(step, range(start, start + count), seed=seed)

    def make_batch(self, step: int, indices: range, *, seed: int) -> Dict[str, torch.Tensor]:
        """The batch of the samples ``indices`` of step ``step``'s global batch (the subclass's; class doc)."""
        raise NotImplementedError


def check_micro_batch_args(step: int, start: int, count: int, seed: int) -> None:
    for name, value, lo in (("step", step, 0), ("start", start, 0), ("count", count, 1), ("seed", seed, 0)):
        check_int(name, value, minimum=lo)


def loss_logs(task_loss: torch.Tensor, aux: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
    """``total = task_loss + sum(aux)`` and the float logs ``{"loss", "task_loss", <aux names>}``."""
    total = task_loss
    logs: Dict[str, float] = {"task_loss": float(task_loss.detach())}
    for name, value in aux.items():
        total = total + value
        logs[name] = float(value.detach())
    logs["loss"] = float(total.detach())
    return total, logs
