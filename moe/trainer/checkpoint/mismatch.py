"""Does a checkpoint fit this model? The checks ``load_checkpoint`` runs before it reads a tensor.

- ``check_layout_version``: ``trainer.json``'s "layout_version" against
  ``LAYOUT_VERSION``; a checkpoint of another version is refused with a clear error
  instead of filling attention and SwiGLU weights into the wrong places.
- ``check_against``: the key set and global shapes of DCP's metadata against the
  state dict the model declares, over all ranks together (a key the model needs
  and the checkpoint lacks, a model key stored that no rank declares, a shape that
  differs): one ``CheckpointError`` on every rank, naming the differing config keys
  when the model's config is known, or guessing the cause (more or fewer experts,
  another model, changed model code).
- ``config_differences``: the keys where the checkpoint's saved ``model_config``
  differs from this run's (a note on resume even when the tensors fit).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from parallel.objects import all_gather_objects

from .errors import CheckpointError, CorruptCheckpointError
from .state import LAYOUT_VERSION
from .store import checkpoint_info


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested mappings as ``{"a.b.c": leaf}`` (an empty mapping is a leaf)."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def differences(saved: Optional[Mapping[str, Any]], current: Optional[Mapping[str, Any]]
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
    diff = differences(checkpoint_info(path).get("model_config"), model_config)
    return None if diff is None else [_say_difference(d) for d in diff]


def _say_difference(d: Tuple[str, Any, Any]) -> str:
    return f"{d[0]} (saved {d[1]!r}, now {d[2]!r})"


def _read_metadata(path: str) -> Metadata:
    """DCP's ``.metadata`` of ``path`` (the stored keys and global shapes)."""
    try:
        return dcp.FileSystemReader(path).read_metadata()
    except Exception as e:  # a truncated or foreign .metadata: unpickling raises anything
        raise CorruptCheckpointError(f"checkpoint file {os.path.join(path, '.metadata')} cannot be read "
                                     f"({type(e).__name__}: {e})") from None


def _mismatch(path: str, missing: List[str], extra: List[str], shapes: List[str],
              diff: Optional[List[Tuple[str, Any, Any]]]) -> str:
    """The error message: what differs, then the likeliest cause (config keys, experts, model code)."""
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


def check_against(path: str, sd: Dict[str, Any], process_group=None,
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
        meta = stored[k]  # a tensor's global shape, or an object's bytes (no shape)
        if isinstance(v, torch.Tensor) and isinstance(meta, TensorStorageMetadata) and \
                tuple(meta.size) != tuple(v.shape):
            shapes.append(f"'{k}' has shape {tuple(meta.size)}, the model has {tuple(v.shape)}")
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


def check_layout_version(path: str, info: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose ``trainer.json`` ``info`` names another ``LAYOUT_VERSION`` (none: version 1)."""
    if not info:  # a bare DCP directory: nothing to check
        return
    version = info.get("layout_version", 1)
    if version != LAYOUT_VERSION:
        raise CheckpointError(f"checkpoint {path} holds tensor layout version {version}, this code reads "
                              f"version {LAYOUT_VERSION} (attention qkv rows head-major, SwiGLU gate/up per "
                              "unit side by side): its attention and SwiGLU weights would load into the wrong "
                              "places. Load it with the code that wrote it, or retrain")
