"""Training configuration: YAML validated into typed dataclasses.

A config file has these sections (every one optional except ``task`` and
``model``; ``python -m moe.train --print-config`` shows the defaults)::

    task: limoe                # or {name: limoe}; "lm", or "package.module:function" for your own task
    model: {preset: tiny_limoe}   # the task's model config (a preset + overrides, or every key)
    data: {}                      # the task's data config
    parallel: {ep: 2, tp: 1, pp: 1, etp: 1, sequence_parallel: false, pp_schedule: 1f1b, virtual_stages: 1,
               pp_blocks: null, zero_stage: 0, zero_engine: auto, backend: auto, timeout_s: 600}
    optim: {lr: 1.0e-3, weight_decay: 0.01, betas: [0.9, 0.95], eps: 1.0e-8,
            warmup_steps: 10, schedule: cosine, min_lr_ratio: 0.1, grad_clip: 1.0}
    train: {steps: 100, global_batch_size: 16, micro_batch_size: null, seed: 0, log_every: 10, eval_every: 50,
            eval_batches: null, checkpoint_every: 1000, keep_checkpoints: 0,
            out_dir: runs/x, resume: null, overwrite: false, device: auto, compile: false, precision: fp32,
            fused: auto, activation_checkpointing: none}
    telemetry: {tensorboard: true, plots: true, gpu_stats: true, progress_bar: true,
                idle_expert_steps: 100, drop_jump: 0.1, peak_tflops: null, profile: null}

``load_config(path, overrides)`` reads the YAML, applies ``--set a.b=value``
overrides (the value is parsed as YAML, so ``3``, ``0.5``, ``true``, ``null`` and
``[0.9, 0.99]`` have their YAML types) and validates. Every problem raises
``ConfigError`` (a ``ValueError``, from ``moe.checks``) naming the key path, the
value it got and what is allowed; a key repeated in one YAML mapping is an error
naming it and its lines. ``model`` and ``data`` belong to the task:
``resolve_sections(cfg)`` validates them through the task's config classes
(``moe.tasks.TASKS``), which ``python -m moe.train`` does before any process group
exists. ``train.compile: true`` applies ``torch.compile`` to every transformer block.
``train.precision`` (fp32 | bf16 | fp16): mixed precision with fp32 master weights, the router
and losses in fp32, fp16 with dynamic loss scaling (``parallel.precision``, docs/precision.md);
``train.fused`` (auto | off): NVIDIA apex's FusedAdam and fused LayerNorm when apex is importable
on a GPU, else torch's fused AdamW on CUDA, plain ops on CPU (``moe.trainer.fused``).
``train.activation_checkpointing``: ``none``, ``moe`` (recompute every MoE layer in the
backward) or ``block`` (recompute whole transformer blocks); the recompute replays the
routing of the forward (``moe.recompute``); not with ``train.compile``.
"""
from __future__ import annotations

import dataclasses
import importlib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

from parallel.precision import PRECISIONS

from parallel.checks import (
    ConfigError,
    check_bool,
    check_int,
    check_keys,
    check_mapping,
    check_number,
    check_str,
    fail,
    join,
)

_CUSTOM_TASK = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
SCHEDULES = ("cosine", "linear", "constant")
BACKENDS = ("auto", "gloo", "nccl")
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
ACTIVATION_CHECKPOINTING = ("none", "moe", "block")  # moe.recompute.MODES
ZERO_ENGINES = ("auto", "deepspeed", "fsdp2")
DEVICES = ("auto", "cpu", "cuda")
FUSED = ("auto", "off")
MAX_TIMEOUT_S = 7 * 24 * 3600.0  # parallel.timeout_s: a week; a collective waiting longer is a hang


# --------------------------------------------------------------------------------------
# Sections. Field metadata: "check" is a (predicate, description of what is allowed).
def _ge(n):
    return (lambda v: v >= n, f"it must be >= {n}")


def _gt(n):
    return (lambda v: v > n, f"it must be > {n}")


def _one_of(options):
    return (lambda v: v in options, f"allowed values: {', '.join(map(repr, options))}")


def _opt(default, check=None):
    return field(default=default, metadata={"check": check} if check else {})


