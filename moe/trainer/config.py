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

``load_config(path, overrides)`` reads the YAML and applies ``--set a.b=value``
overrides (``moe.trainer.yaml_io``: the value is parsed as YAML, so ``3``, ``0.5``,
``true``, ``null`` and ``[0.9, 0.99]`` have their YAML types; a key repeated in one
YAML mapping is an error naming it and its lines), then ``from_dict`` validates.
Each section is a config dataclass that checks its fields in ``__post_init__`` and
is read from its mapping by ``moe.config_build`` (the one mechanism of every config
of the project): every problem raises ``ConfigError`` (a ``ValueError``, from
``moe.checks``) naming the key path, the value it got and what is allowed. A section
built in Python is checked the same way, its errors rooted at its class name
(``ParallelConfig.tp``). ``model`` and ``data`` belong to the task and are kept as
written: ``TrainConfig.task_configs()`` types them through the task's config classes
(``moe.tasks.TASKS``), and ``resolve_sections(cfg)`` resolves them (preset expanded,
every default), which ``python -m moe.train`` does before any process group exists.
``train.compile: true`` applies ``torch.compile`` to every transformer block.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union, overload

import yaml

from parallel.checks import (
    ConfigError,
    check_bool,
    check_choice,
    check_int,
    check_mapping,
    check_number,
    check_str,
    fail,
)
from parallel.launch import DIST_BACKENDS
from parallel.precision import PRECISIONS, Precision

from ..config_build import FromDict
from ..tasks import TASK_NAMES, TASKS
from .fused import FusedChoice, choose
from .redact import redact
from .yaml_io import YAMLLoader, apply_overrides, parse_override, read_config

__all__ = [
    "ConfigError", "TaskConfig", "ParallelConfig", "OptimConfig", "TrainLoopConfig", "ProfileConfig",
    "TelemetryConfig", "TrainConfig", "from_dict", "load_config", "resolve_sections", "resolved_yaml",
    # moe.trainer.yaml_io, importable from here as before
    "YAMLLoader", "apply_overrides", "parse_override",
]

_CUSTOM_TASK = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
SCHEDULES = ("cosine", "linear", "constant")
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
ACTIVATION_CHECKPOINTING = ("none", "moe", "block")  # moe.recompute.MODES
ZERO_ENGINES = ("auto", "deepspeed", "fsdp2")
ZERO_STAGES = (0, 1, 2, 3)
DEVICES = ("auto", "cpu", "cuda")
FUSED = ("auto", "off")
MAX_TIMEOUT_S = 7 * 24 * 3600.0  # parallel.timeout_s: a week; a collective waiting longer is a hang


# --------------------------------------------------------------------------------------
# Value checks of the sections: ``moe.checks`` plus the YAML forms a section accepts.
@overload
def _int(path: str, value: Any, *, minimum: Optional[int] = None, optional: Literal[False] = False) -> int: ...
@overload
def _int(path: str, value: Any, *, minimum: Optional[int] = None, optional: bool) -> Optional[int]: ...
def _int(path: str, value: Any, *, minimum: Optional[int] = None, optional: bool = False) -> Optional[int]:
    """An int >= ``minimum``; None too where ``optional`` (the overloads: an ``int`` where not)."""
    if value is None and optional:
        return None
    return check_int(path, value, minimum=minimum)


@overload
def _float(path: str, value: Any, *, optional: Literal[False] = False, **bounds: Any) -> float: ...
@overload
def _float(path: str, value: Any, *, optional: bool, **bounds: Any) -> Optional[float]: ...
def _float(path: str, value: Any, *, optional: bool = False, **bounds: Any) -> Optional[float]:
    """A finite number as a float, also from a string (YAML 1.1 reads "3e-4", no dot, as one);
    None too where ``optional`` (the overloads: a ``float`` where not). ``bounds``: those of
    ``check_number``, checked on the float."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            fail(path, value, "it must be a number", wrong_type=True)
    value = check_number(path, value)
    return check_number(path, value, **bounds) if bounds else value


@overload
def _str(path: str, value: Any, *, optional: Literal[False] = False) -> str: ...
@overload
def _str(path: str, value: Any, *, optional: bool) -> Optional[str]: ...
def _str(path: str, value: Any, *, optional: bool = False) -> Optional[str]:
    """A string; None too where ``optional`` (the overloads: a ``str`` where not)."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        fail(path, value, "it must be a string", wrong_type=True)
    return value


