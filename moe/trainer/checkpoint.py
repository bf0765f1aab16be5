"""Checkpoints with ``torch.distributed.checkpoint`` (DCP), experts by GLOBAL index.

Legend: E experts (global), E_l experts on this rank, g a global expert index.

Layout of the saved state dict (flat keys; DCP stores one entry per key):

    model.<param or buffer name>                 dense tensors, replicated on every rank
    model.<experts module>.w1.expert_<g>         one expert's slice of a stacked tensor
    optim.<param name>.<state key>               AdamW exp_avg / exp_avg_sq / step
    optim.<experts module>.w1.expert_<g>.<key>   ... split per expert like the weights
    trainer.step                                 optimizer steps done (= data position)

Every key holds the GLOBAL tensor, whatever the layout that saved it: the same
shapes a one-process model has.

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

Saving is atomic: every rank writes into ``<root>/step_XXXXXXXX.tmp``; after all
ranks finished (DCP's final collective), rank 0 adds ``trainer.json``, renames the
directory to ``step_XXXXXXXX`` and then atomically replaces the ``latest`` pointer
file. A crash mid-save leaves only a ``.tmp`` directory behind and ``latest``
pointing at the previous complete checkpoint. ``root`` must be on a file system
every rank sees (a shared file system on multi-node jobs).

Optimizer state: AdamW (or Adam) only; missing state (a fresh optimizer) is
created as zeros before loading so DCP has tensors to read into.

``trainer.json`` records ``layout_version`` (``LAYOUT_VERSION``: how fused weights
are laid out); loading a checkpoint of another version is refused with a clear error
instead of filling attention and SwiGLU weights into the wrong places.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from moe.experts import Experts
from parallel.grads import is_expert_param
from parallel.shards import TensorShard, shard_of

LATEST = "latest"
# Version of the global tensor layouts a checkpoint holds (``trainer.json``'s "layout_version").
# 2: attention qkv rows head-major and SwiGLU units gate/up side by side (parallel.shards), so
# a tensor-parallel piece is one contiguous slice. Checkpoints without it (version 1) hold qkv
# as (q, k, v) blocks and SwiGLU as (gate, up) halves: they would load, into the wrong places.
LAYOUT_VERSION = 2
_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model."""


# --------------------------------------------------------------------------------------
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

    def __init__(self, groups) -> None:
        self.groups = groups
        self._meshes: Dict[Tuple[str, str], Any] = {}

    def _mesh(self, name: str, shard: TensorShard, device_type: str):
        key = (shard.group, device_type)
        if key not in self._meshes:
            if self.groups is None:
                raise CheckpointError(
                    f"'{name}' is a tensor-parallel piece ({shard}); pass groups= (the parallel.ProcessGroups "
                    f"of this run) to save or load it at its global offset")
            group = getattr(self.groups, f"{shard.group}_group")
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


def model_state_dict(model: nn.Module, groups=None) -> Dict[str, torch.Tensor]:
    """The model's tensors under global-expert keys (views of the live tensors).

    Dense parameters and buffers keep their ``state_dict`` names; every stacked
    tensor of an expert-parallel ``Experts`` module is split into
    ``<module>.<param>.expert_<g>`` slices. Tensor-parallel pieces become DTensors
    (see the module doc); they need ``groups`` (a ``parallel.ProcessGroups``).
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
            for i in range(t.shape[0]):
                name = f"{key}.expert_{expert_keys[key] + i}"
                out[name] = pieces.wrap(name, t[i], slice_shard)
        else:
            out[key] = pieces.wrap(key, t, shard)
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


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, groups=None) -> Dict[str, torch.Tensor]:
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
                    for i in range(p.shape[0]):
                        key = f"{name}.expert_{first_of[id(p)] + i}.{k}"
                        # scalar state (step) is shared by every expert slice of the stack
                        out[key] = pieces.wrap(key, v[i], slice_shard) if like_param else v
                else:
                    key = f"{name}.{k}"
                    out[key] = pieces.wrap(key, v, shard if like_param else None)
    return out


def full_state_dict(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], step: int,
                    groups=None) -> Dict[str, Any]:
    """Everything a training checkpoint holds, with ``model.`` / ``optim.`` / ``trainer.`` prefixes.

    ``groups`` (a ``parallel.ProcessGroups``) is needed when the model holds
    tensor-parallel pieces; they are declared as DTensors at their global offsets.
    """
    sd: Dict[str, Any] = {f"model.{k}": v for k, v in model_state_dict(model, groups).items()}
    if optimizer is not None:
        sd.update({f"optim.{k}": v for k, v in optimizer_state_dict(model, optimizer, groups).items()})
    sd["trainer.step"] = torch.tensor(int(step), dtype=torch.int64)
    return sd


# --------------------------------------------------------------------------------------
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every save/load without a process group; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"{_PREFIX}{step:08d}")


def latest_checkpoint(root: str) -> Optional[str]:
    """The directory ``<root>/latest`` points at, or None when there is none yet."""
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(root, name)
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise CheckpointError(f"{pointer} points at {path!r}, which is not a complete checkpoint")
    return path


def list_checkpoints(root: str) -> List[str]:
    """Complete checkpoint directories under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith(_PREFIX) and not n.endswith(".tmp")
                   and os.path.isfile(os.path.join(root, n, ".metadata")))
    return [os.path.join(root, n) for n in names]


