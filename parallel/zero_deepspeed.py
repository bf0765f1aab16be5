"""ZeRO stages 1 and 2 on DeepSpeed, with this project's own experts and process groups.

Legend: P a parameter's element count; dp / edp / ep / tp the ``ParallelDims`` sizes.

``DeepSpeedEngine`` has the verbs of ``parallel.engine`` and hands the model to
``deepspeed.initialize`` with a torch ``AdamW`` (never DeepSpeed's fused optimizer: it
JIT-builds a C++ op) whose groups and hyperparameters (lr, betas, eps) are those of the AdamW
``make_optimizer(model)`` builds (the trainer's: ``moe.trainer.optim.build_optimizer``, weight
decay on matrices only) split by ``deepspeed.moe.utils.split_params_into_different_moe_groups_for_
optimizer``: dense decay / no-decay groups, and the same two for the expert parameters
(marked ``allreduce=False``, ``group_name="ep_size_<ep>"`` by ``parallel.grads``), which
ZeRO partitions over the expert-data-parallel group. Stage 1 partitions the optimizer
state (fp32 master weights, AdamW's moments) over the data-parallel ranks; stage 2 the
reduced gradients as well. Our groups are DeepSpeed's groups:

- an ``mpu`` built from ``ProcessGroups`` (data-parallel = our dp group, model-parallel =
  our tp group, no pipeline) is passed to ``deepspeed.initialize``;
- our ep / edp groups are written into DeepSpeed's expert / expert-data-parallel group
  dicts under the name ``ep_size_<ep>`` (its own ``_create_expert_and_data_parallel``
  lays ranks out differently under tensor parallelism, and its ``groups.initialize`` is
  deprecated);
- DeepSpeed decides that a model has MoE layers only from instances of its own
  ``deepspeed.moe.layer.MoE`` (without one it crashes in the ZeRO gradient averaging):
  the module handed to it is a wrapper holding our model and one parameter-free marker
  of that class (``_MoEMarker``; the model itself is not changed).

DeepSpeed sums dense gradients over dp and expert gradients over edp and divides both by
dp: the gradient of the global-batch mean loss, as ``parallel.grads.allreduce_gradients``.
Under tensor parallelism a tp piece is marked ``tensor_model_parallel`` (its squared norm
is summed over tp), and so is every expert parameter: each rank then holds a different
part of the expert gradients (edp partition x ep experts), and the norm sums them all.

Verbs: ``forward_backward`` runs each micro-batch's forward (``loss_fn``) and
``engine.backward`` with the accumulation boundary set on the last one (DeepSpeed divides
each loss by the accumulation count and reduces the gradients; stage 2 reduce-scatters
them into this rank's partition). ``clip_grad_norm(max_norm)`` returns DeepSpeed's global
norm of the reduced gradients (every parameter once) and sets its clipping threshold;
``step(lr)`` sets the learning rate and runs ``engine.step()``, which clips and updates
the partitions and all-gathers the parameters.

Mixed precision (``train.precision``, ``parallel.precision``): the loop's ``loss_fn`` runs the
forward under ``precision.autocast``; parameters, gradients, their reduction, the fp32 master
partitions and AdamW's state stay fp32. DeepSpeed's own ``bf16`` / ``fp16`` modes stay off: they cast
the model to 16 bits (the router would compute from bf16 weights, and the model's state, which
checkpoints save, would hold 16-bit copies, not the masters); with fp32 gradient accumulation ZeRO-1
would become DeepSpeed's ``BF16_Optimizer`` (no ``single_partition_of_fp32_groups``, no
``scaled_global_norm``: another engine); and DeepSpeed's CPU accelerator has no fp16.

- bf16: DeepSpeed's ``torch_autocast`` section on (dtype bfloat16) with no
  ``lower_precision_safe_modules``: every gradient is reduced in fp32, as FSDP2's
  ``reduce_dtype=fp32``, so DeepSpeed trains the replicated engine's numbers. ``reduce_dtype=
  torch.bfloat16`` (opt-in) names the matmul layers (``low_precision_comm_modules``: ``nn.Linear``
  and the classes holding the expert parameters, ``moe.experts.Experts``, matched by exact class;
  never the router, norms or embeddings): their
  gradients are then reduced in bf16 (half the bytes; DeepSpeed keeps a bf16 bucket for them),
  within bf16 round-off of the fp32 reduction, not within the 1e-4 of the layout tests.
- fp16: nothing in DeepSpeed's config (its static loss scale stays 1). ``forward_backward``
  multiplies every micro-batch loss by ``loss_scale`` (the loop's ``LossScaler``) before
  ``engine.backward``; ``unscale_grads(factor)`` multiplies the reduced gradient partitions
  (``averaged_gradients``: what DeepSpeed's norm and step read) by ``factor``, so ``clip_grad_norm``
  returns the true norm and ``step`` applies the unscaled, clipped gradients; ``skip_step`` takes
  DeepSpeed's own overflow path (its ZeRO optimizer's ``has_overflow`` answers True for that one
  step): the gradients are dropped, the partitions and AdamW's state are left alone, and its
  ``skipped_steps`` and ``global_steps`` count the step.
- the model's parameters are DeepSpeed's flat "bit16" groups, fp32 here, which every step copies
  from the fp32 masters: the model weights a checkpoint saves are the masters bit for bit.
  ``memory()`` is unchanged: no 16-bit copies exist (communication buckets are not counted).

In ``precision.describe`` terms: bf16 "DeepSpeed torch_autocast bf16 (its bf16/fp16 modes off),
fp32 parameters, gradient reduction and partitions"; fp16 "DeepSpeed in fp32 (no fp16 mode): losses
scaled before its backward, its reduced partitions unscaled; fp32 gradient reduction and partitions".

Checkpoints (``moe.trainer.checkpoint``: the FULL optimizer state per parameter key):
``checkpoint_optimizer()`` is a per-parameter view, a torch ``AdamW`` over the model's
parameters whose ``state[p]`` holds ``step`` / ``exp_avg`` / ``exp_avg_sq`` gathered from
the partitions (``deepspeed.utils.safe_get_full_optimizer_state``: an all-reduce over the
parameter's partition group); ``after_checkpoint_load()`` writes the loaded state and the
loaded weights (the fp32 master partitions) back into the partitions
(``safe_set_full_optimizer_state`` / ``safe_set_full_fp32_param``). The view holds the FULL state
of every parameter of the rank: it lives from ``checkpoint_optimizer()`` until the load is pushed
back or the next ``forward_backward``. DeepSpeed's own
``save_checkpoint`` is not used: it saves only rank 0's experts.

Not here: ZeRO stage 3 (DeepSpeed's MoE refuses it: ``parallel.zero_fsdp``), pipeline
parallelism, sequence parallelism and expert tensor parallelism (their partial gradients
need a sum over tp that DeepSpeed does not do): ``moe.trainer.config`` refuses them.
"""
from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Type