def _choice(path: str, value: Any, allowed: Sequence[str]) -> str:
    return check_choice(path, _str(path, value), allowed)


def _section(path: str, value: Any, cls: type, *, optional: bool = False) -> Any:
    """A section built in Python: an instance of its config class (None too where ``optional``)."""
    if not isinstance(value, cls) and not (value is None and optional):
        article = "an" if cls.__name__[0] in "AEIOU" else "a"
        fail(path, value, f"it must be {article} {cls.__name__}" + (" or None" if optional else ""), wrong_type=True)
    return value


# --------------------------------------------------------------------------------------
# Sections: each checks its fields in __post_init__ (paths rooted at the class name,
# re-rooted at the YAML key path by from_dict).
@dataclass
class TaskConfig(FromDict):
    """Which model and data to train: a built-in task or ``module:function``."""

    name: str = ""

    def __post_init__(self) -> None:
        p = "TaskConfig"
        self.name = _str(f"{p}.name", self.name)
        if self.name not in TASK_NAMES and not _CUSTOM_TASK.match(self.name):
            fail(f"{p}.name", self.name, f"allowed values: {', '.join(map(repr, TASK_NAMES))}, "
                 "or 'package.module:function' naming your own task builder")


@dataclass
class ParallelConfig(FromDict):
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

    ep: int = 1
    tp: int = 1
    pp: int = 1
    etp: int = 1
    sequence_parallel: bool = False
    pp_schedule: str = "1f1b"
    virtual_stages: int = 1
    pp_blocks: Optional[List[int]] = None
    zero_stage: int = 0
    zero_engine: str = "auto"
    backend: str = "auto"
    timeout_s: float = 600.0

    @property
    def zero_engine_name(self) -> Optional[str]:
        """The engine that runs ``zero_stage`` (``auto``: DeepSpeed for 1 and 2, FSDP2 for 3); None at stage 0."""
        if self.zero_stage == 0:
            return None
        if self.zero_engine != "auto":
            return self.zero_engine
        return "deepspeed" if self.zero_stage in (1, 2) else "fsdp2"

    def __post_init__(self) -> None:
        p = "ParallelConfig"
        for name in ("ep", "tp", "pp", "etp"):
            setattr(self, name, _int(f"{p}.{name}", getattr(self, name), minimum=1))
        self.sequence_parallel = check_bool(f"{p}.sequence_parallel", self.sequence_parallel)
        self.pp_schedule = _choice(f"{p}.pp_schedule", self.pp_schedule, PP_SCHEDULES)
        self.virtual_stages = _int(f"{p}.virtual_stages", self.virtual_stages, minimum=1)
        if self.pp_blocks is not None:
            if not isinstance(self.pp_blocks, (list, tuple)):
                fail(f"{p}.pp_blocks", self.pp_blocks, "it must be a list", wrong_type=True)
            self.pp_blocks = [_int(f"{p}.pp_blocks[{i}]", k) for i, k in enumerate(self.pp_blocks)]
        self.zero_stage = check_choice(f"{p}.zero_stage", check_int(f"{p}.zero_stage", self.zero_stage), ZERO_STAGES)
        self.zero_engine = _choice(f"{p}.zero_engine", self.zero_engine, ZERO_ENGINES)
        self.backend = _choice(f"{p}.backend", self.backend, DIST_BACKENDS)
        self.timeout_s = _float(f"{p}.timeout_s", self.timeout_s)
        self._check_zero(p)
        check_number(f"{p}.timeout_s", self.timeout_s, minimum=0.0, min_open=True, maximum=MAX_TIMEOUT_S)
        if self.virtual_stages > 1 and self.pp == 1:
            fail(f"{p}.virtual_stages", self.virtual_stages, f"virtual stages are chunks of a pipeline: it "
                 f"needs {p}.pp > 1")
        if self.virtual_stages > 1 and self.pp_schedule != "interleaved_1f1b":
            fail(f"{p}.virtual_stages", self.virtual_stages, f"more than one chunk per pipeline rank needs "
                 f"{p}.pp_schedule=interleaved_1f1b (got {self.pp_schedule!r})")
        if self.pp > 1 and self.pp_schedule == "interleaved_1f1b" and self.virtual_stages < 2:
            fail(f"{p}.virtual_stages", self.virtual_stages, "the interleaved_1f1b schedule needs at least 2 "
                 f"chunks per pipeline rank (set {p}.virtual_stages >= 2, or use pp_schedule 1f1b)")
        if self.pp_blocks is not None:
            if self.pp == 1:
                fail(f"{p}.pp_blocks", self.pp_blocks, f"it cuts the blocks over pipeline stages: it needs "
                     f"{p}.pp > 1")
            for i, k in enumerate(self.pp_blocks):
                check_int(f"{p}.pp_blocks[{i}]", k, minimum=1)
        if self.sequence_parallel and self.tp == 1:
            fail(f"{p}.sequence_parallel", True, f"it needs {p}.tp > 1, got tp=1 (sequence parallelism "
                 "splits each sequence over the tensor-parallel ranks)")

    def _check_zero(self, path: str) -> None:
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
class OptimConfig(FromDict):
    """AdamW with a warmup + (cosine | linear | constant) learning-rate schedule."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: Tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: Optional[float] = 1.0  # null or 0: no clipping

    def __post_init__(self) -> None:
        p = "OptimConfig"
        self.lr = _float(f"{p}.lr", self.lr, minimum=0.0, min_open=True)
        self.weight_decay = _float(f"{p}.weight_decay", self.weight_decay, minimum=0.0)
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            fail(f"{p}.betas", self.betas, "it must be a list of 2 values", wrong_type=True)
        self.betas = (_float(f"{p}.betas[0]", self.betas[0]), _float(f"{p}.betas[1]", self.betas[1]))
        self.eps = _float(f"{p}.eps", self.eps, minimum=0.0, min_open=True)
        self.warmup_steps = _int(f"{p}.warmup_steps", self.warmup_steps, minimum=0)
        self.schedule = _choice(f"{p}.schedule", self.schedule, SCHEDULES)
        self.min_lr_ratio = _float(f"{p}.min_lr_ratio", self.min_lr_ratio, minimum=0, maximum=1)
        self.grad_clip = _float(f"{p}.grad_clip", self.grad_clip, minimum=0.0, optional=True)
        for i, b in enumerate(self.betas):
            check_number(f"{p}.betas[{i}]", b, minimum=0.0, maximum=1.0, max_open=True)


@dataclass
class TrainLoopConfig(FromDict):
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

    steps: int = 100
    global_batch_size: int = 16
    micro_batch_size: Optional[int] = None
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_batches: Optional[int] = None  # null: the task's whole eval set
    checkpoint_every: int = 1000  # 0: only at the end (and on SIGTERM/SIGINT)
    keep_checkpoints: int = 0  # 0: keep all
    out_dir: str = "runs/default"
    resume: Optional[str] = None  # null: start fresh; "auto": latest in out_dir if any; or a path
    overwrite: bool = False  # true: delete checkpoints of another run in out_dir instead of refusing to start
    device: str = "auto"
    compile: bool = False  # torch.compile every transformer block (moe.models.compile_blocks)
    precision: str = "fp32"  # bf16 / fp16: autocast, fp32 master weights (docs/precision.md)
    fused: str = "auto"  # auto: apex FusedAdam + fused LayerNorm if importable (moe.trainer.fused)
    # Recompute in the backward: 'moe' layers or whole 'block's, routing replayed (moe.recompute)
    activation_checkpointing: str = "none"

    def __post_init__(self) -> None:
        p = "TrainLoopConfig"
        for name, minimum, optional in (("steps", 1, False), ("global_batch_size", 1, False),
                                        ("micro_batch_size", 1, True), ("seed", 0, False), ("log_every", 1, False),
                                        ("eval_every", 0, False), ("eval_batches", 1, True),
                                        ("checkpoint_every", 0, False), ("keep_checkpoints", 0, False)):
            setattr(self, name, _int(f"{p}.{name}", getattr(self, name), minimum=minimum, optional=optional))
        self.out_dir = _str(f"{p}.out_dir", self.out_dir)
        self.resume = _str(f"{p}.resume", self.resume, optional=True)
        self.overwrite = check_bool(f"{p}.overwrite", self.overwrite)
        self.device = _choice(f"{p}.device", self.device, DEVICES)
        self.compile = check_bool(f"{p}.compile", self.compile)
        self.precision = _choice(f"{p}.precision", self.precision, PRECISIONS)
        self.fused = _choice(f"{p}.fused", self.fused, FUSED)
        self.activation_checkpointing = _choice(f"{p}.activation_checkpointing", self.activation_checkpointing,
                                                ACTIVATION_CHECKPOINTING)
        if self.micro_batch_size is not None and self.global_batch_size % self.micro_batch_size:
            fail(f"{p}.micro_batch_size", self.micro_batch_size,
                 f"it must divide {p}.global_batch_size={self.global_batch_size}")
        check_str(f"{p}.out_dir", self.out_dir, what="a non-empty directory path")
        if self.resume is not None and not self.resume:
            fail(f"{p}.resume", self.resume, "use null (fresh start), 'auto' or a checkpoint path")


@dataclass
class ProfileConfig(FromDict):
    """``telemetry.profile``: a torch profiler trace of steps ``start_step .. start_step + steps - 1``
    (1-based), written per rank to ``<out_dir>/profile/`` in TensorBoard's profiler-plugin format."""

    start_step: int = 2
    steps: int = 2

    def __post_init__(self) -> None:
        p = "ProfileConfig"
        self.start_step = _int(f"{p}.start_step", self.start_step, minimum=1)
        self.steps = _int(f"{p}.steps", self.steps, minimum=1)