@dataclass
class TaskConfig:
    """Which model and data to train: a built-in task or ``module:function``."""

    name: str = ""

    def validate(self, path: str) -> None:
        from moe.tasks import TASK_NAMES

        if self.name not in TASK_NAMES and not _CUSTOM_TASK.match(self.name):
            fail(f"{path}.name", self.name, f"allowed values: {', '.join(map(repr, TASK_NAMES))}, "
                 "or 'package.module:function' naming your own task builder")


@dataclass
class ParallelConfig:
    """Parallel layout; the data-parallel size is derived from the world size.

    ``tp``: tensor parallelism of the dense part (attention heads, dense MLPs, the LM
    vocabulary); ``sequence_parallel``: also split the LM's residual stream along the
    sequence over the tp ranks (needs tp > 1); ``ep``: expert parallelism; ``etp``:
    each expert's hidden units split over etp ranks; ``pp``: pipeline stages
    (``parallel.pipeline``), run by ``pp_schedule`` (``gpipe``, ``1f1b`` or
    ``interleaved_1f1b`` with ``virtual_stages`` >= 2 chunks per rank); ``pp_blocks``: an
    explicit cut, one block count per chunk (default: the balanced cut of
    ``parallel.stages``). With ``dp = world / (tp * pp)``, ``ep * etp`` must divide
    ``dp * tp``. The sizes are checked against the launch's world size and the model by
    ``moe.trainer.layout.check_layout`` before any process group exists.

    ``timeout_s``: how long any collective (all-reduce, all-to-all, pipeline send/recv,
    barrier) waits for its peers before the job ends with an error naming this key,
    instead of hanging forever on a peer that hung or died. It is given to every process
    group of the job (``parallel.launch``); raise it when a rank may legitimately wait
    longer, e.g. for a slow checkpoint file system (at most a week).
    """

    ep: int = _opt(1, _ge(1))
    tp: int = _opt(1, _ge(1))
    pp: int = _opt(1, _ge(1))
    etp: int = _opt(1, _ge(1))
    sequence_parallel: bool = False
    pp_schedule: str = _opt("1f1b", _one_of(PP_SCHEDULES))
    virtual_stages: int = _opt(1, _ge(1))
    pp_blocks: Optional[List[int]] = None
    zero_stage: int = _opt(0, (lambda v: v in (0, 1, 2, 3), "allowed values: 0, 1, 2, 3"))
    zero_engine: str = _opt("auto", _one_of(ZERO_ENGINES))
    backend: str = _opt("auto", _one_of(BACKENDS))
    timeout_s: float = 600.0

    @property
    def zero_engine_name(self) -> Optional[str]:
        """The engine that runs ``zero_stage`` (``auto``: DeepSpeed for 1 and 2, FSDP2 for 3); None at stage 0."""
        if self.zero_stage == 0:
            return None
        if self.zero_engine != "auto":
            return self.zero_engine
        return "deepspeed" if self.zero_stage in (1, 2) else "fsdp2"

    def validate(self, path: str) -> None:
        self._validate_zero(path)
        check_number(f"{path}.timeout_s", self.timeout_s, minimum=0.0, min_open=True, maximum=MAX_TIMEOUT_S)
        if self.virtual_stages > 1 and self.pp == 1:
            fail(f"{path}.virtual_stages", self.virtual_stages, f"virtual stages are chunks of a pipeline: it "
                 f"needs {path}.pp > 1")
        if self.virtual_stages > 1 and self.pp_schedule != "interleaved_1f1b":
            fail(f"{path}.virtual_stages", self.virtual_stages, f"more than one chunk per pipeline rank needs "
                 f"{path}.pp_schedule=interleaved_1f1b (got {self.pp_schedule!r})")
        if self.pp > 1 and self.pp_schedule == "interleaved_1f1b" and self.virtual_stages < 2:
            fail(f"{path}.virtual_stages", self.virtual_stages, "the interleaved_1f1b schedule needs at least 2 "
                 f"chunks per pipeline rank (set {path}.virtual_stages >= 2, or use pp_schedule 1f1b)")
        if self.pp_blocks is not None:
            if self.pp == 1:
                fail(f"{path}.pp_blocks", self.pp_blocks, f"it cuts the blocks over pipeline stages: it needs "
                     f"{path}.pp > 1")
            for i, k in enumerate(self.pp_blocks):
                check_int(f"{path}.pp_blocks[{i}]", k, minimum=1)
        if self.sequence_parallel and self.tp == 1:
            fail(f"{path}.sequence_parallel", True, f"it needs {path}.tp > 1, got tp=1 (sequence parallelism "
                 "splits each sequence over the tensor-parallel ranks)")


    def _validate_zero(self, path: str) -> None:
        stage, engine = self.zero_stage, self.zero_engine_name
        if stage == 0:
            if self.zero_engine != "auto":
                fail(f"{path}.zero_engine", self.zero_engine, f"it chooses the engine of {path}.zero_stage 1-3; "
                     "with zero_stage 0 (the replicated optimizer) leave it at 'auto'")
            return
        if engine == "deepspeed" and stage == 3:
            fail(f"{path}.zero_engine", self.zero_engine, "DeepSpeed's MoE refuses ZeRO stage 3; stage 3 runs on "
                 "zero_engine 'fsdp2' (or 'auto')")
        if engine == "fsdp2" and stage == 1:
            fail(f"{path}.zero_engine", self.zero_engine, "FSDP2 always shards gradients too (stages 2 and 3); "
                 "stage 1 runs on zero_engine 'deepspeed' (or 'auto')")
        if self.pp > 1:
            fail(f"{path}.zero_stage", stage, f"pipeline parallelism (pp={self.pp}) runs with the replicated "
                 "optimizer: set zero_stage 0, or pp=1 to use ZeRO")
        if engine == "fsdp2" and (self.tp > 1 or self.etp > 1):
            fail(f"{path}.zero_engine", self.zero_engine, f"FSDP2 here does not compose with tensor parallelism "
                 f"(tp={self.tp}, etp={self.etp}): use zero_stage 1 or 2 on zero_engine 'deepspeed', or tp=etp=1")
        if engine == "deepspeed" and (self.sequence_parallel or self.etp > 1):
            key, value = ("sequence_parallel", True) if self.sequence_parallel else ("etp", self.etp)
            fail(f"{path}.{key}", value, f"DeepSpeed ZeRO (zero_stage {stage}) composes with tensor parallelism "
                 "(tp) but not with sequence parallelism or expert tensor parallelism (their partial gradients "
                 f"need a sum over tp that DeepSpeed does not do): set {path}.sequence_parallel false and "
                 f"{path}.etp 1, or zero_stage 0")


