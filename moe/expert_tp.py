"""Expert tensor parallelism: each expert's hidden units split over the etp group.

Legend: N rows on this rank (expert-major); D row width; E_l experts on this rank
(``El`` in shape suffixes); R ranks of the etp group, holding the same E_l experts,
each piece ``etp_rank`` of R of every expert's hidden units (``moe.Experts(etp_rank,
etp_size)``: F_l = F / R units here).

``MoELayer`` calls ``etp_compute`` in place of ``experts(rows, counts)`` when its etp
group has two or more ranks (the layer is the one place that decides it); the rows are
this rank's, e.g. after the expert-parallel dispatch (``moe.dispatch``), whose all-to-all
pieces this module reuses.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from parallel.objects import group_size

from .dispatch import AllToAll, Permute, block_permutation, exchange_equal, is_identity
from .experts import Experts

__all__ = ["etp_compute"]


def etp_compute(experts: Experts, rows: Tensor, counts_El: Tensor, etp_group: Optional[dist.ProcessGroup], *,
                padded_capacity: Optional[int] = None) -> Tensor:
    """``experts(rows, counts_El)`` with each expert's hidden units split over ``etp_group``.

    ``experts``: a ``moe.Experts`` holding piece ``etp_rank`` of R (``Experts(etp_size=R)``);
    rows[N, D] expert-major by counts[E_l] (this rank's rows, e.g. after the ep dispatch;
    the other etp ranks hold the same E_l experts and their own rows). Steps:

    1. the per-expert counts are exchanged ([R, E_l]) and every rank's rows are all-gathered
       (an uneven all-to-all sending the same rows to every peer), then reordered
       expert-major (expert 0's rows of rank 0, rank 1, ..., then expert 1, ...);
    2. this rank computes its slice of the hidden units for all of them (b1 piece
       added, b2 not): a partial output per row;
    3. the partial outputs go back to the rank that owns each row (the reverse
       all-to-all) and are summed there (a reduce-scatter), then b2 is added once.

    Differentiable (the backward of each all-to-all is the reverse one; the input
    gradient of the row copies is summed). Collective over ``etp_group`` (two or more
    ranks): every rank calls it, also with zero rows. ``padded_capacity=C``: every expert
    has C rows on every rank (then C * R after the gather). Returns out[N, D].
    """
    if etp_group is None:
        raise ValueError("etp_compute: etp_group is None; it needs the expert-tensor-parallel process group "
                         "(MoEGroups.etp_group, two or more ranks)")
    R = group_size(etp_group)
    device = rows.device
    counts = counts_El.detach().to("cpu", torch.long)
    counts_REl = exchange_equal(counts.unsqueeze(0).expand(R, -1), etp_group, device)  # [src, E_l]
    n, from_each = rows.shape[0], counts_REl.sum(1).tolist()
    gathered = AllToAll.apply(torch.cat([rows] * R), etp_group, from_each, [n] * R, None)
    to_expert_major = None
    if not is_identity(counts_REl.shape, (1, 0)):
        to_expert_major = Permute(block_permutation(counts_REl, (1, 0)).to(device))
        gathered = to_expert_major.apply(gathered)
    partial = experts(gathered, counts_REl.sum(0).to(counts_El.device), output_bias=False,
                      padded_capacity=None if padded_capacity is None else padded_capacity * R)
    if to_expert_major is not None:
        partial = to_expert_major.reverse().apply(partial)
    back = AllToAll.apply(partial, etp_group, [n] * R, from_each, None)  # [R * N]: block r from rank r
    out = back.view(R, n, *back.shape[1:]).sum(0)
    return experts.add_output_bias(out, counts_El)
