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

The functions here read the file system; the trainer calls them on rank 0 and
broadcasts the answer, except ``pick_checkpoint`` (collective: it verifies).
"""
from __future__ import annotations

import os
import shutil
import uuid
from typing import Callable, List, Optional

from . import checkpoint as ckpt


def pick_checkpoint(resume: Optional[str], root: str, say: Callable[[str], None], *, process_group=None,
                    share: Callable = lambda x: x) -> Optional[str]:
    """The verified checkpoint ``resume`` asks for; None for a fresh start (see the module doc).

    Collective when a process group is initialised (``ckpt.verify_checkpoint``);
    ``share(x)`` returns rank 0's ``x`` on every rank (the directory listing).
    """
    if resume is None:
        return None
    if resume != "auto":
        path = ckpt.resolve_checkpoint(resume)
        ckpt.verify_checkpoint(path, process_group=process_group)
        return path
    order, notes = share(ckpt.resume_candidates(root))
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
    found = ckpt.checkpoint_dirs(root)
    if path is None or not _inside(path, root):
        return found
    step = ckpt.step_of(path)
    later = [d for d in found if step is None or ckpt.step_of(d) > step]
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
    elif _inside(path, root):
        what = (f"train.resume {resume} continues from step {ckpt.step_of(path)}, but {root} also holds later "
                f"checkpoints ({_names(found)}): this run would overwrite them")
        ways = "give this run a fresh train.out_dir"
    else:
        what = (f"train.out_dir {out_dir} already holds checkpoints of an earlier run ({_names(found)} in {root}): "
                f"this run, continuing {path}, would overwrite them and mix its metrics into theirs")
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
