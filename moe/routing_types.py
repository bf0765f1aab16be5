"""The result of routing one batch of tokens: what every other part reads.

Legend: T tokens, k choices per token, E experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


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