def save_checkpoint(root: str, step: int, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    *, meta: Optional[Dict[str, Any]] = None, keep: int = 0, process_group=None,
                    groups=None) -> str:
    """Save a checkpoint of ``step`` under ``root`` (collective: every rank calls it).

    Returns the checkpoint directory. ``meta`` (JSON-able) goes into
    ``trainer.json`` next to DCP's files. ``keep > 0`` deletes all but the newest
    ``keep`` checkpoints afterwards. ``groups`` (a ``parallel.ProcessGroups``):
    required when the model holds tensor-parallel pieces.
    """
    final = step_dir(root, step)
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):  # leftover from a crash during an earlier save
            shutil.rmtree(tmp)
    _barrier()
    with _quiet_single_process():
        dcp.save(full_state_dict(model, optimizer, step, groups), checkpoint_id=tmp, process_group=process_group,
                 no_dist=not dist.is_initialized())
    _barrier()
    if _rank() == 0:
        info = {"step": int(step), "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "torch": torch.__version__, "layout_version": LAYOUT_VERSION, **(meta or {})}
        with open(os.path.join(tmp, "trainer.json"), "w") as f:
            json.dump(info, f, indent=2, default=str)
        if os.path.exists(final):  # saving the same step again (e.g. after a resume)
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        pointer_tmp = os.path.join(root, LATEST + ".tmp")
        with open(pointer_tmp, "w") as f:
            f.write(os.path.basename(final) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, os.path.join(root, LATEST))
        if keep > 0:
            for old in list_checkpoints(root)[:-keep]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, or a root holding a ``latest`` pointer -> the directory."""
    if os.path.isfile(os.path.join(path, ".metadata")):
        return path
    found = latest_checkpoint(path) if os.path.isdir(path) else None
    if found is None:
        raise CheckpointError(f"{path!r} is neither a checkpoint directory (with DCP's .metadata) "
                              f"nor a directory with a '{LATEST}' pointer")
    return found


def _check_against(path: str, sd: Dict[str, Any]) -> None:
    """Clear errors for keys the checkpoint lacks or holds with another (global) shape.

    A DTensor's ``shape`` is the global shape, as is the stored ``size``.
    """
    reader = dcp.FileSystemReader(path)
    stored = reader.read_metadata().state_dict_metadata
    missing = sorted(k for k in sd if k not in stored)
    if missing:
        experts = [k for k in missing if ".expert_" in k]
        hint = (" (expert keys are missing: was it saved with fewer experts?)" if experts else
                " (was it saved from a different model?)")
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} key(s) this model needs, e.g. "
                              f"{missing[:4]}{hint}")
    for k, v in sd.items():
        size = getattr(stored[k], "size", None)
        if isinstance(v, torch.Tensor) and size is not None and tuple(size) != tuple(v.shape):
            raise CheckpointError(f"checkpoint {path}: '{k}' has shape {tuple(size)}, the model has "
                                  f"{tuple(v.shape)}")


def _check_layout_version(path: str) -> None:
    info_path = os.path.join(path, "trainer.json")
    if not os.path.isfile(info_path):  # a bare DCP directory: nothing to check
        return
    with open(info_path) as f:
        version = json.load(f).get("layout_version", 1)
    if version != LAYOUT_VERSION:
        raise CheckpointError(f"checkpoint {path} holds tensor layout version {version}, this code reads "
                              f"version {LAYOUT_VERSION} (attention qkv rows head-major, SwiGLU gate/up per "
                              "unit side by side): its attention and SwiGLU weights would load into the wrong "
                              "places. Load it with the code that wrote it, or retrain")


def load_checkpoint(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    *, process_group=None, groups=None) -> int:
    """Load ``path`` (a checkpoint or a root with ``latest``) in place; returns its step.

    Works at any expert-parallel and tensor-parallel size: each rank reads the
    experts and the pieces it holds now (``groups``, a ``parallel.ProcessGroups``,
    is required when the model holds tensor-parallel pieces). Without
    ``optimizer`` only the model is read. Collective when a process group is
    initialised.
    """
    path = resolve_checkpoint(path)
    _check_layout_version(path)
    sd = full_state_dict(model, optimizer, 0, groups)
    _check_against(path, sd)
    with _quiet_single_process():
        dcp.load(sd, checkpoint_id=path, process_group=process_group, no_dist=not dist.is_initialized())
    return int(sd["trainer.step"])
