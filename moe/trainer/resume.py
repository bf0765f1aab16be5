"""Where a run starts: the checkpoint it continues from, and the checkpoints in its out_dir it may not touch.

``train.resume`` picks the checkpoint (``pick_checkpoint``):

- ``null``: none, a fresh run;
- ``auto``: the one ``<out_dir>/checkpoints/latest`` names, else (no pointer, or it
  names no complete checkpoint) the newest complete one; a checkpoint whose files do
  not match its manifest is skipped, saying so, for the next older one;
- a path: that checkpoint (or the latest under that directory); a damaged one is an error.

A run writes ``step_<N>`` directories into ``<out_dir>/checkpoints`` and moves
``latest``; it must not replace or prune checkpoints that belong to another run.
``conflicts`` lists the ones this run would clash with:

- a fresh run: every ``step_<N>`` there (it would overwrite equal steps, move
  ``latest`` back and mix its metrics into ``metrics.jsonl``);
- ``resume: <path>`` inside this out_dir: those after the checkpoint's step (another
  branch of that run); a path elsewhere: every one there;
- ``resume: auto``: those after the chosen checkpoint (one it skipped as damaged)
  that another run wrote (``run_id`` in ``trainer.json``).

With conflicts the run is refused (``refusal`` says what to do) unless
``train.overwrite: true``, which deletes them first (``clear``). Every checkpoint
records the ``run_id`` of the run that wrote it: a fresh run draws a new one, a
resumed run keeps the one of its checkpoint, so ``keep_checkpoints`` prunes the
checkpoints of the run being continued, never another's.

``resume_run`` is the whole start of a run, what ``Trainer.fit`` calls first: pick,
decide the ``run_id``, refuse or clear, load, and say what happened. It is
collective over ``process_group`` (None: the world): the file-system decisions are
taken on its rank 0 and broadcast (``parallel.objects``); ``pick_checkpoint``
verifies on every rank. The other functions here only read (or, ``clear``, delete)
files, on rank 0.
"""
from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional

import torch.distributed as dist
from torch import nn

from parallel.dims import ProcessGroups
from parallel.engine import EngineBase
from parallel.objects import broadcast_object, group_rank, group_size
from parallel.precision import LossScaler

from . import checkpoint as ckpt


@dataclass(frozen=True)
class Start:
    """Where a run starts (``resume_run``): the checkpoint it loaded (None: a fresh start), the
    step it continues from, and the ``run_id`` it writes into its checkpoints."""

    path: Optional[str]
    step: int
    run_id: str


def resume_run(*, resume: Optional[str], overwrite: bool, steps: int, out_dir: str, root: str,
               model: nn.Module, engine: EngineBase, groups: ProcessGroups, model_config: Mapping[str, Any],
               scaler: Optional[LossScaler], say: Callable[[str], None], process_group=None) -> Start:
    """Continue from the checkpoint ``train.resume`` asks for, into ``model`` and ``engine``'s optimizer.

    ``resume`` / ``overwrite`` / ``steps``: the ``train`` keys; ``root``: ``<out_dir>/checkpoints``;
    ``groups``: the run's ``parallel.ProcessGroups`` (tensor-parallel pieces); ``model_config``: what
    ``trainer.json`` records of the model; ``scaler``: the fp16 loss scaler (its state is restored).

    Refuses (``CheckpointError``) to start a run that would write over checkpoints of another
    run in ``out_dir``, unless ``overwrite`` (then they are deleted first); refuses a damaged
    checkpoint (``resume: auto`` skips it for an older one) and one that does not fit the
    model, naming the config keys that differ. Collective over ``process_group`` (None: the
    world); writes nothing into ``out_dir`` unless deleting for ``overwrite``.
    """
    path = pick_checkpoint(resume, root, say, process_group=process_group)
    run_id = _claim_out_dir(resume, overwrite, out_dir, root, path, say, process_group)
    if path is None:
        return Start(None, 0, run_id)
    step = ckpt.load_checkpoint(path, model, engine.checkpoint_optimizer(), groups=groups,
                                model_config=model_config, verify=False)  # verified by pick_checkpoint
    engine.after_checkpoint_load()
    scaler_state = ckpt.checkpoint_info(path).get("loss_scaler")
    if scaler is not None and scaler_state is not None:
        scaler.load_state_dict(scaler_state)
    say(f"resumed from {path} at step {step}")
    differences = ckpt.config_differences(path, model_config)
    if differences:
        say(f"note: the checkpoint's model config differs in {', '.join(differences)}; its tensors fit "
            "this model, so they were loaded")
    if step > steps:
        say(f"warning: train.steps={steps} is below the checkpoint's step {step}: nothing is "
            f"trained, the run only evaluates the model as saved at step {step}")
    return Start(path, step, run_id)


def _claim_out_dir(resume: Optional[str], overwrite: bool, out_dir: str, root: str, path: Optional[str],
                   say: Callable[[str], None], process_group=None) -> str:
    """The ``run_id`` this run writes, after refusing (or, ``overwrite``, clearing) the checkpoints
    under ``root`` it would clash with (``conflicts``); decided on rank 0, collective."""
    is_main = group_rank(process_group) == 0
    decided = None
    if is_main:
        run_id = run_id_for(path)
        decided = (run_id, conflicts(root, resume, path, run_id))
    run_id, found = broadcast_object(decided, process_group)
    if found:
        if not overwrite:
            raise ckpt.CheckpointError(refusal(out_dir, resume, path, found))
        if is_main:
            gone = clear(out_dir, root, path, found)
            say(f"train.overwrite: deleted {len(gone)} path(s) this run does not continue: "
                + ", ".join(os.path.relpath(g, out_dir) for g in gone))
        if group_size(process_group) > 1:
            dist.barrier(group=process_group)
    return run_id


