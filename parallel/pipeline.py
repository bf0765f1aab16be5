"""Pipeline parallelism: our glue around ``torch.distributed.pipelining``.

Legend (words, no glossary letters): ``pp`` pipeline ranks, ``virtual_stages`` chunks
per rank (``pp x virtual_stages`` chunks in all), ``num_micro`` micro-batches per
optimizer step on this data-parallel rank (the accumulation count).

Who does what:
- ``parallel.stages.StagePlan`` says which blocks each chunk holds (chunk c on pp rank
  c % pp); ``StageRole`` is this rank's part of it plus the pp group, handed to the model
  (``model.pipe``): the model builds only its blocks (first stage: the embeddings; last:
  the final norm and the head), and its ``run_pieces`` relays the state through the
  stages without gradients for evaluation (``StageRole.relay``).
- ``PipelineEngine`` (the engine verbs of ``parallel.engine``) trains: one
  ``PipelineStage`` per chunk around a ``_Chunk`` module, driven by torch's schedule
  (``gpipe``: ``ScheduleGPipe``, ``1f1b``: ``Schedule1F1B``, ``interleaved_1f1b``:
  ``ScheduleInterleaved1F1B``) over the ``num_micro`` micro-batches.

How a micro-batch runs: every chunk gets the micro-batch index m (a keyword tensor the
schedule splits for every stage) and fetches micro-batch m itself (data is a function of
(seed, step, sample index), ``moe.tasks.base``), so only the activations travel. Its
blocks run under ``parallel.rng.micro_batch_scope(seed of m)``, so they draw the
random numbers one process draws. The last chunk returns the loss: the task loss plus
its own blocks' aux losses.

Aux losses of the other chunks (MoE balancing losses, ``moe.losses``) are not part of
any stage's output: ``AttachAux`` ties their sum to the chunk's output activation, an
identity whose backward also hands the aux sum the gradient 1 (Megatron-core's
MoE aux-loss trick), so their gradient reaches the routers with the same scale as in
one process. Gradients are summed over the micro-batches and divided by ``num_micro``
afterwards (= one process back-propagating loss / num_micro per micro-batch). Logs (the task
loss and every aux loss, per micro-batch) are gathered over the pp group, so every
rank sees the whole loss.

The engine passes all stage shapes to ``PipelineStage`` (``input_args`` /
``output_args`` / ``input_grads`` / ``output_grads``): without them each stage runs an
extra forward to infer shapes, which would push tokens through the MoE layers once more:
their load statistics would count it and the aux-loss-free expert bias would move on it
(``docs/pipeline_parallelism.md``, "How a micro-batch runs").

What the engine needs from the task and its model is typed here, not imported: ``PipelineTask``
(``model``, ``model_inputs``, ``fp32_output_loss``) and ``StagedModel``, the pipeline protocol
(``pipe_embed``, ``pipe_blocks``, ``pipe_head``, ``state_shapes``; ``moe.models.transformer.
TransformerModel`` implements it), which a model must implement besides being an ``nn.Module``.

Mixed precision (``parallel.precision``): each chunk runs under the precision's autocast, the
last chunk's loss in fp32 (``fp32_output_loss``). The stage tensors keep the parameters' dtype,
fp32: autocast leaves the residual stream in fp32 (a bf16 matmul output added to an fp32
stream is fp32), so a pipeline trains the numbers of one process in every precision. With fp16
loss scaling every loss term (the last chunk's loss and each ``AttachAux`` sum) is multiplied
by ``loss_scale`` before the backward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn

from .checks import check_int
from .dims import ProcessGroups
from .engine import EngineBase, MakeOptimizer
from .grads import allreduce_gradients, sync_replicas
from .objects import all_gather_objects, broadcast_object
from .precision import FP32, Precision
from .rng import micro_batch_scope
from .shards import mark_partial_grad
from .stages import StagePlan

__all__ = ["SCHEDULES", "StageRole", "AttachAux", "PipelineEngine", "PipelineTask", "StagedModel", "StageState",
           "check_schedule"]

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")

# MicroFn(m) -> (batch dict, torch seed) of this rank's micro-batch m of the current step
MicroFn = Callable[[int], Tuple[dict, int]]
# The state passed between chunks: the model's streams (None where a part is absent, e.g. LIMoE's text)
StageState = Tuple[Optional[torch.Tensor], ...]


@runtime_checkable
class StagedModel(Protocol):
    """The pipeline protocol: a model cut into stages, besides being an ``nn.Module`` (module doc)."""

    def pipe_embed(self, *inputs: Any) -> StageState:
        """The first chunk: model inputs -> the state entering its first block."""
        ...

    def pipe_blocks(self, state: StageState, inputs: tuple,
                    block_ids: Sequence[int]) -> Tuple[StageState, Dict[str, torch.Tensor]]:
        """Blocks ``block_ids`` on the state: (state, aux losses summed by name)."""
        ...

    def pipe_head(self, state: StageState, inputs: tuple) -> tuple:
        """The last chunk: the state after the last block -> the model's outputs."""
        ...

    def state_shapes(self, inputs: tuple) -> list:
        """The shape of each state tensor for these inputs (None where a part is absent)."""
        ...


