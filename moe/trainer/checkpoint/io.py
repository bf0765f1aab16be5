"""Saving and loading a checkpoint: ``save_checkpoint`` and ``load_checkpoint`` (collective).

What is saved is ``state.full_state_dict`` (global tensors under global-expert keys,
so a checkpoint loads at any expert-, tensor- or data-parallel layout and ZeRO
stage); where it goes is ``store``.

Saving is atomic: every rank writes into ``<root>/step_XXXXXXXX.tmp``; after all
ranks finished (DCP's final collective) the ranks hash the files DCP wrote (split
over the ranks), and rank 0 adds ``trainer.json``, then, last, ``manifest.json``
(size and sha256 of every other file of the directory), renames the directory to
``step_XXXXXXXX`` and then atomically replaces the ``latest`` pointer file. A crash
mid-save leaves only a ``.tmp`` directory behind and ``latest`` pointing at the
previous complete checkpoint. ``root`` must be on a file system every rank sees (a
shared file system on multi-node jobs). ``keep`` prunes only the checkpoints of the
saving ``run_id``, and a checkpoint of the same step written by another run is
never replaced (``moe/trainer/resume.py`` decides which run a job continues).

Loading checks before it reads a tensor: the layout version, every file against the
manifest (``store.verify_checkpoint``), and the key set and global shapes against the
model over all ranks together (``mismatch``); then DCP reads every rank's tensors in
place.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
from typing import Any, Dict, Mapping, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from parallel.dims import ProcessGroups
from parallel.objects import all_gather_objects, broadcast_object, group_rank, group_size

from .errors import CheckpointError
from .mismatch import check_against, check_layout_version, differences
from .state import LAYOUT_VERSION, full_state_dict
from .store import (INFO, LATEST, UNKNOWN_RUN, checkpoint_info, file_digest, list_checkpoints, resolve_checkpoint,
                    run_of, step_dir, verify_checkpoint, write_manifest, write_synced)


def _barrier(process_group=None) -> None:
    """Wait for every rank of ``process_group`` (None: the world); nothing without one."""
    if group_size(process_group) > 1:
        dist.barrier(group=process_group)


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every save/load without a process group; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_checkpoint(root: str, step: int, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    *, meta: Optional[Dict[str, Any]] = None, keep: int = 0, process_group=None,
                    groups: Optional[ProcessGroups] = None, run_id: Optional[str] = None) -> str:
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
    mine = {n: file_digest(os.path.join(tmp, n)) for n in names[rank::size]}
    digests = {n: d for part in all_gather_objects(mine, process_group) for n, d in part.items()}
    if rank == 0:
        info = {"step": int(step), "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"), "world_size": size,
                "torch": torch.__version__, "layout_version": LAYOUT_VERSION, **(meta or {}), "run_id": run_id}
        write_synced(os.path.join(tmp, INFO), json.dumps(info, indent=2, default=str))
        write_manifest(tmp, digests)
        if os.path.exists(final):  # the same step again, from the same run (e.g. after a resume)
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        pointer_tmp = os.path.join(root, LATEST + ".tmp")
        write_synced(pointer_tmp, os.path.basename(final) + "\n")
        os.replace(pointer_tmp, os.path.join(root, LATEST))
        if keep > 0:
            own = [p for p in list_checkpoints(root) if run_of(p) == run_id]
            for old in own[:-keep]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    _barrier(process_group)
    return final


def load_checkpoint(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    *, process_group=None, groups: Optional[ProcessGroups] = None,
                    model_config: Optional[Mapping[str, Any]] = None,
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
    check_layout_version(path, info)  # first: a checkpoint of another layout is not worth hashing
    if verify:
        verify_checkpoint(path, process_group=process_group)
    sd = full_state_dict(model, optimizer, 0, groups)
    check_against(path, sd, process_group, differences(info.get("model_config"), model_config))
    try:
        with _quiet_single_process():
            dcp.load(sd, checkpoint_id=path, process_group=process_group, no_dist=not dist.is_initialized())
    except Exception as e:  # a damaged file of a checkpoint without a manifest
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from e
    return int(sd["trainer.step"])
