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

ZeRO on FSDP2 (``parallel.zero_fsdp``): parameters and their AdamW moments are
``DTensor`` s sharded on dim 0. A dense one already carries its global shape and
offset and is declared as it is (DCP stores the shards as chunks of the global
tensor). A stacked expert tensor is a dim-0 shard of this expert-parallel rank's
E_l experts over its expert-data-parallel group, i.e. whole experts: the local
experts are declared as plain ``expert_<g>`` tensors, g counted from the shard's
offset. Both load into any layout and zero stage, and a checkpoint of any layout
loads into them (the shards are filled in place).

Saving is atomic: every rank writes into ``<root>/step_XXXXXXXX.tmp``; after all
ranks finished (DCP's final collective) the ranks hash the files DCP wrote (split
over the ranks), and rank 0 adds ``trainer.json``, then, last, ``manifest.json``
(size and sha256 of every other file of the directory), renames the directory to
``step_XXXXXXXX`` and then atomically replaces the ``latest`` pointer file. A crash
mid-save leaves only a ``.tmp`` directory behind and ``latest`` pointing at the
previous complete checkpoint. ``root`` must be on a file system every rank sees (a
shared file system on multi-node jobs).

Loading checks before it reads a tensor: the layout version, every file against the
manifest (``verify_checkpoint``: a missing, truncated or changed file is a
``CorruptCheckpointError`` naming that file; checkpoints without a manifest, written
before it existed, load unchecked), and the key set and global shapes against the
model over all ranks together (a key the model needs and the checkpoint lacks, a
model key stored that no rank declares, a shape that differs: one ``CheckpointError``
on every rank, naming the differing config keys when ``model_config`` is given).

``latest_checkpoint`` is the checkpoint ``latest`` names; without the pointer, or
when it names no complete checkpoint, the newest complete ``step_<N>``. ``trainer.json`` holds
the ``run_id`` of the run that wrote the checkpoint; ``keep`` prunes only the
checkpoints of the saving ``run_id``, and a checkpoint of the same step written by
another run is never replaced (``moe/trainer/resume.py`` decides which run a job
continues).

Optimizer state: AdamW (or Adam) only; missing state (a fresh optimizer) is
created as zeros before loading so DCP has tensors to read into.

``trainer.json`` records ``layout_version`` (``LAYOUT_VERSION``: how fused weights
are laid out); loading a checkpoint of another version is refused with a clear error
instead of filling attention and SwiGLU weights into the wrong places.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from moe.experts import Experts
from parallel.grads import is_expert_param
from parallel.objects import all_gather_objects, broadcast_object, group_rank, group_size
from parallel.shards import TensorShard, shard_of