import torch
import torch.distributed as dist
from torch import nn

from .checks import check_int
from .dims import ProcessGroups
from .engine import LossEngine, LossFn, MakeOptimizer
from .grads import expert_group_name, is_expert_param
from .precision import FP32, Precision
from .shards import partial_grad_group, shard_of

if TYPE_CHECKING:  # the type only: deepspeed is imported when an engine is built (_import_deepspeed)
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

__all__ = ["DeepSpeedEngine", "ADAM_KEYS"]

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
_BUCKET_NUMEL = 50_000_000  # elements per reduce / all-gather bucket (DeepSpeed's default 5e8 = 2 GB fp32)


def _import_deepspeed() -> Any:  # the deepspeed module (untyped)
    """``deepspeed``, quiet, without its shared-memory comm op: that op (JIT-built, ~60 s on the
    first run) serves only ``inference_all_reduce``, which training never calls."""
    import importlib

    import deepspeed
    from deepspeed.utils import logger as ds_logger

    # by module path: the attribute ``deepspeed.comm.torch`` is the torch package itself
    comm_torch: Any = importlib.import_module("deepspeed.comm.torch")  # deepspeed ships no type information
    comm_torch.build_shm_op = lambda: None
    ds_logger.setLevel(logging.WARNING)
    return deepspeed


