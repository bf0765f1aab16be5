"""The parallel layout checked against the launch and the model, before any process group exists.

``check_layout(cfg, world_size)`` takes a validated ``TrainConfig`` and the world
size of the launch (``parallel.launch.detect_launch().world_size``) and raises
``moe.checks.ConfigError`` (one line, naming the key path and the sizes) unless

- the world size is the product of the layout: ``tp x pp`` divides it (``dp =
  world / (tp x pp)``) and ``ep x etp`` divides ``dp x tp`` (``edp = dp x tp /
  (ep x etp)``; see ``parallel.dims``);
- the model splits over it: ``model.n_heads`` divisible by ``tp`` (heads are
  split), every dense MLP width divisible by ``tp`` (``model.d_ffn`` of the dense
  blocks, and ``model.moe.d_ffn`` where ``moe.num_experts == 1`` makes the MoE
  blocks dense MLPs of that width), ``model.moe.num_experts`` divisible by ``ep``,
  ``model.moe.d_ffn`` divisible by ``etp`` (each expert's hidden units are split)
  and a hierarchical dispatcher's ``model.moe.node_size`` dividing ``ep``;
- ``parallel.sequence_parallel`` is set only with ``tp > 1``, only for the LM task,
  and the LM sequence length (``data.seq_len``, else ``model.max_seq_len``) is
  divisible by ``tp``;
- the pipeline (``pp > 1``; built-in tasks only): the blocks cut into ``pp x
  virtual_stages`` chunks (``stage_plan``: at least one block each, an explicit
  ``parallel.pp_blocks`` adding up to ``model.n_layers``, equal chunks for the
  interleaved schedule) and the schedule runs the step's micro-batches (``1f1b`` and
  ``interleaved_1f1b`` need at least ``pp`` micro-batches per data-parallel rank).

The vocabulary has no constraint: under ``tp`` the LM pads it to
``ceil(V / tp) * tp`` rows (the padding logits are masked, the padding rows never
saved). A custom ``module:function`` task gets the launch checks only (its model is
its own business). On success it returns the ``parallel.ParallelDims`` of the job.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch

from parallel.dims import ParallelDims
from parallel.pipeline import check_schedule
from parallel.stages import StagePlan, plan_stages

from parallel.checks import ConfigError, fail
from ..models import LIMoEConfig, LMConfig
from ..tasks import TASKS, LMDataConfig
from .config import TrainConfig, from_dict
from .schedule import StepSchedule

__all__ = ["check_layout", "check_world", "check_model", "check_pipeline", "stage_plan"]


def _divisors(n: int) -> str:
    return ", ".join(str(k) for k in range(1, n + 1) if n % k == 0)


def check_world(cfg: TrainConfig, world_size: int) -> ParallelDims:
    """The launch's ``world_size`` against ``parallel.tp / pp / ep / etp``; returns the ``ParallelDims``."""
    p = cfg.parallel
    if world_size % (p.tp * p.pp):
        fail("parallel.tp", p.tp, f"world size {world_size} is not equal to the product dp x tp x pp for any whole "
             f"dp: tp x pp = {p.tp} x {p.pp} = {p.tp * p.pp} must divide {world_size} "
             f"(its divisors: {_divisors(world_size)})")
    dp = world_size // (p.tp * p.pp)
    stage = dp * p.tp
    if stage % (p.ep * p.etp):
        key, value = ("parallel.ep", p.ep) if stage % p.etp == 0 else ("parallel.etp", p.etp)
        fail(key, value, f"world size {world_size} (dp={dp} x tp={p.tp} x pp={p.pp}) is not equal to the product "
             f"edp x ep x etp x pp for any whole edp: ep x etp = {p.ep} x {p.etp} = {p.ep * p.etp} must divide "
             f"dp x tp = {stage} (its divisors: {_divisors(stage)})")
    return ParallelDims(world_size=world_size, dp=dp, ep=p.ep, tp=p.tp, pp=p.pp, etp=p.etp)