@dataclass
class OptimConfig:
    """AdamW with a warmup + (cosine | linear | constant) learning-rate schedule."""

    lr: float = _opt(1e-3, _gt(0.0))
    weight_decay: float = _opt(0.01, _ge(0.0))
    betas: Tuple[float, float] = (0.9, 0.95)
    eps: float = _opt(1e-8, _gt(0.0))
    warmup_steps: int = _opt(0, _ge(0))
    schedule: str = _opt("cosine", _one_of(SCHEDULES))
    min_lr_ratio: float = _opt(0.1, (lambda v: 0.0 <= v <= 1.0, "it must be in [0, 1]"))
    grad_clip: Optional[float] = _opt(1.0, _ge(0.0))  # null or 0: no clipping

    def validate(self, path: str) -> None:
        for i, b in enumerate(self.betas):
            check_number(f"{path}.betas[{i}]", b, minimum=0.0, maximum=1.0, max_open=True)


@dataclass
class TrainLoopConfig:
    """Steps, the global batch and its micro-batches, cadence of logs/evals/checkpoints.

    ``global_batch_size``: samples per optimizer step, over all data-parallel ranks.
    ``micro_batch_size``: samples per rank per forward (the routing group: capacity,
    drops and balancing losses are computed per micro-batch); null = the whole rank's
    share, ``global_batch_size / dp``. Gradient accumulation steps =
    ``global_batch_size / (micro_batch_size * dp)``, checked when the job starts and
    the data-parallel size is known. The same two numbers train the same model on any
    layout (see README, "Layout invariance"). ``resume`` / ``overwrite``: which
    checkpoint the run continues, and what happens to checkpoints of another run in
    ``out_dir`` (refused unless ``overwrite: true`` deletes them): ``moe/trainer/resume.py``.
    ``activation_checkpointing``: ``none``; ``moe``: every MoE layer's router, dispatch, experts
    and combine run again in the backward instead of keeping their activations; ``block``: whole
    transformer blocks do. Random routing draws and routing state are replayed, so the gradients
    are those without it (``moe.recompute``).
    """

    steps: int = _opt(100, _ge(1))
    global_batch_size: int = _opt(16, _ge(1))
    micro_batch_size: Optional[int] = _opt(None, _ge(1))
    seed: int = _opt(0, _ge(0))
    log_every: int = _opt(10, _ge(1))
    eval_every: int = _opt(0, _ge(0))  # 0: only at the end
    eval_batches: Optional[int] = _opt(None, _ge(1))  # null: the task's whole eval set
    checkpoint_every: int = _opt(1000, _ge(0))  # 0: only at the end (and on SIGTERM/SIGINT)
    keep_checkpoints: int = _opt(0, _ge(0))  # 0: keep all
    out_dir: str = "runs/default"
    resume: Optional[str] = None  # null: start fresh; "auto": latest in out_dir if any; or a path
    overwrite: bool = False  # true: delete checkpoints of another run in out_dir instead of refusing to start
    device: str = _opt("auto", _one_of(DEVICES))
    compile: bool = False  # torch.compile every transformer block (moe.models.compile_blocks)
    precision: str = _opt("fp32", _one_of(PRECISIONS))  # bf16 / fp16: autocast, fp32 master weights (docs/precision.md)
    fused: str = _opt("auto", _one_of(FUSED))  # auto: apex FusedAdam + fused LayerNorm if importable (moe.trainer.fused)
    # Recompute in the backward: 'moe' layers or whole 'block's, routing replayed (moe.recompute)
    activation_checkpointing: str = _opt("none", _one_of(ACTIVATION_CHECKPOINTING))

    def validate(self, path: str) -> None:
        if self.micro_batch_size is not None and self.global_batch_size % self.micro_batch_size:
            fail(f"{path}.micro_batch_size", self.micro_batch_size,
                 f"it must divide train.global_batch_size={self.global_batch_size}")
        check_str(f"{path}.out_dir", self.out_dir, what="a non-empty directory path")
        if self.resume is not None and not self.resume:
            fail(f"{path}.resume", self.resume, "use null (fresh start), 'auto' or a checkpoint path")


