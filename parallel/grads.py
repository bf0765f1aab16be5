"""Marking expert parameters and averaging gradients over the right groups.

Legend: numel a parameter's element count; a bucket is the flat concatenation of
several gradients of one dtype and device (at most ``bucket_numel`` elements).

Dense (non-expert) parameters are replicated over the whole data-parallel group
(``groups.dp_group``); an expert parameter only over the ranks holding the same
expert shard (``groups.edp_group``). Expert parameters carry DeepSpeed's MoE
markers (``param.allreduce = False``, ``param.group_name = "ep_size_<ep>"``) so
DeepSpeed's ZeRO puts them in their own groups, and our own reduction finds them.

Tensor parallelism (``parallel.shards``): a parameter marked ``partial_grad_group``
("tp" or "etp": sequence-parallel norms and biases, an expert's output bias under
expert tensor parallelism) holds a partial gradient on each rank of that group; it is
summed over the group first. A tensor-parallel piece (``tensor_shard``) is one part
of a bigger tensor: the gradient norm sums its squares over the piece's group.

Pipeline parallelism: each stage holds other parameters, so the norm sums over the pp
group too. A parameter marked ``partial_grad_group = "pp_ends"`` (a tied embedding /
head kept on the first and the last stage) has its gradient summed over those two
ranks (``groups.pp_ends_group``) and is counted once, on the first stage.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from .checks import check_int
from .dims import ProcessGroups
from .shards import partial_grad_group, shard_of

EXPERT_GROUP_PREFIX = "ep_size_"
# DeepSpeed's MoE markers: plain attributes set on the parameter object (torch.Tensor declares neither),
# written by mark_expert_params and read back by is_expert_param / allreduce_gradients under these names.
ALLREDUCE_ATTR = "allreduce"
GROUP_NAME_ATTR = "group_name"


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's group name for expert parameters at expert-parallel size ``ep_size``."""
    return f"{EXPERT_GROUP_PREFIX}{ep_size}"


def mark_expert_params(module_or_params: Union[nn.Module, Iterable[nn.Parameter]], ep_size: int) -> List[nn.Parameter]:
    """Mark parameters as expert parameters (sharded over ``ep_size`` ranks).

    Sets ``param.allreduce = False`` and ``param.group_name = "ep_size_<ep_size>"``
    on every parameter of the module (or of the iterable) and returns them.
    """
    check_int("ep_size", ep_size, minimum=1)
    params = list(module_or_params.parameters() if isinstance(module_or_params, nn.Module) else module_or_params)
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"mark_expert_params: expected parameters, got {type(p).__name__}")
        setattr(p, ALLREDUCE_ATTR, False)
        setattr(p, GROUP_NAME_ATTR, expert_group_name(ep_size))
    return params


def is_expert_param(param: torch.Tensor) -> bool:
    """True if ``param`` was marked by ``mark_expert_params``."""
    return getattr(param, ALLREDUCE_ATTR, True) is False


def _average_(grads: List[torch.Tensor], group: Optional[dist.ProcessGroup], size: int, bucket_numel: int,
              divisor: int) -> None:
    """All-reduce-sum ``grads`` in place over ``group`` (of ``size`` ranks) and divide by
    ``divisor``, a few flat buckets at a time."""
    if not grads or (size == 1 and divisor == 1):
        return
    by_kind: Dict[Tuple[torch.dtype, torch.device], List[torch.Tensor]] = {}
    for g in grads:
        by_kind.setdefault((g.dtype, g.device), []).append(g)
    for kind_grads in by_kind.values():
        bucket: List[torch.Tensor] = []
        numel = 0
        pending: List[Optional[torch.Tensor]] = [*kind_grads, None]  # None flushes the last bucket
        for nxt in pending:
            if nxt is not None and (numel == 0 or numel + nxt.numel() <= bucket_numel):
                bucket.append(nxt)
                numel += nxt.numel()
                continue
            flat = torch.cat([b.reshape(-1) for b in bucket])
            if size > 1:
                dist.all_reduce(flat, group=group)
            flat.div_(divisor)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()
            if nxt is not None:
                bucket, numel = [nxt], nxt.numel()