LATEST = "latest"
INFO = "trainer.json"
MANIFEST = "manifest.json"
UNKNOWN_RUN = "<unknown: trainer.json unreadable>"  # run_of() of a checkpoint whose trainer.json is damaged
# Version of the global tensor layouts a checkpoint holds (``trainer.json``'s "layout_version").
# 2: attention qkv rows head-major and SwiGLU units gate/up side by side (parallel.shards), so
# a tensor-parallel piece is one contiguous slice. Checkpoints without it (version 1) hold qkv
# as (q, k, v) blocks and SwiGLU as (gate, up) halves: they would load, into the wrong places.
LAYOUT_VERSION = 2
_PREFIX = "step_"
_STEP_NAME = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files are damaged: missing, truncated or with other bytes than at save time."""


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
                    held, first = _expert_rows(name, p.detach(), shard)  # the experts this rank holds
                    rows = _expert_rows(f"{name}.{k}", v, shard)[0] if like_param else None
                    for i in range(held.shape[0]):
                        key = f"{name}.expert_{first_of[id(p)] + first + i}.{k}"
                        # scalar state (step) is shared by every expert slice of the stack
                        out[key] = pieces.wrap(key, rows[i], slice_shard) if like_param else v
                else:
                    key = f"{name}.{k}"
                    out[key] = pieces.wrap(key, _dense(key, v, shard) if like_param else v,
                                           shard if like_param else None)
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
# Collectives over ``process_group`` (None: the default group; parallel.objects); plain calls without one.
def _barrier(process_group=None) -> None:
    if group_size(process_group) > 1:
        dist.barrier(group=process_group)


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every save/load without a process group; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


# --------------------------------------------------------------------------------------
# Directories, the ``latest`` pointer, trainer.json
def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"{_PREFIX}{step:08d}")


def step_of(path: str) -> Optional[int]:
    """The step of a checkpoint directory named ``step_<N>``, else None."""
    m = _STEP_NAME.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def _is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ".metadata"))


def checkpoint_dirs(root: str) -> List[str]:
    """Every ``step_<N>`` directory under ``root``, complete or not, by step (no ``.tmp`` / ``.old``)."""
    if not os.path.isdir(root):
        return []
    found = sorted((step_of(n), os.path.join(root, n)) for n in os.listdir(root) if step_of(n) is not None)
    return [p for _, p in found if os.path.isdir(p)]


def list_checkpoints(root: str) -> List[str]:
    """Complete checkpoint directories under ``root`` (with DCP's ``.metadata``), oldest first."""
    return [p for p in checkpoint_dirs(root) if _is_complete(p)]


def resume_candidates(root: str) -> Tuple[List[str], List[str]]:
    """The complete checkpoints under ``root`` in the order to try them, and notes on the pointer.

    First the one ``latest`` names, then every other complete one, newest first. A
    note says when ``latest`` is missing or names no complete checkpoint (a crash
    between the rename of a save and the pointer's update, or a deleted file).
    """
    complete = list_checkpoints(root)
    pointer, named, notes = os.path.join(root, LATEST), None, []
    if os.path.isfile(pointer):
        with open(pointer, errors="replace") as f:
            name = f.read().strip()
        path = os.path.join(root, name)
        if name and name == os.path.basename(name) and path in complete:
            named = path
        else:
            notes.append(f"{pointer} names {name!r}, which is not a complete checkpoint")
    elif complete:
        notes.append(f"{root} has no '{LATEST}' pointer")
    return ([named] if named else []) + [p for p in reversed(complete) if p != named], notes


def latest_checkpoint(root: str) -> Optional[str]:
    """The complete checkpoint ``<root>/latest`` names; without a pointer, or when it names no
    complete checkpoint, the newest complete one; None when there is none."""
    order, _ = resume_candidates(root)
    return order[0] if order else None


def checkpoint_info(path: str) -> Dict[str, Any]:
    """``trainer.json`` of the checkpoint ``path`` ({} for a bare DCP directory without one)."""
    info_path = os.path.join(path, INFO)
    if not os.path.isfile(info_path):
        return {}
    try:
        with open(info_path) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"checkpoint file {info_path} cannot be read ({e})") from None
    if not isinstance(info, dict):
        raise CorruptCheckpointError(f"checkpoint file {info_path} holds a {type(info).__name__}, not a mapping")
    return info