def check_model(cfg: TrainConfig) -> None:
    """The model and data sections of a built-in task against ``parallel.tp / ep / etp / sequence_parallel``."""
    p = cfg.parallel
    name = cfg.task.name
    if p.sequence_parallel and name != "lm":
        fail("parallel.sequence_parallel", True, f"sequence parallelism is supported for the LM task only, "
             f"not task {name!r}; set it to false (parallel.tp works for this task without it)")
    if name not in TASKS:
        return
    model, data = TASKS[name].configs_from_dicts(cfg.model, cfg.data)
    t = model.transformer
    tp = f"parallel.tp={p.tp}"
    if t.n_heads % p.tp:
        fail("model.n_heads", t.n_heads, f"it must be divisible by {tp} (attention heads are split over the "
             "tensor-parallel ranks)")
    dense: List[int] = [i for i in range(t.n_layers) if not t.is_moe_position(i)]
    if dense and t.d_ffn % p.tp:
        fail("model.d_ffn", t.d_ffn, f"it must be divisible by {tp} (the hidden units of the dense MLP blocks "
             "are split over the tensor-parallel ranks)")
    moe = t.moe
    positions = [i for i in range(t.n_layers) if t.is_moe_position(i)]
    if moe is not None and positions and moe.num_experts == 1 and moe.d_ffn % p.tp:
        fail("model.moe.d_ffn", moe.d_ffn, f"it must be divisible by {tp} (with model.moe.num_experts=1 the MoE "
             "blocks are dense MLPs of this width, split over the tensor-parallel ranks)")
    if moe is not None and positions and moe.num_experts > 1:
        if moe.num_experts % p.ep:
            fail("model.moe.num_experts", moe.num_experts, f"it must be divisible by parallel.ep={p.ep} (each "
                 "expert-parallel rank holds num_experts / ep experts)")
        if moe.d_ffn % p.etp:
            fail("model.moe.d_ffn", moe.d_ffn, f"it must be divisible by parallel.etp={p.etp} (each expert's "
                 "hidden units are split over the expert-tensor-parallel ranks)")
        if moe.dispatcher == "hierarchical" and p.ep % moe.node_size:
            fail("model.moe.node_size", moe.node_size, f"it must divide parallel.ep={p.ep} (the hierarchical "
                 "dispatcher groups the expert-parallel ranks by node)")
    if p.sequence_parallel:
        key, seq_len = ("data.seq_len", data.seq_len) if data.seq_len is not None else \
            ("model.max_seq_len", model.max_seq_len)
        if seq_len % p.tp:
            fail(key, seq_len, f"it must be divisible by {tp} (sequence parallelism splits each sequence over "
                 "the tensor-parallel ranks)")


def stage_plan(cfg: TrainConfig) -> Optional[StagePlan]:
    """The ``parallel.stages.StagePlan`` of a built-in task's model under ``parallel.pp /
    virtual_stages / pp_blocks`` (None when pp = 1); ``ConfigError`` when the blocks do not cut so."""
    p = cfg.parallel
    if p.pp == 1:
        return None
    if cfg.task.name not in TASKS:
        fail("parallel.pp", p.pp, f"pipeline parallelism needs a built-in task ({', '.join(sorted(TASKS))}): "
             f"the pipeline stages are cut from their models; task {cfg.task.name!r} can use tp, ep and dp")
    model, data = TASKS[cfg.task.name].configs_from_dicts(cfg.model, cfg.data)
    return plan_stages(model.transformer.block_flops_per_token(_attention_len(model, data)), p.pp,
                       virtual_stages=p.virtual_stages, counts=p.pp_blocks)


def _attention_len(model: Any, data: Any) -> int:
    """How many tokens a block attends over, for the pipeline's stage costs: the LM's ``data.seq_len``
    (default ``model.max_seq_len``), LIMoE's image patches (``model.num_patches``)."""
    if isinstance(model, LMConfig) and isinstance(data, LMDataConfig):
        return data.seq_len or model.max_seq_len
    if isinstance(model, LIMoEConfig):
        return model.num_patches
    raise TypeError(f"no attention length for a {type(model).__name__} model config (built-in tasks: "
                    f"{', '.join(sorted(TASKS))})")


def check_pipeline(cfg: TrainConfig, world_size: int) -> Optional[StagePlan]:
    """The stage plan and the schedule against the micro-batches of a step; returns the plan (or None)."""
    plan = stage_plan(cfg)
    if plan is None:
        return None
    p = cfg.parallel
    steps = StepSchedule.from_config(cfg.train, world_size // (p.tp * p.pp), 0)
    problem = check_schedule(p.pp_schedule, p.pp, p.virtual_stages, steps.accumulation)
    if problem:
        fail("parallel.pp_schedule", p.pp_schedule, f"{problem}; this layout has {steps.describe()}")
    return plan


def check_layout(cfg: TrainConfig, world_size: int) -> ParallelDims:
    """Every layout check (see the module docstring); returns the job's ``parallel.ParallelDims``.

    Raises ``ConfigError`` naming the key path and the sizes; needs no process group.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world size must be an integer >= 1, got {world_size!r}")
    from_dict(cfg.to_dict())  # every field check again, for a config put together in Python
    dims = check_world(cfg, world_size)
    check_model(cfg)
    check_pipeline(cfg, world_size)
    check_precision(cfg)
    return dims


def check_precision(cfg: TrainConfig) -> None:
    """bf16 / fp16 with tensor parallelism needs CUDA: megatron-core's tensor-parallel linear layers restore only
    CUDA's autocast state in their backward (``custom_bwd(device_type="cuda")``), so under CPU autocast their
    backward multiplies a bf16 gradient by an fp32 weight and fails."""
    device = cfg.train.device
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if cfg.train.precision != "fp32" and cfg.parallel.tp > 1 and on_cpu:
        fail("train.precision", cfg.train.precision,
             f"with parallel.tp={cfg.parallel.tp} it needs GPUs: megatron-core's tensor-parallel layers restore "
             "only CUDA's autocast state in their backward; use fp32 on CPU (or tp=1)")
