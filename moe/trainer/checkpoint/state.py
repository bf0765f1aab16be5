"""What a checkpoint holds: the model's and the optimizer's tensors under global-expert keys.

Legend: E experts (global), E_l experts on this rank, g a global expert index.

Layout of the saved state dict (flat keys; DCP stores one entry per key):

    model.<param or buffer name>                 dense tensors, replicated on every rank
    model.<experts module>.w1.expert_<g>         one expert's slice of a stacked tensor
    optim.<param name>.<state key>               AdamW exp_avg / exp_avg_sq / step
    optim.<experts module>.w1.expert_<g>.<key>   ... split per expert like the weights
    trainer.step                                 optimizer steps done (= data position)

Every key holds the GLOBAL tensor, whatever the layout that saved it: the same
shapes a one-process model has. The functions here return views of the live
tensors, so DCP writes them as they are and loads into them in place.

An expert-parallel rank holds experts ``first_expert .. first_expert + E_l - 1`` of
every MoE layer, so it declares only those ``expert_<g>`` keys: the key sets differ
between ranks. DCP handles that natively for plain tensors (each key is written by
one of the ranks that declare it: replicated dense tensors and the copies of an
expert on expert-data-parallel replicas are deduplicated by its save planner, and
the metadata is the union). Loading declares the keys of the experts *this* rank
holds under the new layout and DCP reads them in place into slices of the stacked
parameters, so a checkpoint saved at one expert-parallel size loads at any other
that divides E.

Tensor-parallel pieces (``parallel.shards``: a parameter with a ``TensorShard``,
piece ``rank`` of ``size`` along ``dim`` over the "tp" or "etp" group) are declared
as a ``DTensor`` over a 1-D ``DeviceMesh`` of that group with placement
``Shard(dim)`` and the global shape (``global_len`` along ``dim``). DCP then stores
each piece as one chunk at its global offset (the metadata holds the global shape
and the chunk list; the copies of a piece on data-parallel replicas are
deduplicated like replicated tensors) and, on load, reads whatever part of the
stored chunks overlaps each rank's piece, so a checkpoint loads at any tp / etp
that divides the split dimension, a one-process model included, and a tensor-
parallel model loads a checkpoint saved whole. Only the real rows of a piece are
declared (the first ``shard.real_len(local_len)`` along ``dim``): the padding rows
of a padded vocabulary are never saved and are left untouched by a load. DTensor
cuts a dimension the way ``torch.chunk`` does (pieces of ceil(global_len / size),
the last ones shorter or empty), which is the padding rule of ``parallel.shards``.
An expert weight that is an etp piece (w1 [E_l, D, F_l] along dim 2, w2 and b1
along dim 1) is split per expert first; each ``expert_<g>`` slice is then the etp
piece of that expert along ``dim - 1``. The optimizer's exp_avg / exp_avg_sq have
their parameter's shape and are stored the same way; ``step`` is a plain scalar.
Saving and loading pieces need the ``ProcessGroups`` (``groups=``).

ZeRO on FSDP2 (``parallel.zero_fsdp``): parameters and their AdamW moments are
``DTensor`` s sharded on dim 0. A dense one already carries its global shape and
offset and is declared as it is (DCP stores the shards as chunks of the global
tensor). A stacked expert tensor is a dim-0 shard of this expert-parallel rank's
E_l experts over its expert-data-parallel group, i.e. whole experts: the local
experts are declared as plain ``expert_<g>`` tensors, g counted from the shard's
offset. Both load into any layout and zero stage, and a checkpoint of any layout
loads into them (the shards are filled in place).

Optimizer state: AdamW (or Adam) only; missing state (a fresh optimizer) is
created as zeros before loading so DCP has tensors to read into.

``LAYOUT_VERSION`` numbers how fused weights are laid out inside these global
tensors; ``trainer.json`` records it and loading refuses another version
(``moe.trainer.checkpoint.mismatch``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from moe.experts import Experts
from parallel.dims import ProcessGroups
from parallel.grads import is_expert_param
from parallel.shards import TensorShard, shard_of

from .errors import CheckpointError

# Version of the global tensor layouts a checkpoint holds (``trainer.json``'s "layout_version").
# 2: attention qkv rows head-major and SwiGLU units gate/up side by side (parallel.shards), so
# a tensor-parallel piece is one contiguous slice. Checkpoints without it (version 1) hold qkv
# as (q, k, v) blocks and SwiGLU as (gate, up) halves: they would load, into the wrong places.
LAYOUT_VERSION = 2


def _expert_modules(model: nn.Module) -> Dict[str, Experts]:
    """Expert-parallel ``Experts`` modules by qualified name (shared experts excluded)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Experts) and is_expert_param(mod.w1):
            out[name] = mod
    return out