class PipelineTask(Protocol):
    """What ``PipelineEngine`` needs from a task (``moe.tasks.base.Task``)."""

    @property
    def model(self) -> nn.Module:
        """This rank's stage of the model (a ``StagedModel``)."""
        ...

    def model_inputs(self, batch: dict) -> tuple:
        """The model's positional inputs taken from a batch."""
        ...

    def fp32_output_loss(self, outputs: tuple, batch: dict) -> Tuple[torch.Tensor, Dict[str, float]]:
        """(task loss in fp32, extra float logs) of the model's outputs on a batch."""
        ...


def _staged(model: nn.Module, who: str) -> StagedModel:
    """``model`` as the ``StagedModel`` it must be (``who`` names the caller in the error)."""
    if not isinstance(model, StagedModel):
        raise TypeError(f"{who}: {type(model).__name__} does not implement the pipeline protocol (pipe_embed, "
                        "pipe_blocks, pipe_head, state_shapes: parallel.pipeline.StagedModel)")
    return model


def check_schedule(schedule: str, pp: int, virtual_stages: int, num_micro: int) -> Optional[str]:
    """Why ``num_micro`` micro-batches cannot run ``schedule`` on ``pp`` x ``virtual_stages``
    chunks (None when they can)."""
    if schedule not in SCHEDULES:
        return f"schedule must be one of {SCHEDULES}, got {schedule!r}"
    if schedule != "interleaved_1f1b" and virtual_stages != 1:
        return f"virtual_stages={virtual_stages} needs the interleaved_1f1b schedule (got {schedule!r})"
    if schedule == "interleaved_1f1b" and virtual_stages < 2:
        return "the interleaved_1f1b schedule needs virtual_stages >= 2 (with 1 use 1f1b)"
    if schedule in ("1f1b", "interleaved_1f1b") and num_micro < pp:
        return (f"the {schedule} schedule needs at least pp={pp} micro-batches per step on each data-parallel "
                f"rank, got {num_micro} (raise train.global_batch_size or lower train.micro_batch_size, "
                "or use gpipe)")
    if schedule == "interleaved_1f1b":
        rounds = max(1, num_micro // pp)
        if num_micro % rounds:
            return (f"the interleaved_1f1b schedule runs the micro-batches in rounds of pp={pp}: {num_micro} "
                    f"micro-batches per step must be a multiple of {rounds} (use a multiple of pp)")
    return None


# --------------------------------------------------------------------------------------
@dataclass
class StageRole:
    """This rank's place in the pipeline: what ``model.pipe`` holds.

    ``plan``: the ``StagePlan``; ``rank``: this rank's index in the pp group;
    ``group`` / ``group_ranks``: the pp group and its global ranks (stage order). A stage's model
    built without processes (a test, a memory estimate) leaves them out; running the pipeline
    (``relay``, the engine) needs them.
    """

    plan: StagePlan
    rank: int
    group: Optional[dist.ProcessGroup] = field(default=None, repr=False)
    group_ranks: Sequence[int] = ()

    @classmethod
    def from_groups(cls, plan: StagePlan, groups: ProcessGroups) -> StageRole:
        return cls(plan=plan, rank=groups.pp_rank, group=groups.pp_group, group_ranks=list(groups.group_ranks["pp"]))

    @property
    def chunks(self) -> List[int]:
        return self.plan.chunks_of_rank(self.rank)

    @property
    def block_ids(self) -> List[int]:
        return self.plan.blocks_of_rank(self.rank)

    @property
    def is_first(self) -> bool:
        return self.plan.is_first(self.rank)

    @property
    def is_last(self) -> bool:
        return self.plan.is_last(self.rank)

    def mark_tied(self, param: torch.Tensor) -> None:
        """``param`` lives on the first and the last stage (a tied embedding / head): its gradient
        is the sum of both copies' (``parallel.grads``, group "pp_ends")."""
        mark_partial_grad(param, "pp_ends")

    def _global(self, chunk: int) -> int:
        return self.group_ranks[self.plan.rank_of_chunk(chunk)]

    def pp_group(self) -> dist.ProcessGroup:
        """The pp group, which running the pipeline needs (``from_groups`` sets it)."""
        if self.group is None or not self.group_ranks:
            raise RuntimeError("StageRole: this stage was built without its pp group (StageRole.from_groups "
                               "gives it one); it can build the stage's model but not run the pipeline")
        return self.group

    @torch.no_grad()
    def relay(self, model: nn.Module, inputs: tuple,
              then: Optional[Callable[[tuple], Any]] = None) -> Tuple[Any, Dict[str, torch.Tensor]]:
        """The whole model's ``(outputs, aux)`` without gradients: each chunk on its rank, the
        state sent on point to point, the last stage's outputs broadcast to every pp rank.

        ``then``: run on the last stage's outputs there, and broadcast its result instead (a
        loss, not the logits). Every rank of the pp group calls it with the same inputs.
        ``aux`` holds this rank's blocks' aux losses only.
        """
        if torch.is_grad_enabled() and model.training:
            raise RuntimeError("under pipeline parallelism the model trains through parallel.pipeline."
                               "PipelineEngine; a direct forward runs without gradients (evaluation)")
        group = self.pp_group()
        pieces = _staged(model, "StageRole.relay")
        shapes = pieces.state_shapes(inputs)
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        aux: Dict[str, torch.Tensor] = {}
        outputs: Any = None
        last = self.plan.num_chunks - 1
        for c in self.chunks:
            state: StageState
            if c == 0:
                state = pieces.pipe_embed(*inputs)
            else:
                state = tuple(None if s is None else torch.empty(s, dtype=dtype, device=device) for s in shapes)
                for t in state:
                    if t is not None:
                        dist.recv(t, src=self._global(c - 1), group=group)
            state, a = pieces.pipe_blocks(state, inputs, self.plan.chunks[c])
            for k, v in a.items():
                aux[k] = aux[k] + v if k in aux else v
            if c == last:
                outputs = pieces.pipe_head(state, inputs)
                if then is not None:
                    outputs = then(outputs)
            else:
                for t in state:
                    if t is not None:
                        dist.send(t.contiguous(), dst=self._global(c + 1), group=group)
        return broadcast_object(outputs, group, src=dist.get_group_rank(group, self._global(last))), aux


class AttachAux(torch.autograd.Function):
    """``AttachAux.apply(x, aux)`` is x; its backward also gives ``aux`` (a 0-d loss) the
    gradient 1, as if ``aux`` had been added to the final loss."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        shape, dtype, device = ctx.aux_meta
        return grad, torch.ones(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------
class _Chunk(nn.Module):
    """One chunk's forward for ``PipelineStage``: ``forward(*state, mb)`` -> state, or the loss on the
    last chunk. Holds the model by reference (the engine owns the parameters and their gradients)."""

    def __init__(self, engine: "PipelineEngine", chunk: int):
        super().__init__()
        self._engine = [engine]  # not a submodule
        self.chunk = chunk
        plan = engine.role.plan
        self.block_ids = plan.chunks[chunk]
        self.first, self.last = chunk == 0, chunk == plan.num_chunks - 1

    def forward(self, *state: torch.Tensor, mb: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
        engine = self._engine[0]
        model, task = engine.pieces, engine.task
        m = int(mb.reshape(-1)[0])
        batch, seed = engine.micro_batch(m)
        inputs = task.model_inputs(batch)
        with micro_batch_scope(seed), engine.precision.autocast(engine.device.type):
            current: StageState = tuple(model.pipe_embed(*inputs) if self.first else state)
            current, aux = model.pipe_blocks(current, inputs, self.block_ids)
            head = model.pipe_head(current, inputs) if self.last else None
        logs = engine.logs.setdefault(m, {"aux": {}})
        for k, v in aux.items():
            logs["aux"][k] = logs["aux"].get(k, 0.0) + float(v.detach())
        scale = engine.loss_scale  # fp16 loss scaling: every loss term scaled before the backward
        if head is not None:  # the last chunk
            task_loss, extra = task.fp32_output_loss(head, batch)
            logs["task_loss"], logs["extra"] = float(task_loss.detach()), extra
            total = task_loss
            for v in aux.values():
                total = total + v
            return total if scale == 1.0 else total * scale
        out = tuple(t for t in current if t is not None)
        if aux:
            aux_total = sum(aux.values())
            out = (AttachAux.apply(out[0], aux_total if scale == 1.0 else aux_total * scale),) + out[1:]
        return out if len(out) > 1 else out[0]


class PipelineEngine(EngineBase):
    """Trains ``task.model`` (this rank's stage) with a torch pipelining schedule (module doc).

    ``task``: the rank's task (``model_inputs``, ``output_loss``); ``groups``: its
    ``ProcessGroups``; ``role``: its ``StageRole`` (the model's ``pipe``);
    ``schedule``: one of ``SCHEDULES``; ``num_micro``: micro-batches per step; ``sample_batch``: a micro-batch
    (to size the stage tensors); ``make_optimizer`` as for ``ReplicatedEngine``.
    """

    def __init__(self, task: PipelineTask, groups: ProcessGroups, role: StageRole, make_optimizer: MakeOptimizer,
                 *, schedule: str, num_micro: int, sample_batch: dict, device: torch.device | str,
                 precision: Precision = FP32):
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
        )

        check_int("num_micro", num_micro, minimum=1)
        problem = check_schedule(schedule, role.plan.pp, role.plan.virtual_stages, num_micro)
        if problem:
            raise ValueError(f"PipelineEngine: {problem}")
        self.task, self.model, self.groups, self.role = task, task.model, groups, role
        self.pieces = _staged(self.model, "PipelineEngine")  # the model again, as its pipeline protocol
        self.num_micro, self.precision = num_micro, precision
        self.device = torch.device(device)
        sync_replicas(self.model, groups)
        self.optimizer = make_optimizer(self.model)
        self.logs: Dict[int, dict] = {}
        self._micro: Optional[MicroFn] = None
        self._cache: Dict[int, Tuple[dict, int]] = {}
        dtype = next(self.model.parameters()).dtype
        shapes = [s for s in self.pieces.state_shapes(task.model_inputs(sample_batch)) if s is not None]

        # activations require grad (the stages send gradients back), grads not
        def metas(grad: bool = True) -> Tuple[torch.Tensor, ...]:
            return tuple(torch.empty(s, dtype=dtype, device=self.device, requires_grad=grad) for s in shapes)

        self.chunks: List[_Chunk] = []
        stages: List[PipelineStage] = []
        plan = role.plan
        for c in role.chunks:
            chunk = _Chunk(self, c)
            ins = () if chunk.first else metas()
            outs = (torch.empty((), dtype=torch.float32, device=self.device, requires_grad=True),) if chunk.last \
                else metas()
            stages.append(PipelineStage(chunk, c, plan.num_chunks, self.device, input_args=ins, output_args=outs,
                                        input_grads=() if chunk.first else metas(False),
                                        output_grads=(None,) if chunk.last else metas(False), group=role.pp_group()))
            self.chunks.append(chunk)
        kinds = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}
        first = stages if schedule == "interleaved_1f1b" else stages[0]
        self.schedule = kinds[schedule](first, n_microbatches=num_micro, loss_fn=lambda loss, target: loss,
                                        scale_grads=False)
        self.holds_last = any(c.last for c in self.chunks)

    def micro_batch(self, m: int) -> Tuple[dict, int]:
        """Micro-batch ``m`` of the running step and its seed (fetched once: every chunk of this rank asks)."""
        if self._micro is None:
            raise RuntimeError("PipelineEngine.micro_batch: called outside forward_backward (no step is running)")
        if m not in self._cache:
            self._cache[m] = self._micro(m)
        return self._cache[m]

    def forward_backward(self, num_micro: int, micro: MicroFn) -> List[Dict[str, float]]:
        """One step's forward and backward over ``num_micro`` micro-batches (``micro(m)`` gives
        micro-batch m and its seed); returns every micro-batch's logs (the whole model's: task
        loss, each aux loss summed over all stages, ``loss``), the same on every pp rank."""
        if num_micro != self.num_micro:
            raise ValueError(f"PipelineEngine was built for {self.num_micro} micro-batches, got {num_micro}")
        self.optimizer.zero_grad(set_to_none=True)
        self._micro, self._cache, self.logs = micro, {}, {}
        index = torch.arange(num_micro, device=self.device)
        try:
            self.schedule.step(mb=index, target=index if self.holds_last else None, return_outputs=False)
        except RuntimeError as e:  # torch wraps a stage's error ("[Stage c] failed to run forward"): raise ours
            if e.__cause__ is not None:
                raise e.__cause__ from e
            raise
        finally:
            self._micro, self._cache = None, {}
        for p in self.model.parameters():  # the schedule summed the micro-batches' gradients
            if p.grad is not None:
                p.grad.div_(num_micro)
        allreduce_gradients(self.model, self.groups)
        return self._merge_logs(num_micro)

    def _merge_logs(self, num_micro: int) -> List[Dict[str, float]]:
        every: List[Dict[int, dict]] = all_gather_objects(self.logs, self.role.pp_group())
        out: List[Dict[str, float]] = []
        for m in range(num_micro):
            aux: Dict[str, float] = {}
            task_loss: Optional[float] = None
            extra: Dict[str, float] = {}
            for logs in every:
                entry = logs.get(m)
                if entry is None:
                    continue
                for k, v in entry["aux"].items():
                    aux[k] = aux.get(k, 0.0) + v
                if "task_loss" in entry:
                    task_loss, extra = entry["task_loss"], entry["extra"]
            if task_loss is None:
                raise RuntimeError(f"pipeline: no stage reported the loss of micro-batch {m}")
            out.append({**aux, **extra, "task_loss": task_loss, "loss": task_loss + sum(aux.values())})
        return out