def _set_local_rank(device: torch.device | str) -> None:
    """DeepSpeed refuses to start without ``LOCAL_RANK`` and picks its CUDA device from it: set it from
    ``device`` when no launcher did (our SLURM and test launches), and check it otherwise."""
    device = torch.device(device)
    index = 0
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
    given = os.environ.get("LOCAL_RANK")
    if given is None:
        os.environ["LOCAL_RANK"] = str(index)
    elif device.type == "cuda" and int(given) != index:
        raise ValueError(f"DeepSpeedEngine: LOCAL_RANK={given} but the model is on {device}; DeepSpeed would "
                         f"use cuda:{given}")


class _MPU:
    """The model-parallel unit DeepSpeed asks for its groups, answered from our ``ProcessGroups``:
    data parallel = dp, model (= tensor) parallel = tp, no pipeline parallelism."""

    def __init__(self, groups: ProcessGroups):
        self._g = groups

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self._g.dp_group

    def get_data_parallel_world_size(self) -> int:
        return self._g.dims.dp

    def get_data_parallel_rank(self) -> int:
        return self._g.dp_rank

    def get_data_parallel_group_ranks(self) -> List[int]:
        return list(self._g.group_ranks["dp"])

    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return self._g.tp_group

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._g.dims.tp

    def get_tensor_model_parallel_rank(self) -> int:
        return self._g.tp_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._g.group_ranks["tp"][0]

    get_model_parallel_group = get_tensor_model_parallel_group
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_src_rank = get_tensor_model_parallel_src_rank

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        return self._g.pp_group

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    get_pipe_parallel_group = get_pipeline_model_parallel_group
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_rank = get_pipeline_model_parallel_rank


def _marker_class() -> Type[nn.Module]:
    from deepspeed.moe.layer import MoE

    class _MoEMarker(MoE):
        """A parameter-free instance of DeepSpeed's ``MoE``: its presence tells DeepSpeed the model has
        expert parameters (see the module doc). Never called."""

        def __init__(self, num_experts: int, ep_size: int):
            nn.Module.__init__(self)  # MoE's own constructor builds experts and groups: bypassed
            self.num_experts, self.ep_size = num_experts, ep_size
            self.num_local_experts = num_experts // ep_size
            self.expert_group_name = expert_group_name(ep_size)
            self.enable_expert_tensor_parallelism = False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            """The groups are ours, written into DeepSpeed's dicts before ``deepspeed.initialize``."""

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("_MoEMarker only marks a model for DeepSpeed; it is never called")

    return _MoEMarker


class _Wrapped(nn.Module):
    """What DeepSpeed sees: our model (unchanged) and the MoE marker."""

    def __init__(self, model: nn.Module, marker: nn.Module):
        super().__init__()
        self.model, self.marker = model, marker

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def _register_expert_groups(groups: ProcessGroups) -> str:
    """Write our ep / edp groups into DeepSpeed's group dicts (see the module doc); returns the name."""
    from deepspeed.utils import groups as ds_groups

    name = expert_group_name(groups.dims.ep)
    ds_groups._EXPERT_PARALLEL_GROUP[name] = groups.ep_group
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = list(groups.group_ranks["ep"])
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = groups.edp_group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = list(groups.group_ranks["edp"])
    return name


_LINEAR = "torch.nn.modules.linear.Linear"
_COMM_DTYPE_ATTR = "comm_dtype"  # deepspeed.runtime.torch_autocast.PARAM_COMM_DTYPE_ATTR_NAME
# DeepSpeed's marker of a model-parallel piece (its norm sums the piece's squares over the mp group): a plain
# attribute set on the parameter object, which torch.Tensor does not declare
_MODEL_PARALLEL_ATTR = "tensor_model_parallel"


def _check_reduce_dtype(precision: Precision, reduce_dtype: torch.dtype) -> None:
    allowed = [torch.float32] + ([torch.bfloat16] if precision.name == "bf16" else [])
    if reduce_dtype not in allowed:
        raise ValueError(f"DeepSpeedEngine: reduce_dtype={reduce_dtype} with precision {precision.name!r}; allowed: "
                         f"{', '.join(map(str, allowed))} (bf16 gradient reduction needs precision 'bf16')")