def _param_names(model: nn.Module) -> Dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


class _Pieces:
    """Wraps tensor-parallel pieces as DTensors at their global offsets (one mesh per group)."""

    def __init__(self, groups: Optional[ProcessGroups]) -> None:
        self.groups = groups
        self._meshes: Dict[Tuple[str, str], DeviceMesh] = {}

    def _mesh(self, name: str, shard: TensorShard, device_type: str):
        key = (shard.group, device_type)
        if key not in self._meshes:
            if self.groups is None:
                raise CheckpointError(
                    f"'{name}' is a tensor-parallel piece ({shard}); pass groups= (the parallel.ProcessGroups "
                    f"of this run) to save or load it at its global offset")
            group = {"tp": self.groups.tp_group, "etp": self.groups.etp_group}[shard.group]  # SHARD_GROUPS
            self._meshes[key] = DeviceMesh.from_group(group, device_type)
        mesh = self._meshes[key]
        if mesh.size() != shard.size or mesh.get_local_rank() != shard.rank:
            raise CheckpointError(
                f"'{name}' is piece {shard.rank} of {shard.size} over '{shard.group}', but this rank is "
                f"{mesh.get_local_rank()} of {mesh.size()} in that group of the ProcessGroups given")
        return mesh

    def wrap(self, name: str, t: torch.Tensor, shard: Optional[TensorShard]) -> torch.Tensor:
        """``t`` (detached) as DCP should declare it: itself, or its real rows as a DTensor piece."""
        if shard is None:
            return t
        local = t.shape[shard.dim]
        if -(-shard.global_len // shard.size) != local:
            # DTensor (torch.chunk) pieces are ceil(global_len / size) long: padding must fit in that rule
            raise CheckpointError(f"'{name}': a piece of length {local} along dim {shard.dim} does not cut "
                                  f"{shard.global_len} into {shard.size} pieces of ceil(global_len / size)")
        mesh = self._mesh(name, shard, t.device.type)
        shape = torch.Size(shard.global_shape(t.shape))
        stride = torch.empty(shape, device="meta").stride()  # the global tensor's (contiguous) strides
        real = t.narrow(shard.dim, 0, shard.real_len(local))  # a view: loading writes the live tensor
        return DTensor.from_local(real, mesh, [Shard(shard.dim)], run_check=False, shape=shape, stride=stride)


def _expert_slice_shard(name: str, shard: Optional[TensorShard]) -> Optional[TensorShard]:
    """The shard of one expert's slice ``t[i]`` of a stacked expert tensor marked with ``shard``."""
    if shard is None:
        return None
    if shard.dim == 0:
        raise CheckpointError(f"'{name}': a stacked expert tensor cannot be a tensor-parallel piece along "
                              f"the expert dimension (experts are split by expert parallelism)")
    return dataclasses.replace(shard, dim=shard.dim - 1)


def _expert_rows(name: str, t: torch.Tensor, shard: Optional[TensorShard]) -> Tuple[torch.Tensor, int]:
    """The experts (dim-0 rows) of a stacked expert tensor this rank holds and the local index of the first.

    A plain tensor: itself and 0. A ``DTensor`` sharded along the expert dimension (ZeRO on FSDP2,
    ``parallel.zero_fsdp``: an expert-parallel rank's E_l experts split over its expert-data-parallel
    group): its local shard (a view, so loading writes the live shard) and that shard's offset.
    """
    if not isinstance(t, DTensor):
        return t, 0
    if shard is not None or any(not (pl.is_replicate() or pl.is_shard(0)) for pl in t.placements):
        raise CheckpointError(f"'{name}' is a DTensor with placements {tuple(t.placements)}"
                              + (f" and a tensor-parallel piece ({shard})" if shard is not None else "")
                              + ": expert tensors are saved per expert only when split along the expert dimension")
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local(), int(offset[0])


def _dense(name: str, t: torch.Tensor, shard: Optional[TensorShard]) -> torch.Tensor:
    """A dense tensor as DCP declares it; a ``DTensor`` (ZeRO on FSDP2: a dim-0 shard over the data-parallel
    ranks) carries its global shape and offset already."""
    if isinstance(t, DTensor) and shard is not None:
        raise CheckpointError(f"'{name}' is both a DTensor {tuple(t.placements)} and a tensor-parallel piece "
                              f"({shard}): ZeRO on FSDP2 does not compose with tensor parallelism")
    return t


def model_state_dict(model: nn.Module, groups: Optional[ProcessGroups] = None) -> Dict[str, torch.Tensor]:
    """The model's tensors under global-expert keys (views of the live tensors).

    Dense parameters and buffers keep their ``state_dict`` names; every stacked
    tensor of an expert-parallel ``Experts`` module is split into
    ``<module>.<param>.expert_<g>`` slices. Tensor-parallel pieces become DTensors
    (see this module's doc); they need ``groups`` (a ``parallel.ProcessGroups``).
    """
    pieces = _Pieces(groups)
    experts = _expert_modules(model)
    expert_keys = {f"{m}.{p}" if m else p: mod.first_expert
                   for m, mod in experts.items() for p, _ in mod.named_parameters(recurse=False)}
    out: Dict[str, torch.Tensor] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor):  # e.g. megatron-core layers' ``_extra_state`` (None)
            continue
        shard = shard_of(t)
        t = t.detach()
        if key in expert_keys:
            slice_shard = _expert_slice_shard(key, shard)
            rows, first = _expert_rows(key, t, shard)
            for i in range(rows.shape[0]):
                name = f"{key}.expert_{expert_keys[key] + first + i}"
                out[name] = pieces.wrap(name, rows[i], slice_shard)
        else:
            out[key] = pieces.wrap(key, _dense(key, t, shard), shard)
    return out