@dataclass
class ProfileConfig:
    """``telemetry.profile``: a torch profiler trace of steps ``start_step .. start_step + steps - 1``
    (1-based), written per rank to ``<out_dir>/profile/`` in TensorBoard's profiler-plugin format."""

    start_step: int = _opt(2, _ge(1))
    steps: int = _opt(2, _ge(1))

    def validate(self, path: str) -> None:
        pass


@dataclass
class TelemetryConfig:
    """What the trainer records besides the progress line, and when it warns about routing.

    ``idle_expert_steps``: warn (once) when an expert has received no tokens for this many
    consecutive training steps, counted in whole log windows (0: never); ``drop_jump``:
    warn when a layer's drop rate rises by more than this between two log windows
    (absolute: 0.1 = 10 percentage points; null: never). See ``moe.trainer.health``.
    ``peak_tflops``: the peak of ONE device in TFLOP/s for the logged MFU (``train/mfu``);
    null: looked up from the GPU's NVML name (``moe.trainer.telemetry.PEAK_BF16_TFLOPS``,
    dense bf16), and no MFU on CPU or an unknown GPU. ``profile``: ``{start_step, steps}`` for a
    torch profiler trace of a few steps (``ProfileConfig``; null: none).
    """

    tensorboard: bool = True
    plots: bool = True
    gpu_stats: bool = True
    progress_bar: bool = True
    idle_expert_steps: int = _opt(100, _ge(0))
    drop_jump: Optional[float] = _opt(0.1, (lambda v: 0.0 < v <= 1.0, "it must be in (0, 1], or null (no warning)"))
    peak_tflops: Optional[float] = _opt(None, (lambda v: v is None or v > 0, "it must be > 0, or null (look it up)"))
    profile: Optional[ProfileConfig] = None

    def validate(self, path: str) -> None:
        pass