@dataclass
class TelemetryConfig(FromDict):
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
    idle_expert_steps: int = 100
    drop_jump: Optional[float] = 0.1
    peak_tflops: Optional[float] = None
    profile: Optional[ProfileConfig] = None

    def __post_init__(self) -> None:
        p = "TelemetryConfig"
        for name in ("tensorboard", "plots", "gpu_stats", "progress_bar"):
            setattr(self, name, check_bool(f"{p}.{name}", getattr(self, name)))
        self.idle_expert_steps = _int(f"{p}.idle_expert_steps", self.idle_expert_steps, minimum=0)
        self.drop_jump = _float(f"{p}.drop_jump", self.drop_jump, optional=True)
        if self.drop_jump is not None and not 0.0 < self.drop_jump <= 1.0:
            fail(f"{p}.drop_jump", self.drop_jump, "it must be in (0, 1], or null (no warning)")
        self.peak_tflops = _float(f"{p}.peak_tflops", self.peak_tflops, optional=True)
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            fail(f"{p}.peak_tflops", self.peak_tflops, "it must be > 0, or null (look it up)")
        _section(f"{p}.profile", self.profile, ProfileConfig, optional=True)


@dataclass
class TrainConfig(FromDict):
    """The whole training job (see the module docstring for the YAML layout)."""

    DICT_PATH = ""  # from_dict reads the whole file: its keys are top-level

    task: TaskConfig
    model: Dict[str, Any]
    data: Dict[str, Any] = field(default_factory=dict)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    def __post_init__(self) -> None:
        p = "TrainConfig"
        _section(f"{p}.task", self.task, TaskConfig)
        self.model = dict(check_mapping(f"{p}.model", self.model))
        self.data = dict(check_mapping(f"{p}.data", self.data))
        for name, cls in (("parallel", ParallelConfig), ("optim", OptimConfig), ("train", TrainLoopConfig),
                          ("telemetry", TelemetryConfig)):
            _section(f"{p}.{name}", getattr(self, name), cls)
        par, train = self.parallel, self.train
        if train.compile and (par.tp > 1 or par.etp > 1):
            fail(f"{p}.train.compile", True,
                 f"torch.compile is not supported with tensor parallelism yet ({p}.parallel.tp={par.tp}, "
                 f"{p}.parallel.etp={par.etp}); set it to false")
        if train.compile and train.activation_checkpointing != "none":
            fail(f"{p}.train.activation_checkpointing", train.activation_checkpointing,
                 f"activation checkpointing is not supported with {p}.train.compile: true yet; set it to 'none', "
                 f"or {p}.train.compile to false")
        if train.compile and par.zero_stage > 0:
            fail(f"{p}.train.compile", True, f"torch.compile is not supported with ZeRO yet "
                 f"({p}.parallel.zero_stage={par.zero_stage}); set it to false, or zero_stage 0")

    @classmethod
    def dict_kwargs(cls, kw: Dict[str, Any], path: str) -> Dict[str, Any]:
        """``from_dict``'s hook: the ``task: lm`` shorthand, and a clear word on the old ``train.batch_size``."""
        train = kw.get("train")
        if isinstance(train, Mapping) and "batch_size" in train:
            raise ConfigError(f"config key 'train.batch_size' (got {train['batch_size']!r}) was replaced: set "
                              "'train.global_batch_size' (samples per optimizer step, all data-parallel ranks "
                              "together) and optionally 'train.micro_batch_size' (samples per rank per forward; the "
                              "old per-rank batch_size B on dp ranks is global_batch_size = B * dp, "
                              "micro_batch_size = B)")
        if isinstance(kw.get("task"), str):
            kw = {**kw, "task": {"name": kw["task"]}}
        return super().dict_kwargs(kw, path)

    @property
    def engine_kind(self) -> str:
        """The engine this job runs on: "pipeline", "deepspeed", "fsdp2" or "replicated"."""
        if self.parallel.pp > 1:
            return "pipeline"
        zero_engine = self.parallel.zero_engine_name  # None exactly at zero_stage 0
        return "replicated" if zero_engine is None else zero_engine

    def task_configs(self) -> Optional[Tuple[Any, Any]]:
        """The ``model`` and ``data`` sections typed through the task's config classes:
        ``(model_config, data_config)`` of a built-in task (``moe.tasks.TASKS[name].config_cls`` and
        ``data_config_cls``, the preset expanded), or None for a custom ``package.module:function``
        task, whose sections are its own business. Builds no weights and reads no data; a bad value
        raises ``ConfigError`` naming its key path (``model.moe.router.top_k``)."""
        if self.task.name not in TASKS:
            return None
        return TASKS[self.task.name].configs_from_dicts(self.model, self.data)

    def fused_choice(self, device_type: str) -> FusedChoice:
        """What ``train.fused`` gives this job on ``device_type`` (``moe.trainer.fused.FusedChoice``)."""
        return choose(self.train.fused, device_type, engine_owns_optimizer=self.parallel.zero_stage > 0)

    def effective_lines(self, device_type: str) -> List[str]:
        """What the precision and fused-kernel keys mean for this job on ``device_type`` (``--print-config``)."""
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
        data = self.to_dict()
        return yaml.safe_dump(redact(data) if redacted else data, sort_keys=False)


