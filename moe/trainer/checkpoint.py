"""Checkpoints with ``torch.distributed.checkpoint`` (DCP), experts by GLOBAL index.

Legend: E experts (global), E_l experts on this rank, g a global expert index.

Layout of the saved state dict (flat keys; DCP stores one entry per key):

    model.<param or buffer name>                 dense tensors, replicated on every rank
    model.<experts module>.w1.expert_<g>         one expert's slice of a stacked tensor
    optim.<param name>.<state key>               AdamW exp_avg / exp_avg_sq / step
    optim.<experts module>.w1.expert_<g>.<key>   ... split per expert like the weights
    trainer.step                                 optimizer steps done (= data position)

An expert-parallel rank holds experts ``first_expert .. first_expert + E_l - 1`` of
every MoE layer, so it declares only those ``expert_<g>`` keys: the key sets differ
between ranks. DCP handles that natively for plain tensors (each key is written by
one of the ranks that declare it: replicated dense tensors and the copies of an
expert on expert-data-parallel replicas are deduplicated by its save planner, and
the metadata is the union). Loading declares the keys of the experts *this* rank
holds under the new layout and DCP reads them in place into slices of the stacked
parameters, so a checkpoint saved at one expert-parallel size loads at any other
that divides E.

Saving is atomic: every rank writes into ``<root>/step_XXXXXXXX.tmp``; after all
ranks finished (DCP's final collective), rank 0 adds ``trainer.json``, renames the
directory to ``step_XXXXXXXX`` and then atomically replaces the ``latest`` pointer
file. A crash mid-save leaves only a ``.tmp`` directory behind and ``latest``
pointing at the previous complete checkpoint. ``root`` must be on a file system
every rank sees (a shared file system on multi-node jobs).

Optimizer state: AdamW (or Adam) only; missing state (a fresh optimizer) is
created as zeros before loading so DCP has tensors to read into.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from moe.experts import Experts
from parallel.grads import is_expert_param

LATEST = "latest"
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


def _split_expert_tensor(key: str, t: torch.Tensor, first: int) -> Iterator[Tuple[str, torch.Tensor]]:
    for i in range(t.shape[0]):
        yield f"{key}.expert_{first + i}", t[i]


def model_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's tensors under global-expert keys (views of the live tensors).

    Dense parameters and buffers keep their ``state_dict`` names; every stacked
    tensor of an expert-parallel ``Experts`` module is split into
    ``<module>.<param>.expert_<g>`` slices.
    """
    experts = _expert_modules(model)
    expert_keys = {f"{m}.{p}" if m else p: mod.first_expert
                   for m, mod in experts.items() for p, _ in mod.named_parameters(recurse=False)}
    out: Dict[str, torch.Tensor] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        t = t.detach()
        if key in expert_keys:
            out.update(_split_expert_tensor(key, t, expert_keys[key]))
        else:
            out[key] = t
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


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, torch.Tensor]:
    """Optimizer state under the model's global-expert keys (views of the live tensors)."""
    _ensure_adam_state(optimizer)
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
            name = names[id(p)]
            for k, v in optimizer.state[p].items():
                if not isinstance(v, torch.Tensor):
                    continue
                if id(p) in first_of:
                    for i in range(p.shape[0]):
                        g = first_of[id(p)] + i
                        # scalar state (step) is shared by every expert slice of the stack
                        out[f"{name}.expert_{g}.{k}"] = v[i] if v.dim() > 0 and v.shape == p.shape else v
                else:
                    out[f"{name}.{k}"] = v
    return out


def full_state_dict(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], step: int) -> Dict[str, Any]:
    """Everything a training checkpoint holds, with ``model.`` / ``optim.`` / ``trainer.`` prefixes."""
    sd: Dict[str, Any] = {f"model.{k}": v for k, v in model_state_dict(model).items()}
    if optimizer is not None:
        sd.update({f"optim.{k}": v for k, v in optimizer_state_dict(model, optimizer).items()})
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
                    *, meta: Optional[Dict[str, Any]] = None, keep: int = 0, process_group=None) -> str:
    """Save a checkpoint of ``step`` under ``root`` (collective: every rank calls it).

    Returns the checkpoint directory. ``meta`` (JSON-able) goes into
    ``trainer.json`` next to DCP's files. ``keep > 0`` deletes all but the newest
    ``keep`` checkpoints afterwards.
    """
    final = step_dir(root, step)
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):  # leftover from a crash during an earlier save
            shutil.rmtree(tmp)
    _barrier()
    with _quiet_single_process():
        dcp.save(full_state_dict(model, optimizer, step), checkpoint_id=tmp, process_group=process_group,
                 no_dist=not dist.is_initialized())
    _barrier()
    if _rank() == 0:
        info = {"step": int(step), "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "torch": torch.__version__, **(meta or {})}
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
    """Clear errors for keys the checkpoint lacks or holds with another shape."""
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


def load_checkpoint(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    *, process_group=None) -> int:
    """Load ``path`` (a checkpoint or a root with ``latest``) in place; returns its step.

    Works at any expert-parallel size: each rank reads the experts it holds now.
    Without ``optimizer`` only the model is read. Collective when a process group
    is initialised.
    """
    path = resolve_checkpoint(path)
    sd = full_state_dict(model, optimizer, 0)
    _check_against(path, sd)
    with _quiet_single_process():
        dcp.load(sd, checkpoint_id=path, process_group=process_group, no_dist=not dist.is_initialized())
    return int(sd["trainer.step"])
