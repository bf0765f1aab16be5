"""The result of routing one batch of tokens: what every other part reads.

Legend: T tokens, k choices per token, E experts.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist

from parallel import comm

# A kept assignment whose combine weight is below this contributes less than a
# millionth of its expert's output: for the statistics it is a zero weight.
ZERO_WEIGHT = 1e-6


@dataclass
class Routing:
    """Router outputs for T tokens.

    experts   LongTensor[T, k]   chosen expert of each (token, choice)
    weights   Tensor[T, k]       fp32 combine weight of each choice (carries the router gradient)
    probs     Tensor[T, E]       fp32 full router distribution (softmax or sigmoid scores)
    logits    Tensor[T, E]       fp32 router logits (z-loss reads them)
    dispatched BoolTensor[T, k]  chosen by the policy (GShard's random 2nd choice may be False)
    kept      BoolTensor[T, k]   dispatched and inside the expert's capacity
    positions LongTensor[T, k]   slot in the expert's buffer, in priority order; -1 where not kept
    tokens_per_expert LongTensor[E]  kept assignments per expert
    capacity  int | None         per-expert capacity on this rank (None: dropless)
    modality  LongTensor[T] | None   modality id of each token
    load      Tensor[T, E] | None    noisy top-k smooth load estimate P(x, i) (Shazeer 2017)
    skipped   bool               non-finite logits with on_nonfinite="skip": nothing is dispatched

    For expert choice, k == E: column j is expert j, and ``kept[t, j]`` says
    whether expert j took token t.
    """

    experts: torch.Tensor
    weights: torch.Tensor
    probs: torch.Tensor
    logits: torch.Tensor
    dispatched: torch.Tensor
    kept: torch.Tensor
    positions: torch.Tensor
    tokens_per_expert: torch.Tensor
    capacity: Optional[int]
    modality: Optional[torch.Tensor] = None
    load: Optional[torch.Tensor] = None
    skipped: bool = False

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probs.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[1]

    def entropy(self) -> torch.Tensor:
        """Mean per-token entropy (nats) of the router distribution, a 0-d fp32 tensor (0 for T = 0)."""
        if self.num_tokens == 0:
            return self.probs.new_zeros((), dtype=torch.float32)
        p = self.probs.float()
        return -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean()

    def tokens_by_modality(self, num_modalities: int) -> Optional[torch.Tensor]:
        """Kept assignments per (modality, expert), LongTensor[M, E] on the routing's device.

        None when no modality ids were given; rows sum to ``tokens_per_expert``.
        """
        if self.modality is None:
            return None
        E = self.num_experts
        kept_mod = self.modality.unsqueeze(1).expand_as(self.experts)[self.kept]
        idx = kept_mod * E + self.experts[self.kept]
        return torch.bincount(idx, minlength=num_modalities * E)[: num_modalities * E].view(num_modalities, E)

    def dropped_fraction(self) -> float:
        """Fraction of dispatched assignments that capacity dropped (0.0 when none dispatched)."""
        n = int(self.dispatched.sum())
        return 0.0 if n == 0 else 1.0 - int(self.kept.sum()) / n

    def zero_weight_count(self) -> torch.Tensor:
        """Kept assignments whose combine weight is below ``ZERO_WEIGHT`` (0-d long tensor, no sync).

        Such an assignment is computed but adds (almost) nothing to the output: a sigmoid
        router whose scores all underflow to 0 gives y = 0 with nothing dropped.
        """
        return (self.kept & (self.weights.detach().abs() < ZERO_WEIGHT)).sum()

    def zero_weight_fraction(self) -> float:
        """Fraction of kept assignments whose combine weight is below ``ZERO_WEIGHT`` (0.0 when none kept)."""
        n = int(self.kept.sum())
        return 0.0 if n == 0 else int(self.zero_weight_count()) / n

    def piece(self, start: int, end: int) -> "Routing":
        """The routing of tokens ``[start, end)`` alone, as a routing of ALL T tokens decided them.

        Same capacity, choices and drops; the piece keeps its tokens' experts, weights,
        kept, dispatched and modality, renumbers ``positions`` to slots 0.. of each expert
        among the piece's kept assignments (in the full routing's slot order, so each
        expert still has at most ``capacity`` rows and the padded layout works) and
        recounts ``tokens_per_expert``. probs, logits and load are detached (statistics
        only: the losses read the full routing). ``weights`` is a plain slice (see
        ``token_piece`` for the tensor-parallel one).
        """
        if not 0 <= start <= end <= self.num_tokens:
            raise ValueError(f"Routing.piece: need 0 <= start <= end <= T={self.num_tokens}, got [{start}, {end})")
        experts, kept = self.experts[start:end], self.kept[start:end]
        E = self.num_experts
        counts = torch.bincount(experts[kept], minlength=E)[:E]
        # Kept assignments ordered by (expert, slot in the full routing); their rank inside
        # their expert is the new slot. Slots are < T*k, so the key is exact.
        flat_kept = kept.reshape(-1)
        e_kept = experts.reshape(-1)[flat_kept]
        key = e_kept * (self.num_tokens * self.top_k) + self.positions[start:end].reshape(-1)[flat_kept]
        order = torch.argsort(key)
        starts = torch.cumsum(counts, 0) - counts
        slot_sorted = torch.arange(order.numel(), device=order.device) - starts[e_kept[order]]
        slots = torch.empty_like(slot_sorted)
        slots[order] = slot_sorted
        positions = torch.full_like(experts, -1).reshape(-1)
        positions[flat_kept] = slots
        rows = slice(start, end)
        return replace(
            self,
            experts=experts,
            weights=self.weights[rows],
            probs=self.probs[rows].detach(),
            logits=self.logits[rows].detach(),
            dispatched=self.dispatched[rows],
            kept=kept,
            positions=positions.view(experts.shape),
            tokens_per_expert=counts,
            modality=None if self.modality is None else self.modality[rows],
            load=None if self.load is None else self.load[rows].detach(),
        )

    def token_piece(self, group) -> "Routing":
        """This rank's piece of the tokens under tensor parallelism: ``piece(start, end)`` for
        ``[start, end) = parallel.comm.bounds(T, R, r)`` (R ranks in ``group``, this one r),
        with ``weights`` through ``parallel.comm.split`` (its backward all-gathers, so the
        router gradient stays complete on every rank). ``self`` for a group of one rank (or None).
        """
        size = 1 if group is None else dist.get_world_size(group)
        if size == 1:
            return self
        start, end = comm.bounds(self.num_tokens, size, dist.get_rank(group))
        return replace(self.piece(start, end), weights=comm.split(self.weights, 0, group))