# --------------------------------------------------------------------------------------
def from_dict(raw: Mapping[str, Any]) -> TrainConfig:
    """Validate plain data (as read from YAML) into a ``TrainConfig``."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    return TrainConfig.from_dict(raw)


def load_config(path: Union[str, Path, None] = None, overrides: Sequence[str] = (),
                base: Optional[Mapping[str, Any]] = None) -> TrainConfig:
    """Read a YAML file (or start from ``base``), apply overrides (``moe.trainer.yaml_io``), validate."""
    return from_dict(read_config(path, overrides, base))


def resolve_sections(cfg: TrainConfig) -> Dict[str, Any]:
    """Validate the free-form ``model`` and ``data`` sections; return them resolved.

    A built-in task (``moe.tasks.TASKS``) validates both through its config classes
    (``TrainConfig.task_configs``: preset expanded, every key checked) without building
    weights, reading data or touching a process group; the result is ``{"model": <every
    model field>, "data": <every data field>}``. A custom ``module:function`` task is only
    imported (its sections are its own business) and its sections come back as given.
    Every problem raises ``ConfigError`` naming the key path.
    """
    typed = cfg.task_configs()
    if typed is None:
        module, fn = cfg.task.name.split(":")
        try:
            getattr(importlib.import_module(module), fn)
        except (ImportError, AttributeError) as e:
            fail("task.name", cfg.task.name, f"it must name an importable task builder 'package.module:function' "
                 f"({e})")
        return {"model": dict(cfg.model), "data": dict(cfg.data)}
    model, data = typed
    return {"model": model.to_dict(), "data": dataclasses.asdict(data)}


def resolved_yaml(cfg: TrainConfig, *, redacted: bool = False) -> str:
    """The config as YAML with the ``model`` and ``data`` sections resolved (``--print-config``).

    ``redacted``: secret-looking keys' values masked (``moe.trainer.redact``).
    """
    out = cfg.to_dict()
    out.update(TrainConfig.to_dict(dataclasses.replace(cfg, **resolve_sections(cfg))))
    return yaml.safe_dump(redact(out) if redacted else out, sort_keys=False)