@dataclass
class TrainConfig:
    """The whole training job (see the module docstring for the YAML layout)."""

    task: TaskConfig
    model: Dict[str, Any]
    data: Dict[str, Any] = field(default_factory=dict)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    def validate(self, path: str) -> None:
        p = self.parallel
        if self.train.compile and (p.tp > 1 or p.etp > 1):
            fail(join(path, "train.compile"), True,
                 f"torch.compile is not supported with tensor parallelism yet (parallel.tp={p.tp}, "
                 f"parallel.etp={p.etp}); set it to false")
        if self.train.compile and self.train.activation_checkpointing != "none":
            fail(join(path, "train.activation_checkpointing"), self.train.activation_checkpointing,
                 "activation checkpointing is not supported with train.compile: true yet; set it to 'none', "
                 "or train.compile to false")
        if self.train.compile and p.zero_stage > 0:
            fail(join(path, "train.compile"), True, f"torch.compile is not supported with ZeRO yet "
                 f"(parallel.zero_stage={p.zero_stage}); set it to false, or zero_stage 0")

    @property
    def engine_kind(self) -> str:
        """The engine this job runs on: "pipeline", "deepspeed", "fsdp2" or "replicated"."""
        if self.parallel.pp > 1:
            return "pipeline"
        return self.parallel.zero_engine_name if self.parallel.zero_stage > 0 else "replicated"

    def fused_choice(self, device_type: str):
        """What ``train.fused`` gives this job on ``device_type`` (``moe.trainer.fused.FusedChoice``)."""
        from .fused import choose

        return choose(self.train.fused, device_type, engine_owns_optimizer=self.parallel.zero_stage > 0)

    def effective_lines(self, device_type: str) -> List[str]:
        """What the precision and fused-kernel keys mean for this job on ``device_type`` (``--print-config``)."""
        from parallel.precision import Precision

        precision = Precision(self.train.precision)
        fused = self.fused_choice(device_type)
        return [f"precision {precision.name} on the {self.engine_kind} engine: {precision.describe(self.engine_kind)}",
                fused.describe()]

    def to_dict(self) -> Dict[str, Any]:
        """Plain-data form (what ``from_dict`` accepts); tuples become lists."""
        def plain(v):
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            return v
        return plain(dataclasses.asdict(self))

    def to_yaml(self, *, redacted: bool = False) -> str:
        """The config as YAML; ``redacted``: secret-looking keys' values masked (``moe.trainer.redact``)."""
        from .redact import redact

        data = self.to_dict()
        return yaml.safe_dump(redact(data) if redacted else data, sort_keys=False)


