"""Where checkpoints live: ``step_<N>`` directories, the ``latest`` pointer, ``trainer.json``, the manifest.

Under a checkpoint root (``<out_dir>/checkpoints`` for the trainer):

    step_00000120/            one complete checkpoint (it has DCP's ``.metadata``)
        .metadata, *.distcp   DCP's index and data files
        trainer.json          step, run_id, layout_version, the caller's meta (config, loss scaler, ...)
        manifest.json         size and sha256 of every other file, written last
    step_00000120.tmp/        a save in progress (or one that crashed)
    latest                    the name of the newest complete checkpoint (one line)

``moe.trainer.checkpoint.io`` writes a checkpoint into ``step_<N>.tmp``, renames
it and then atomically replaces ``latest``, so ``latest`` names a complete
checkpoint unless a crash fell between the two or a file was deleted.
``latest_checkpoint`` is the checkpoint ``latest`` names; without the pointer, or
when it names no complete checkpoint, the newest complete ``step_<N>``
(``resume_candidates`` gives the whole order to try and notes on the pointer).

``trainer.json`` holds the ``run_id`` of the run that wrote the checkpoint
(``run_of``); ``moe/trainer/resume.py`` decides which run a job continues.

The manifest: ``verify_checkpoint`` checks every file of a checkpoint against it
(a missing, truncated or changed file is a ``CorruptCheckpointError`` naming that
file); checkpoints without a manifest, written before it existed, pass unchecked.
The files are split over the ranks of the process group (``parallel.objects``
gathers the findings), so every rank raises the same error.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Dict, List, Optional, Tuple

from parallel.objects import all_gather_objects, group_rank, group_size

from .errors import CheckpointError, CorruptCheckpointError

LATEST = "latest"
INFO = "trainer.json"
MANIFEST = "manifest.json"
UNKNOWN_RUN = "<unknown: trainer.json unreadable>"  # run_of() of a checkpoint whose trainer.json is damaged
_PREFIX = "step_"
_STEP_NAME = re.compile(r"^step_(\d{8,})$")


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


def checkpoint_steps(root: str) -> List[Tuple[int, str]]:
    """``(step, directory)`` of every ``step_<N>`` directory under ``root``, complete or not, by step
    (no ``.tmp`` / ``.old``)."""
    if not os.path.isdir(root):
        return []
    found = sorted((step, os.path.join(root, n)) for n in os.listdir(root) if (step := step_of(n)) is not None)
    return [(step, p) for step, p in found if os.path.isdir(p)]


def checkpoint_dirs(root: str) -> List[str]:
    """Every ``step_<N>`` directory under ``root``, complete or not, by step (no ``.tmp`` / ``.old``)."""
    return [p for _, p in checkpoint_steps(root)]


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
def file_digest(path: str) -> Tuple[int, str]:
    with open(path, "rb") as f:
        return os.fstat(f.fileno()).st_size, hashlib.file_digest(f, "sha256").hexdigest()


def write_synced(path: str, text: str) -> None:
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
        size, sha = file_digest(full)
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


def write_manifest(tmp: str, digests: Dict[str, Tuple[int, str]]) -> None:
    """Rank 0, after every rank finished: hash what no rank hashed (trainer.json, any file DCP
    wrote besides those its metadata lists), then write ``manifest.json`` last."""
    for where, _, names in os.walk(tmp):
        for n in names:
            rel = os.path.relpath(os.path.join(where, n), tmp).replace(os.sep, "/")
            if rel not in digests and rel != MANIFEST:
                digests[rel] = file_digest(os.path.join(tmp, rel))
    files = {n: {"size": size, "sha256": sha} for n, (size, sha) in sorted(digests.items())}
    write_synced(os.path.join(tmp, MANIFEST), json.dumps({"format": 1, "files": files}, indent=1))