def low_precision_comm_modules(model: nn.Module) -> List[str]:
    """reduce_dtype=bf16: the classes whose gradients DeepSpeed then reduces in bf16 (torch_autocast's
    ``lower_precision_safe_modules``, matched by exact class, named as DeepSpeed imports them): the matmul
    weights, ``nn.Linear`` and the classes of the modules holding expert parameters; never the router."""
    experts = {f"{type(m).__module__}.{type(m).__name__}" for m in model.modules()
               if any(is_expert_param(p) for p in m.parameters(recurse=False))}
    return [_LINEAR] + sorted(experts)


def precision_config(precision: Precision, reduce_dtype: torch.dtype = torch.float32,
                     low_precision_modules: Sequence[str] = ()) -> Dict[str, Any]:
    """DeepSpeed's precision sections for ``precision`` (see the module doc): its ``fp16`` / ``bf16``
    modes stay off (parameters, gradients and partitions fp32); bf16 turns on ``torch_autocast``,
    whose lower-precision gradient reduction covers ``low_precision_modules`` (the model's
    ``low_precision_comm_modules``) when ``reduce_dtype`` is bf16 and nothing otherwise."""
    _check_reduce_dtype(precision, reduce_dtype)
    config: Dict[str, Any] = {"fp16": {"enabled": False}, "bf16": {"enabled": False}}
    if precision.name == "bf16":
        modules = list(low_precision_modules) if reduce_dtype == torch.bfloat16 else []
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": modules}
    return config


def _clear_stale_comm_dtypes(model: nn.Module) -> None:
    """Drop the per-parameter communication dtype an earlier DeepSpeed engine with bf16 reduction left on
    ``model``: DeepSpeed marks parameters and never unmarks them, and once one engine of the process
    enabled ``torch_autocast`` every later ZeRO optimizer reads the marks."""
    for p in model.parameters():
        if hasattr(p, _COMM_DTYPE_ATTR):
            delattr(p, _COMM_DTYPE_ATTR)


def _check_scale(name: str, value: float) -> float:
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"DeepSpeedEngine: {name} must be a finite number > 0, got {value!r}")
    return value


def _reference_adamw(model: nn.Module, make_optimizer: MakeOptimizer) -> torch.optim.AdamW:
    """``make_optimizer(model)``: the AdamW whose groups (which parameters decay) and hyperparameters
    DeepSpeed's AdamW takes; it never steps."""
    reference = make_optimizer(model)
    if not isinstance(reference, torch.optim.AdamW):
        raise TypeError(f"DeepSpeedEngine: make_optimizer must build a torch.optim.AdamW (DeepSpeed is handed a "
                        f"torch AdamW with its groups), got {type(reference).__name__}")
    return reference


def _param_groups(reference: torch.optim.Optimizer) -> List[dict]:
    """The reference optimizer's groups (decay, no decay), named for DeepSpeed's split."""
    names = ("decay", "no_decay")
    return [{"params": list(g["params"]), "weight_decay": g["weight_decay"], "name": names[i]}
            for i, g in enumerate(reference.param_groups)]


def _global_experts(model: nn.Module, ep: int) -> int:
    """The largest global expert count of the model's expert parameters (stacked [E_l, ...] tensors over
    this rank's E_l experts: E_l x ep), ep when it has none: the size DeepSpeed's MoE marker reports."""
    return max([p.shape[0] * ep for p in model.parameters() if is_expert_param(p) and p.dim() > 0] or [ep])