def run_of(path: str) -> Any:
    """The ``run_id`` that wrote ``path`` (None when it recorded none); ``UNKNOWN_RUN`` when
    its ``trainer.json`` cannot be read."""
    try:
        return checkpoint_info(path).get("run_id")
    except CheckpointError:
        return UNKNOWN_RUN


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, or a root holding checkpoints -> its latest (``latest_checkpoint``)."""
    if _is_complete(path):
        return path
    if step_of(path) is not None and os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no .metadata (DCP's index)")
    found = latest_checkpoint(path) if os.path.isdir(path) else None
    if found is None:
        raise CheckpointError(f"{path!r} is neither a checkpoint directory (with DCP's .metadata) "
                              f"nor a directory holding complete step_* checkpoints")
    return found


# --------------------------------------------------------------------------------------
# The manifest: size and sha256 of every file, written last by rank 0
def _digest(path: str) -> Tuple[int, str]:
    with open(path, "rb") as f:
        return os.fstat(f.fileno()).st_size, hashlib.file_digest(f, "sha256").hexdigest()


def _write_synced(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _read_manifest(path: str) -> Dict[str, Dict[str, Any]]:
    """``{relative file name: {"size": bytes, "sha256": hex}}`` of ``<path>/manifest.json``."""
    manifest_path = os.path.join(path, MANIFEST)
    try:
        with open(manifest_path) as f:
            files = json.load(f)["files"]
        ok = isinstance(files, dict) and all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
            and not os.path.isabs(n) and ".." not in n.split("/") for n, e in files.items())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"checkpoint file {manifest_path} cannot be read ({e})") from None
    if not ok:
        raise CorruptCheckpointError(f"checkpoint file {manifest_path} is not a manifest of this format")
    return files


def _check_file(path: str, name: str, entry: Dict[str, Any]) -> Optional[str]:
    """What is wrong with ``<path>/<name>`` against its manifest entry (None: nothing)."""
    full = os.path.join(path, name)
    if not os.path.isfile(full):
        return f"checkpoint file {full} is missing (it is listed in {MANIFEST})"
    try:
        size, sha = _digest(full)
    except OSError as e:
        return f"checkpoint file {full} cannot be read ({e})"
    if size < entry["size"]:
        return f"checkpoint file {full} is truncated: {size} bytes, the manifest says {entry['size']}"
    if size != entry["size"]:
        return f"checkpoint file {full} has {size} bytes, the manifest says {entry['size']}"
    if sha != entry["sha256"]:
        return (f"checkpoint file {full} is damaged: its sha256 is {sha[:16]}..., the manifest written at "
                f"save time says {entry['sha256'][:16]}... (its bytes changed after the save)")
    return None


def verify_checkpoint(path: str, *, process_group=None) -> bool:
    """Check every file of the checkpoint ``path`` against its ``manifest.json``.

    Collective when a process group is initialised: the files are split over the
    ranks, and every rank raises the same ``CorruptCheckpointError``, naming the
    first damaged file (missing, truncated, other bytes). Returns True when every
    file matched, False when the checkpoint has no manifest (one written before
    manifests existed, or a bare DCP directory): nothing could be checked.
    """
    problems: List[str] = []
    has_manifest = os.path.isfile(os.path.join(path, MANIFEST))
    files: Dict[str, Dict[str, Any]] = {}
    if has_manifest:
        try:
            files = _read_manifest(path)
        except CorruptCheckpointError as e:
            problems.append(str(e))
    names = sorted(files)
    for name in names[group_rank(process_group)::group_size(process_group)]:
        problem = _check_file(path, name, files[name])
        if problem:
            problems.append(problem)
    every = all_gather_objects((has_manifest, problems), process_group)
    problems = sorted({p for _, part in every for p in part})
    if problems:
        more = f" (and {len(problems) - 1} more damaged file(s))" if len(problems) > 1 else ""
        raise CorruptCheckpointError(problems[0] + more)
    return every[0][0]


def _write_manifest(tmp: str, digests: Dict[str, Tuple[int, str]]) -> None:
    """Rank 0, after every rank finished: hash what no rank hashed (trainer.json, any file DCP
    wrote besides those its metadata lists), then write ``manifest.json`` last."""
    for where, _, names in os.walk(tmp):
        for n in names:
            rel = os.path.relpath(os.path.join(where, n), tmp).replace(os.sep, "/")
            if rel not in digests and rel != MANIFEST:
                digests[rel] = _digest(os.path.join(tmp, rel))
    files = {n: {"size": size, "sha256": sha} for n, (size, sha) in sorted(digests.items())}
    _write_synced(os.path.join(tmp, MANIFEST), json.dumps({"format": 1, "files": files}, indent=1))


# --------------------------------------------------------------------------------------
def save_checkpoint(root: str, step: int, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    *, meta: Optional[Dict[str, Any]] = None, keep: int = 0, process_group=None,
                    groups=None, run_id: Optional[str] = None) -> str:
    """Save a checkpoint of ``step`` under ``root`` (collective: every rank calls it).

    Returns the checkpoint directory. ``meta`` (JSON-able) goes into
    ``trainer.json`` next to DCP's files, with ``run_id`` (the run writing it).
    A checkpoint of the same step already there is replaced only when the same
    ``run_id`` wrote it, else ``CheckpointError``. ``keep > 0`` deletes all but the
    newest ``keep`` checkpoints of this ``run_id`` afterwards (never another
    run's). ``groups`` (a ``parallel.ProcessGroups``): required when the model
    holds tensor-parallel pieces.
    """
    final = step_dir(root, step)
    tmp = final + ".tmp"
    rank, size = group_rank(process_group), group_size(process_group)
    problem = None
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        owner = run_of(final) if os.path.exists(final) else run_id
        if owner != run_id:
            who = "an unreadable trainer.json" if owner is UNKNOWN_RUN else f"run id {owner!r}"
            problem = (f"{final} already holds a checkpoint of step {step} written by another run ({who}; "
                       f"this run is {run_id!r}): not replacing it. Move it away or use another directory")
        elif os.path.exists(tmp):  # leftover from a crash during an earlier save
            shutil.rmtree(tmp)
    problem = broadcast_object(problem, process_group)
    if problem:
        raise CheckpointError(problem)
    with _quiet_single_process():
        written = dcp.save(full_state_dict(model, optimizer, step, groups), checkpoint_id=tmp,
                           process_group=process_group, no_dist=not dist.is_initialized())
    # every rank finished writing (DCP's final collective): hash the files, split over the ranks
    names = sorted({".metadata", *(s.relative_path for s in written.storage_data.values())})
    mine = {n: _digest(os.path.join(tmp, n)) for n in names[rank::size]}
    digests = {n: d for part in all_gather_objects(mine, process_group) for n, d in part.items()}
    if rank == 0:
        info = {"step": int(step), "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"), "world_size": size,
                "torch": torch.__version__, "layout_version": LAYOUT_VERSION, **(meta or {}), "run_id": run_id}
        _write_synced(os.path.join(tmp, INFO), json.dumps(info, indent=2, default=str))
        _write_manifest(tmp, digests)
        if os.path.exists(final):  # the same step again, from the same run (e.g. after a resume)
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        pointer_tmp = os.path.join(root, LATEST + ".tmp")
        _write_synced(pointer_tmp, os.path.basename(final) + "\n")
        os.replace(pointer_tmp, os.path.join(root, LATEST))
        if keep > 0:
            own = [p for p in list_checkpoints(root) if run_of(p) == run_id]
            for old in own[:-keep]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    _barrier(process_group)
    return final


# --------------------------------------------------------------------------------------
def _flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _differences(saved: Optional[Mapping[str, Any]], current: Optional[Mapping[str, Any]]
                 ) -> Optional[List[Tuple[str, Any, Any]]]:
    """``(key path, saved value, current value)`` for every differing leaf; None if either is unknown."""
    if saved is None or current is None:
        return None
    a = _flatten(saved)
    b = _flatten(json.loads(json.dumps(current, default=str)))  # as trainer.json holds it
    absent = "<absent>"
    return [(k, a.get(k, absent), b.get(k, absent)) for k in sorted(set(a) | set(b))
            if a.get(k, absent) != b.get(k, absent)]


def config_differences(path: str, model_config: Optional[Mapping[str, Any]]) -> Optional[List[str]]:
    """Keys where the checkpoint's saved ``model_config`` (trainer.json) differs from ``model_config``,
    as ``"model.n_layers (saved 4, now 2)"``; None when either is unknown (an older
    checkpoint, a library save without one)."""
    diff = _differences(checkpoint_info(path).get("model_config"), model_config)
    return None if diff is None else [_say_difference(d) for d in diff]


def _say_difference(d: Tuple[str, Any, Any]) -> str:
    return f"{d[0]} (saved {d[1]!r}, now {d[2]!r})"


def _read_metadata(path: str):
    try:
        return dcp.FileSystemReader(path).read_metadata()
    except Exception as e:  # a truncated or foreign .metadata: unpickling raises anything
        raise CorruptCheckpointError(f"checkpoint file {os.path.join(path, '.metadata')} cannot be read "
                                     f"({type(e).__name__}: {e})") from None


def _mismatch(path: str, missing: List[str], extra: List[str], shapes: List[str],
              diff: Optional[List[Tuple[str, Any, Any]]]) -> str:
    said = []
    if missing:
        said.append(f"it lacks {len(missing)} key(s) this model needs, e.g. {missing[:4]}")
    if extra:
        said.append(f"it holds {len(extra)} key(s) this model lacks, e.g. {extra[:4]}")
    if shapes:
        said.append(shapes[0] + (f" (and {len(shapes) - 1} more shape(s) differ)" if len(shapes) > 1 else ""))
    msg = f"checkpoint {path} does not fit this model: " + "; ".join(said)
    if diff:
        listed = ", ".join(_say_difference(d) for d in diff[:8]) + (f" and {len(diff) - 8} more" if len(diff) > 8
                                                                       else "")
        msg += f". Its saved config differs in {listed}"
        if any(k.rsplit(".", 1)[-1] == "num_experts" for k, _, _ in diff):
            msg += " (the number of experts differs: it was saved with other experts)"
    elif diff is not None:
        msg += " (its saved model config equals this one: did the model's code change?)"
    elif (missing or extra) and all(".expert_" in k for k in missing + extra):
        msg += (" (expert keys are missing: was it saved with fewer experts?)" if missing else
                " (only expert keys differ: was it saved with more experts?)")
    else:
        msg += " (was it saved from a different model?)"
    return msg


def _check_against(path: str, sd: Dict[str, Any], process_group=None,
                   diff: Optional[List[Tuple[str, Any, Any]]] = None) -> None:
    """Every rank raises the same clear error when the checkpoint does not fit the model.

    Wrong: a key some rank needs that the checkpoint lacks, a model key the
    checkpoint holds that no rank declares (e.g. blocks of a deeper model: DCP would
    ignore it), a (global) shape that differs. A DTensor's ``shape`` is the global
    shape, as is the stored ``size``. Which stored keys are covered is OR-ed over the
    ranks as a bit mask (pipeline stages and expert-parallel ranks each declare a part).
    """
    stored = _read_metadata(path).state_dict_metadata
    names = sorted(k for k in stored if k.startswith("model."))
    index = {k: i for i, k in enumerate(names)}
    covered = bytearray((len(names) + 7) // 8)
    missing, shapes = [], []
    for k, v in sd.items():
        if k not in stored:
            missing.append(k)
            continue
        if k in index:
            covered[index[k] >> 3] |= 1 << (index[k] & 7)
        size = getattr(stored[k], "size", None)
        if isinstance(v, torch.Tensor) and size is not None and tuple(size) != tuple(v.shape):
            shapes.append(f"'{k}' has shape {tuple(size)}, the model has {tuple(v.shape)}")
    every = all_gather_objects((bytes(covered), missing, shapes), process_group)
    union = bytearray(len(covered))
    for mask, _, _ in every:
        for i, b in enumerate(mask):
            union[i] |= b
    missing = sorted({k for _, part, _ in every for k in part})
    shapes = sorted({s for _, _, part in every for s in part})
    extra = [k for i, k in enumerate(names) if not union[i >> 3] >> (i & 7) & 1]
    if missing or extra or shapes:
        raise CheckpointError(_mismatch(path, missing, extra, shapes, diff))


def _check_layout_version(path: str, info: Mapping[str, Any]) -> None:
    if not info:  # a bare DCP directory: nothing to check
        return
    version = info.get("layout_version", 1)
    if version != LAYOUT_VERSION:
        raise CheckpointError(f"checkpoint {path} holds tensor layout version {version}, this code reads "
                              f"version {LAYOUT_VERSION} (attention qkv rows head-major, SwiGLU gate/up per "
                              "unit side by side): its attention and SwiGLU weights would load into the wrong "
                              "places. Load it with the code that wrote it, or retrain")


def load_checkpoint(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    *, process_group=None, groups=None, model_config: Optional[Mapping[str, Any]] = None,
                    verify: bool = True) -> int:
    """Load ``path`` (a checkpoint, or a root holding checkpoints) in place; returns its step.

    Works at any expert-parallel and tensor-parallel size: each rank reads the
    experts and the pieces it holds now (``groups``, a ``parallel.ProcessGroups``,
    is required when the model holds tensor-parallel pieces). Without
    ``optimizer`` only the model is read. Collective when a process group is
    initialised. ``verify``: check every file against the manifest first
    (``verify_checkpoint``; this reads the whole checkpoint once more). A
    checkpoint that does not fit the model is refused before anything is loaded;
    ``model_config`` (what ``trainer.json``'s ``model_config`` would hold for this
    model) lets that error name the config keys that differ.
    """
    path = resolve_checkpoint(path)
    info = checkpoint_info(path)
    _check_layout_version(path, info)  # first: a checkpoint of another layout is not worth hashing
    if verify:
        verify_checkpoint(path, process_group=process_group)
    sd = full_state_dict(model, optimizer, 0, groups)
    _check_against(path, sd, process_group, _differences(info.get("model_config"), model_config))
    try:
        with _quiet_single_process():
            dcp.load(sd, checkpoint_id=path, process_group=process_group, no_dist=not dist.is_initialized())
    except Exception as e:  # a damaged file of a checkpoint without a manifest
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from e
    return int(sd["trainer.step"])
