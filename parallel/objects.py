"""Collectives of picklable Python objects: one rank's object to every rank, every rank's object to all.

``broadcast_object(obj, group, src)`` and ``all_gather_objects(obj, group)`` wrap
``torch.distributed.broadcast_object_list`` / ``all_gather_object`` (their boxes
of ``[None] * size``) so that callers say what they mean, and they work without a
process group: when ``torch.distributed`` is not initialised, or the group has one
member, no collective runs and the object itself comes back (``[obj]`` for the
gather). Ranks here are ranks IN ``group`` (``None``: the default, world group).

Like the torch calls, these are collective: every member of ``group`` calls them,
in the same order. Used for decisions taken on one rank (which checkpoint to
resume, whether a directory may be written) and for small logs and statistics.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch.distributed as dist


def group_size(group: Optional[dist.ProcessGroup] = None) -> int:
    """Members of ``group`` (None: the world); 1 when ``torch.distributed`` is not initialised."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def group_rank(group: Optional[dist.ProcessGroup] = None) -> int:
    """This rank's index in ``group`` (None: the world); 0 when ``torch.distributed`` is not initialised."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def broadcast_object(obj: Any, group: Optional[dist.ProcessGroup] = None, src: int = 0) -> Any:
    """The ``obj`` of group rank ``src``, on every member of ``group`` (collective).

    ``src`` counts in ``group`` (``dist.get_group_rank`` turns a global rank into it).
    On ``src`` the object itself comes back, elsewhere an unpickled copy.
    """
    if group_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, group=group, group_src=src)
    return box[0]


def all_gather_objects(obj: Any, group: Optional[dist.ProcessGroup] = None) -> List[Any]:
    """Every member's ``obj``, in group rank order (collective); ``[obj]`` for a group of one."""
    size = group_size(group)
    if size == 1:
        return [obj]
    out: List[Any] = [None] * size
    dist.all_gather_object(out, obj, group=group)
    return out