class DeepSpeedEngine(LossEngine):
    """ZeRO stage 1 or 2 on DeepSpeed (see the module doc).

    ``model``: the rank's model (expert parameters marked by ``parallel.grads``); ``groups``: its
    ``ProcessGroups``; ``make_optimizer``: builds the job's torch AdamW for a model (its groups and
    lr / betas / eps are DeepSpeed's AdamW's); ``grad_clip``: the clipping threshold DeepSpeed starts
    with (``optim.grad_clip``; None: none; ``clip_grad_norm`` sets it every step); ``stage``: 1 or 2;
    ``num_micro``: micro-batches per optimizer step; ``device``: where the model lives; ``precision``:
    ``train.precision``; ``reduce_dtype``: fp32, or bf16 with precision bf16 (the module doc).
    """

    def __init__(self, model: nn.Module, groups: ProcessGroups, make_optimizer: MakeOptimizer, *, stage: int,
                 num_micro: int, device: torch.device | str, grad_clip: Optional[float] = None,
                 precision: Precision = FP32, reduce_dtype: torch.dtype = torch.float32):
        if stage not in (1, 2):
            raise ValueError(f"DeepSpeedEngine: stage must be 1 or 2 (ZeRO stage 3 runs on FSDP2), got {stage!r}")
        check_int("num_micro", num_micro, minimum=1)
        _check_reduce_dtype(precision, reduce_dtype)
        dims = groups.dims
        if dims.pp > 1 or dims.etp > 1 or dims.sequence_parallel:
            raise ValueError(f"DeepSpeedEngine: pp={dims.pp}, etp={dims.etp}, sequence_parallel="
                             f"{dims.sequence_parallel} are not supported (pp=1, etp=1, no sequence parallelism)")
        partial = [n for n, p in model.named_parameters() if partial_grad_group(p) is not None]
        if partial:
            raise ValueError(f"DeepSpeedEngine: parameters with partial gradients ({partial[0]}, ...) need a sum "
                             "over their group that DeepSpeed does not do")
        deepspeed = _import_deepspeed()
        _set_local_rank(device)
        self.model, self.groups, self.stage, self.num_micro = model, groups, stage, num_micro
        self.make_optimizer, self.precision, self.reduce_dtype = make_optimizer, precision, reduce_dtype
        if dims.tp > 1:  # the norm: tp pieces and experts differ between the model-parallel ranks
            for p in model.parameters():
                if is_expert_param(p) or shard_of(p) is not None:
                    setattr(p, _MODEL_PARALLEL_ATTR, True)
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        _register_expert_groups(groups)
        wrapped = _Wrapped(model, _marker_class()(_global_experts(model, dims.ep), dims.ep))
        reference = _reference_adamw(model, make_optimizer)  # the one place that decides which parameters decay
        param_groups = split_params_into_different_moe_groups_for_optimizer(_param_groups(reference))
        param_groups = [g for g in param_groups if g["params"]]
        hyper = reference.defaults
        torch_optim = torch.optim.AdamW(param_groups, lr=hyper["lr"], betas=tuple(hyper["betas"]), eps=hyper["eps"])
        config = {
            "train_micro_batch_size_per_gpu": 1,  # batches are ours; DeepSpeed only checks the product
            "gradient_accumulation_steps": num_micro,
            "gradient_clipping": float(grad_clip or 0.0),  # DeepSpeed's default is 1.0
            "zero_optimization": {"stage": stage, "contiguous_gradients": True, "reduce_scatter": True,
                                  "overlap_comm": False, "reduce_bucket_size": _BUCKET_NUMEL,
                                  "allgather_bucket_size": _BUCKET_NUMEL},
            **precision_config(precision, reduce_dtype, low_precision_comm_modules(model)),
            "steps_per_print": 2 ** 62,
            "wall_clock_breakdown": False,
        }
        _clear_stale_comm_dtypes(model)
        self.ds, zero, _, _ = deepspeed.initialize(model=wrapped, optimizer=torch_optim, config=config,
                                                   mpu=_MPU(groups), dist_init_required=False)
        if not isinstance(zero, DeepSpeedZeroOptimizer):
            raise RuntimeError(f"DeepSpeedEngine: deepspeed.initialize built a {type(zero).__name__}, not its ZeRO "
                               "stage 1/2 optimizer (DeepSpeedZeroOptimizer) this engine reads")
        self.optimizer = zero
        self._zero: DeepSpeedZeroOptimizer = zero  # DeepSpeed's ZeRO optimizer (its .optimizer is the torch AdamW)
        self._view: Optional[torch.optim.AdamW] = None

    # ---- the verbs -----------------------------------------------------------------
    def forward_backward(self, num_micro: int, loss_fn: LossFn) -> List[Dict[str, float]]:
        if num_micro != self.num_micro:
            raise ValueError(f"DeepSpeedEngine.forward_backward: num_micro={num_micro}, but the engine was "
                             f"built for {self.num_micro} micro-batches per step (DeepSpeed's accumulation count)")
        scale = _check_scale("loss_scale", self.loss_scale)
        self._view = None  # a saved checkpoint's gathered (full-size) state: not kept while training
        logs = []
        for m in range(num_micro):
            self.ds.set_gradient_accumulation_boundary(m == num_micro - 1)
            self._zero.clear_backward_seen_flag()  # what engine.forward does before each forward
            loss, micro_logs = loss_fn(m)
            if scale != 1.0:  # fp16: a power of two, exact; DeepSpeed's own loss scale stays 1
                loss = loss * scale
            self.ds.backward(loss)  # divides by num_micro; reduces on the boundary
            logs.append(micro_logs)
        return logs

    def clip_grad_norm(self, max_norm: Optional[float]) -> float:
        self._zero.clip_grad = float(max_norm or 0.0)
        return float(self._zero.scaled_global_norm())

    def step(self, lr: float) -> None:
        for group in self._zero.optimizer.param_groups:
            group["lr"] = lr
        self.ds.set_gradient_accumulation_boundary(True)
        self.ds.step()

    def _grad_partitions(self) -> List[torch.Tensor]:
        """The reduced gradients DeepSpeed will step with: this rank's partition of every group, as the
        tensors its norm and its step read (``averaged_gradients``; padding included)."""
        zero = self._zero
        grads = [zero.averaged_gradients.get(i) for i in range(len(zero.bit16_groups))]
        if any(g is None for g in grads):
            raise RuntimeError("DeepSpeedEngine: no reduced gradients; call forward_backward first")
        return [t for group in grads for t in group if t is not None]

    @torch.no_grad()
    def unscale_grads(self, factor: float) -> None:
        """Multiply the reduced gradient partitions by ``factor`` (fp16: ``1 / loss_scale``), so that
        ``clip_grad_norm`` and ``step`` see the true gradients."""
        factor = _check_scale("unscale_grads factor", factor)
        if factor != 1.0:
            torch._foreach_mul_(self._grad_partitions(), factor)

    def skip_step(self) -> None:
        """Drop this step's gradients and leave the partitions and AdamW's state as they are, through
        DeepSpeed's own overflow path (its ``skipped_steps`` and ``global_steps`` count the step, its
        gradient buffers are released): its ZeRO optimizer is told that the gradients overflowed."""
        zero = self._zero
        checked = zero.check_grad_overflow
        zero.check_grad_overflow = True
        zero.has_overflow = lambda partition_gradients=True: True  # an instance attribute: shadows the method
        try:
            self.ds.set_gradient_accumulation_boundary(True)
            self.ds.step()
        finally:
            del zero.has_overflow
            zero.check_grad_overflow = checked
        if self.ds.was_step_applied():
            raise RuntimeError("DeepSpeedEngine.skip_step: DeepSpeed applied the step it was told to skip")

    # ---- checkpoints ---------------------------------------------------------------
    def _adam(self) -> torch.optim.AdamW:
        """A torch AdamW over the model's parameters with the job's groups; it never steps."""
        return _reference_adamw(self.model, self.make_optimizer)

    def _has_state(self) -> bool:
        state = self._zero.optimizer.state
        return all(len(state.get(flat, ())) > 0 for flat in self._zero.single_partition_of_fp32_groups)

    def _step_count(self) -> float:
        steps = {float(self._zero.optimizer.state[flat]["step"]) for flat in self._zero.single_partition_of_fp32_groups}
        if len(steps) != 1:
            raise RuntimeError(f"DeepSpeedEngine: the ZeRO partitions have different step counts {sorted(steps)}")
        return steps.pop()

    def _link_state(self) -> None:
        """Point every parameter's fragment at its slice of AdamW's state. DeepSpeed links them once,
        right after the FIRST group's first step, when the other groups have no state yet: their
        parameters would find none (``ValueError: exp_avg not found in optimizer state fragment``)."""
        self._zero._hp_optimizer_states_linked = False
        self._zero._lazy_init_hp_params_optimizer_state()

    def checkpoint_optimizer(self) -> torch.optim.AdamW:
        """A per-parameter view of the partitioned state (see the module doc); collective over dp."""
        from deepspeed.utils import safe_get_full_optimizer_state

        view = self._adam()
        if self._has_state():
            self._link_state()
            step = self._step_count()
            for group in view.param_groups:
                for p in group["params"]:
                    state = {"step": torch.tensor(step, dtype=torch.float32)}
                    for key in ADAM_KEYS:
                        state[key] = safe_get_full_optimizer_state(p, key).to(p.dtype).reshape(p.shape)
                    view.state[p] = state
        self._view = view
        return view

    def _create_state(self, step: float) -> None:
        """AdamW's state for every partition (AdamW creates it lazily at its first step)."""
        opt = self._zero.optimizer
        for flat in self._zero.single_partition_of_fp32_groups:
            opt.state[flat] = {"step": torch.tensor(step, dtype=torch.float32),
                               **{key: torch.zeros_like(flat) for key in ADAM_KEYS}}

    @torch.no_grad()
    def after_checkpoint_load(self) -> None:
        """Push what a checkpoint loaded into the view (optimizer state) and into the model (weights)
        into DeepSpeed's partitions."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        view, self._view = self._view, None
        if view is None:
            raise RuntimeError("DeepSpeedEngine.after_checkpoint_load: load a checkpoint into "
                               "checkpoint_optimizer() first")
        params = [p for g in view.param_groups for p in g["params"]]
        steps = {float(view.state[p]["step"]) for p in params if "step" in view.state[p]}
        if len(steps) > 1:
            raise RuntimeError(f"DeepSpeedEngine: the checkpoint's parameters have different step counts "
                               f"{sorted(steps)}")
        step = steps.pop() if steps else 0.0
        if not self._has_state():
            self._create_state(step)
        self._link_state()
        for flat in self._zero.single_partition_of_fp32_groups:
            self._zero.optimizer.state[flat]["step"].fill_(step)
        for p in params:
            safe_set_full_fp32_param(p, p.detach().float())
            for key in ADAM_KEYS:
                if key in view.state[p]:
                    safe_set_full_optimizer_state(p, view.state[p][key].float(), key)

    # ---- memory --------------------------------------------------------------------
    def memory(self) -> Dict[str, int]:
        """Bytes this rank holds, from the live tensors (see ``docs/zero.md``):

        - ``params``: the model's parameters (every rank holds them all, in DeepSpeed's flat buffers)
          plus this rank's fp32 master partition;
        - ``grads``: stage 1: a full gradient per parameter (reduced at the boundary, then cut to this
          rank's partition); stage 2: DeepSpeed's buffer of the gradients of this rank's partition (whole
          parameters: one cut by a partition boundary counts on both sides). Communication buckets
          (``reduce_bucket_size`` elements) are not counted, as for stage 0;
        - ``optimizer``: AdamW's moments of this rank's partitions (``exp_avg``, ``exp_avg_sq``,
          ``step``), as they are or, before the first step, as AdamW will create them.
        """
        zero = self._zero
        params = sum(flat.numel() * flat.element_size() for flat in zero.bit16_groups_flat)
        masters = zero.single_partition_of_fp32_groups
        params += sum(flat.numel() * flat.element_size() for flat in masters)
        if self._has_state():
            optimizer = sum(t.numel() * t.element_size() for flat in masters
                            for t in zero.optimizer.state[flat].values() if isinstance(t, torch.Tensor))
        else:
            optimizer = sum(len(ADAM_KEYS) * flat.numel() * flat.element_size() + 4 for flat in masters)
        if self.stage == 1:
            grads = params_bytes_of(self.model)
        elif zero.grads_in_partition is not None:
            grads = zero.grads_in_partition.numel() * zero.grads_in_partition.element_size()
        else:  # what the first backward allocates: every parameter that has elements in this partition
            grads = sum(p.numel() * p.element_size() for group in zero.params_in_partition for p in group)
        return {"params": int(params), "grads": int(grads), "optimizer": int(optimizer)}


def params_bytes_of(model: nn.Module) -> int:
    """Bytes of every trainable parameter of ``model`` (what a full gradient set takes)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