def _ensure_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Create zero AdamW state for parameters that have none (so DCP can load into it)."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise CheckpointError(f"checkpoints support Adam/AdamW optimizer state, got {type(optimizer).__name__}")
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state[p]
            if "step" not in st:
                st["step"] = torch.tensor(0.0, dtype=torch.float32,
                                          device=p.device if group.get("capturable") or group.get("fused") else "cpu")
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer,
                         groups: Optional[ProcessGroups] = None) -> Dict[str, torch.Tensor]:
    """Optimizer state under the model's global-expert keys (views of the live tensors).

    State shaped like its parameter (exp_avg, exp_avg_sq) is split and sharded like
    the parameter; scalar state (``step``) is stored as is.
    """
    _ensure_adam_state(optimizer)
    pieces = _Pieces(groups)
    names = _param_names(model)
    first_of: Dict[int, int] = {}
    for mod in _expert_modules(model).values():
        for p in mod.parameters(recurse=False):
            first_of[id(p)] = mod.first_expert
    out: Dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise CheckpointError("the optimizer holds a parameter that is not in the model")
            name, shard = names[id(p)], shard_of(p)
            for k, v in optimizer.state[p].items():
                if not isinstance(v, torch.Tensor):
                    continue
                like_param = v.dim() > 0 and v.shape == p.shape
                if id(p) in first_of:
                    slice_shard = _expert_slice_shard(name, shard) if like_param else None
                    held, first = _expert_rows(name, p.detach(), shard)  # the experts this rank holds
                    rows = _expert_rows(f"{name}.{k}", v, shard)[0] if like_param else None
                    for i in range(held.shape[0]):
                        key = f"{name}.expert_{first_of[id(p)] + first + i}.{k}"
                        # scalar state (step) is shared by every expert slice of the stack
                        out[key] = pieces.wrap(key, rows[i], slice_shard) if rows is not None else v
                else:
                    key = f"{name}.{k}"
                    out[key] = pieces.wrap(key, _dense(key, v, shard) if like_param else v,
                                           shard if like_param else None)
    return out


def full_state_dict(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], step: int,
                    groups: Optional[ProcessGroups] = None) -> Dict[str, Any]:
    """Everything a training checkpoint holds, with ``model.`` / ``optim.`` / ``trainer.`` prefixes.

    ``groups`` (a ``parallel.ProcessGroups``) is needed when the model holds
    tensor-parallel pieces; they are declared as DTensors at their global offsets.
    """
    sd: Dict[str, Any] = {f"model.{k}": v for k, v in model_state_dict(model, groups).items()}
    if optimizer is not None:
        sd.update({f"optim.{k}": v for k, v in optimizer_state_dict(model, optimizer, groups).items()})
    sd["trainer.step"] = torch.tensor(int(step), dtype=torch.int64)
    return sd