def pick_checkpoint(resume: Optional[str], root: str, say: Callable[[str], None], *,
                    process_group=None) -> Optional[str]:
    """The verified checkpoint ``resume`` asks for; None for a fresh start (see the module doc).

    Collective when a process group is initialised (``ckpt.verify_checkpoint``; the
    directory listing of ``process_group``'s rank 0 is used on every rank).
    """
    if resume is None:
        return None
    if resume != "auto":
        path = ckpt.resolve_checkpoint(resume)
        ckpt.verify_checkpoint(path, process_group=process_group)
        return path
    order, notes = broadcast_object(ckpt.resume_candidates(root), process_group)
    for note in notes:
        say(f"resume=auto: {note}; using the newest complete checkpoint")
    if not order:
        say(f"resume=auto: no checkpoint under {root} yet; starting fresh")
        return None
    damaged = []
    for path in order:
        try:
            ckpt.verify_checkpoint(path, process_group=process_group)
        except ckpt.CorruptCheckpointError as e:
            damaged.append(f"{os.path.basename(path)}: {e}")
            say(f"resume=auto: skipping damaged checkpoint {path}: {e}")
            continue
        if damaged:
            say(f"resume=auto: using {path}, the newest intact checkpoint")
        return path
    raise ckpt.CheckpointError(
        f"resume=auto: every checkpoint under {root} is damaged ({'; '.join(damaged)}). Start in a fresh "
        "train.out_dir, or set train.resume: null with train.overwrite: true to delete them")


def run_id_for(path: Optional[str]) -> str:
    """The ``run_id`` this run writes: the one of the checkpoint it continues, else a new one."""
    found = ckpt.run_of(path) if path is not None else None
    return found if isinstance(found, str) and found != ckpt.UNKNOWN_RUN else uuid.uuid4().hex


def _inside(path: str, root: str) -> bool:
    return os.path.dirname(os.path.realpath(path)) == os.path.realpath(root)


def conflicts(root: str, resume: Optional[str], path: Optional[str], run_id: str) -> List[str]:
    """The ``step_<N>`` directories under ``root`` this run must not write over (module doc)."""
    steps = ckpt.checkpoint_steps(root)
    if path is None or not _inside(path, root):
        return [d for _, d in steps]
    step = ckpt.step_of(path)
    later = [d for s, d in steps if step is None or s > step]
    if resume == "auto":
        return [d for d in later if ckpt.run_of(d) != run_id]
    return later


def _names(paths: List[str]) -> str:
    names = [os.path.basename(p) for p in paths]
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def refusal(out_dir: str, resume: Optional[str], path: Optional[str], found: List[str]) -> str:
    """Why this run does not start, and the three ways out."""
    root = os.path.dirname(found[0])
    if resume is None:
        what = (f"train.out_dir {out_dir} already holds checkpoints of an earlier run ({_names(found)} in {root}): "
                "a fresh run (train.resume: null) would overwrite them and mix its metrics into theirs")
        ways = "continue that run with train.resume: auto, give this run a fresh train.out_dir"
    elif resume == "auto":
        what = (f"{root} holds later checkpoints ({_names(found)}) not written by the run of {path}, which "
                "train.resume: auto continues: this run would overwrite them")
        ways = "move them away, give this run a fresh train.out_dir"
    else:  # a path: pick_checkpoint resolved it to a checkpoint (or raised)
        assert path is not None, "train.resume names a path, so the run continues a checkpoint"
        if _inside(path, root):
            what = (f"train.resume {resume} continues from step {ckpt.step_of(path)}, but {root} also holds "
                    f"later checkpoints ({_names(found)}): this run would overwrite them")
        else:
            what = (f"train.out_dir {out_dir} already holds checkpoints of an earlier run ({_names(found)} in "
                    f"{root}): this run, continuing {path}, would overwrite them and mix its metrics into theirs")
        ways = "give this run a fresh train.out_dir"
    return f"{what}. To go on: {ways}, or set train.overwrite: true to delete them first"


def clear(out_dir: str, root: str, path: Optional[str], found: List[str]) -> List[str]:
    """``train.overwrite: true``: delete the conflicting checkpoints, then ``latest`` if what it
    names is gone, and, when this run does not continue a checkpoint of that out_dir, its
    ``metrics.jsonl``; returns what was deleted."""
    gone = []
    for d in found:
        shutil.rmtree(d)
        gone.append(d)
    pointer = os.path.join(root, ckpt.LATEST)
    drop = []
    if os.path.isfile(pointer):
        with open(pointer, errors="replace") as f:
            if not os.path.isdir(os.path.join(root, f.read().strip() or ".missing")):
                drop.append(pointer)
    if path is None or not _inside(path, root):
        drop.append(os.path.join(out_dir, "metrics.jsonl"))
    for p in drop:
        if os.path.isfile(p):
            os.remove(p)
            gone.append(p)
    return gone