def allreduce_gradients(model: Union[nn.Module, Iterable[nn.Parameter]], groups: ProcessGroups, *,
                        bucket_numel: int = 1 << 24) -> None:
    """Average gradients in place so that every parameter gets the gradient of the
    mean of the data-parallel ranks' losses.

    Dense parameters: sum over ``groups.dp_group`` / dp. Expert parameters: their
    gradient already sums the contributions of every rank in the expert-parallel
    group (the all-to-all backward brings them home), so they are summed over
    ``groups.edp_group`` and divided by dp as well (= edp * ep): dividing by the
    edp size alone would make expert gradients ep times too large. (With tensor
    parallelism this assumes etp = tp, each token counted once per expert.)

    Every parameter with ``requires_grad`` takes part; a missing ``.grad`` is
    taken as zeros (and set), so all ranks reduce the same buckets even when an
    expert received no tokens on some rank. Expert parameters must have been
    marked for ``groups.dims.ep``.
    """
    params = list(model.parameters() if isinstance(model, nn.Module) else model)
    expected = expert_group_name(groups.dims.ep)
    dense: List[torch.Tensor] = []
    expert: List[torch.Tensor] = []
    trainable: List[Tuple[nn.Parameter, torch.Tensor]] = []  # (parameter, its gradient)
    for p in params:
        if not p.requires_grad:
            continue
        if is_expert_param(p):
            name = getattr(p, GROUP_NAME_ATTR, None)
            if name != expected:
                raise ValueError(
                    f"allreduce_gradients: expert parameter marked group_name={name!r}, but the "
                    f"process groups have ep={groups.dims.ep} (expected {expected!r})"
                )
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grad = p.grad
        trainable.append((p, grad))
        (expert if is_expert_param(p) else dense).append(grad)
    for name in ("tp", "etp", "pp_ends"):  # partial gradients (sequence / expert-tensor pieces, tied copies)
        partial = [g for p, g in trainable if partial_grad_group(p) == name]
        size = (2 if groups.dims.pp > 1 else 1) if name == "pp_ends" else getattr(groups.dims, name)
        if partial and size > 1:
            _average_(partial, getattr(groups, f"{name}_group"), size, bucket_numel, 1)
    dp = groups.dims.dp
    _average_(dense, groups.dp_group, dp, bucket_numel, dp)
    _average_(expert, groups.edp_group, groups.dims.edp, bucket_numel, dp)


def global_grad_norm(model: Union[nn.Module, Iterable[nn.Parameter]], groups: ProcessGroups) -> torch.Tensor:
    """L2 norm (fp64, 0-d) of the whole model's gradient, each parameter counted once.

    Call after ``allreduce_gradients``: replicated gradients are then equal on their
    replicas and counted once. Squared norms are summed over the ranks that hold
    DIFFERENT parts: tensor-parallel pieces of dense layers over ``tp_group``; expert
    gradients over ``ep_group`` (each ep rank holds other experts), and expert pieces
    under expert tensor parallelism over ``etp_group`` as well; then everything over
    ``pp_group`` (each pipeline stage holds other blocks), a tied first/last-stage copy
    ("pp_ends") counted on the first stage only.
    """
    pp = groups.dims.pp
    grads = [(p, g) for p in (model.parameters() if isinstance(model, nn.Module) else model) if (g := p.grad) is not None
             and not (pp > 1 and partial_grad_group(p) == "pp_ends" and groups.pp_rank != 0)]
    device = grads[0][1].device if grads else torch.device("cpu")
    if pp > 1 and dist.get_backend(groups.pp_group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    # (expert?, sharded?) -> squared norm; each sum is reduced over the groups that split it
    sums = {key: torch.zeros((), dtype=torch.float64, device=device)
            for key in ((False, False), (False, True), (True, False), (True, True))}
    for p, g in grads:
        sums[(is_expert_param(p), shard_of(p) is not None)] += g.detach().double().pow(2).sum()
    reductions = {(False, True): ["tp"], (True, False): ["ep"], (True, True): ["ep", "etp"]}
    for key, names in reductions.items():
        for name in names:
            if getattr(groups.dims, name) > 1:
                dist.all_reduce(sums[key], group=getattr(groups, f"{name}_group"))
    total = torch.zeros((), dtype=torch.float64, device=device)  # what sum() adds them to (0 + ...: exact)
    for part in sums.values():
        total = total + part
    if pp > 1:
        dist.all_reduce(total, group=groups.pp_group)
    return total.sqrt()


def clip_gradients(model: nn.Module, max_norm: Optional[float], groups: ProcessGroups) -> float:
    """Scale every gradient by ``max_norm / norm`` when the global norm exceeds ``max_norm``.

    ``max_norm`` None or 0: no clipping. Returns the global norm before clipping
    (the same float on every rank).
    """
    norm = float(global_grad_norm(model, groups))
    if max_norm and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


@torch.no_grad()
def sync_replicas(model: nn.Module, groups: ProcessGroups) -> None:
    """Make replicas bit-identical: dense tensors from the first rank of the dp group,
    expert tensors from the first rank of the edp group."""
    for p in list(model.parameters()) + list(model.buffers()):
        name = "edp" if is_expert_param(p) else "dp"
        ranks = groups.group_ranks[name]
        if len(ranks) > 1:
            dist.broadcast(p.data, src=ranks[0], group=getattr(groups, f"{name}_group"))