# --------------------------------------------------------------------------------------
# Generic, path-aware conversion of plain data into the dataclasses above.
def _convert(path: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(path, value, args[0])
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is Any:
        return value
    if tp is bool:
        return check_bool(path, value)
    if tp is int:
        return check_int(path, value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                fail(path, value, "it must be a number", wrong_type=True)
        return check_number(path, value)
    if tp is str:
        if not isinstance(value, str):
            fail(path, value, "it must be a string", wrong_type=True)
        return value
    if origin in (dict, Dict, Mapping):
        return dict(check_mapping(path, value))
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            fail(path, value, "it must be a list", wrong_type=True)
        (item,) = typing.get_args(tp)
        return [_convert(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
    if origin in (tuple, Tuple):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            fail(path, value, f"it must be a list of {len(args)} values", wrong_type=True)
        return tuple(_convert(f"{path}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    raise TypeError(f"internal: unsupported config type {tp!r} at {path}")


def _build(cls, raw: Any, path: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(path, raw, fields)
    kwargs = {}
    for name, f in fields.items():
        key = join(path, name)
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError.at(key, " is required but missing")
            continue
        value = _convert(key, raw[name], hints[name])
        check = f.metadata.get("check")
        if check is not None and value is not None and not check[0](value):
            fail(key, value, check[1])
        kwargs[name] = value
    obj = cls(**kwargs)
    obj.validate(path)
    return obj


def from_dict(raw: Mapping[str, Any]) -> TrainConfig:
    """Validate plain data (as read from YAML) into a ``TrainConfig``."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    raw = dict(raw)
    if isinstance(raw.get("train"), Mapping) and "batch_size" in raw["train"]:
        raise ConfigError(f"config key 'train.batch_size' (got {raw['train']['batch_size']!r}) was replaced: set "
                          "'train.global_batch_size' (samples per optimizer step, all data-parallel ranks together) "
                          "and optionally 'train.micro_batch_size' (samples per rank per forward; the old per-rank "
                          "batch_size B on dp ranks is global_batch_size = B * dp, micro_batch_size = B)")
    if isinstance(raw.get("task"), str):  # shorthand `task: limoe`
        raw["task"] = {"name": raw["task"]}
    return _build(TrainConfig, raw, "")


# --------------------------------------------------------------------------------------
def resolve_sections(cfg: TrainConfig) -> Dict[str, Any]:
    """Validate the free-form ``model`` and ``data`` sections; return them resolved.

    A built-in task (``moe.tasks.TASKS``) validates both through its config classes
    (preset expanded, every key checked) without building weights, reading data or
    touching a process group; the result is ``{"model": <every model field>, "data":
    <every data field>}``. A custom ``module:function`` task is only imported (its
    sections are its own business) and its sections come back as given. Every
    problem raises ``ConfigError`` naming the key path.
    """
    from moe.tasks import TASKS

    name = cfg.task.name
    if name not in TASKS:
        module, fn = name.split(":")
        try:
            getattr(importlib.import_module(module), fn)
        except (ImportError, AttributeError) as e:
            fail("task.name", name, f"it must name an importable task builder 'package.module:function' ({e})")
        return {"model": dict(cfg.model), "data": dict(cfg.data)}
    model, data = TASKS[name].configs_from_dicts(cfg.model, cfg.data)
    return {"model": model.to_dict(), "data": dataclasses.asdict(data)}


def resolved_yaml(cfg: TrainConfig, *, redacted: bool = False) -> str:
    """The config as YAML with the ``model`` and ``data`` sections resolved (``--print-config``).

    ``redacted``: secret-looking keys' values masked (``moe.trainer.redact``).
    """
    from .redact import redact

    out = cfg.to_dict()
    out.update(TrainConfig.to_dict(dataclasses.replace(cfg, **resolve_sections(cfg))))
    return yaml.safe_dump(redact(out) if redacted else out, sort_keys=False)


# --------------------------------------------------------------------------------------
class YAMLLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key repeated in one mapping (naming it and its lines)
    and reads ``1e-3`` (no dot) as the float it means, as YAML 1.2 does."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: Dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                    seen.setdefault(key, line)
                except TypeError:  # unhashable key: the base class reports it
                    continue
                if first is not None:
                    raise ConfigError(f"config key {key!r} appears twice in one mapping "
                                      f"(line {first} and line {line} of {key_node.start_mark.name}); "
                                      "keep one of them")
        return super().construct_mapping(node, deep=deep)


YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def parse_override(text: str) -> Tuple[List[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value (e.g. train.steps=20)")
    key, raw_value = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(re.match(r"^[\w-]+$", p) for p in parts):
        raise ConfigError(f"override {text!r}: key path {key!r} must be dot-separated names")
    try:
        value = yaml.load(raw_value, Loader=YAMLLoader) if raw_value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value {raw_value!r} is not valid YAML ({e})") from None
    return parts, value


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``--set`` overrides to raw config data (in place; also returned).

    Missing intermediate mappings are created (handy for the free-form ``model``
    and ``data`` sections); unknown keys are then reported by validation.
    """
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for i, part in enumerate(parts[:-1]):
            if part == "task" and isinstance(node.get(part), str) and node is raw:
                node[part] = {"name": node[part]}
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"override {text!r}: '{where}' is {child!r}, not a section, "
                                  f"so it has no key '{parts[i + 1]}'")
            node = child
        node[parts[-1]] = value
    return raw


def load_config(path: Union[str, Path, None] = None, overrides: Sequence[str] = (),
                base: Optional[Mapping[str, Any]] = None) -> TrainConfig:
    """Read a YAML file (or start from ``base``), apply overrides, validate."""
    raw: Dict[str, Any] = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.load(p.read_text(), Loader=YAMLLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections, "
                              f"got {type(loaded).__name__}")
        raw.update(loaded)
    raw = apply_overrides(_deep_copy(raw), overrides)
    return from_dict(raw)


def _deep_copy(v):
    if isinstance(v, dict):
        return {k: _deep_copy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_deep_copy(x) for x in v]
    return v
