"""Decoder-only byte-level language model on the MoE transformer.

Legend: B batch, L sequence length, D model width, V vocabulary (259 bytes + specials).

``logits, aux = model(ids)``; ``loss = lm_loss(logits, targets) + sum(aux.values())``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, Optional, Tuple
from datetime import timedelta

import torch
import torch.nn.functional as F
from torch import nn

from parallel.tensor import TensorParallel, vocab_cross_entropy, vocab_logits

from ..data.tokenizer import VOCAB_SIZE
from parallel.checks import check_bool, check_int, fail
from . import flops
from .transformer import (
    FlatModelConfig,
    Transformer,
    TransformerConfig,
    TransformerModel,
    dense_equivalent,
    init_weights,
)

__all__ = ["LMConfig", "LanguageModel", "lm_loss"]


@dataclass(frozen=True)
class LMConfig(FlatModelConfig):
    """A decoder-only LM: a causal ``TransformerConfig`` plus embeddings.

    Fields: ``transformer`` (``causal`` is forced to True), ``vocab_size`` (V),
    ``max_seq_len`` (learned positions), ``tie_embeddings`` (output head = token
    embedding), ``init_seed`` (weights depend only on it and parameter names).
    ``from_dict`` reads one flat mapping, transformer fields and LM fields side by side
    (``FlatModelConfig``).
    """

    FORCED_TRANSFORMER = {"causal": True}

    transformer: TransformerConfig = field(default_factory=lambda: TransformerConfig(causal=True))
    vocab_size: int = VOCAB_SIZE
    max_seq_len: int = 128
    tie_embeddings: bool = True
    init_seed: int = 0

    def __post_init__(self) -> None:
        p = "LMConfig"
        if not isinstance(self.transformer, TransformerConfig):
            fail(f"{p}.transformer", self.transformer, "it must be a TransformerConfig", wrong_type=True)
        if not self.transformer.causal:
            object.__setattr__(self, "transformer", replace(self.transformer, causal=True))
        if self.transformer.num_modalities != 1:
            fail(f"{p}.num_modalities", self.transformer.num_modalities, "an LM has one modality: it must be 1")
        check_int(f"{p}.vocab_size", self.vocab_size, minimum=2)
        check_int(f"{p}.max_seq_len", self.max_seq_len, minimum=1)
        check_bool(f"{p}.tie_embeddings", self.tie_embeddings)
        check_int(f"{p}.init_seed", self.init_seed, minimum=0)

    def to_dict(self) -> Dict[str, Any]:
        """The flat mapping ``from_dict`` accepts (every field, defaults included)."""
        out = self.transformer.to_dict()
        out.pop("causal")
        out.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "transformer"})
        return out

    def dense_baseline(self) -> "LMConfig":
        """Same LM with every MoE block replaced by a dense MLP of equal active FLOPs."""
        return replace(self, transformer=dense_equivalent(self.transformer))

    def flops_per_sample(self, seq_len: Optional[int] = None) -> int:
        """Forward FLOPs of one sequence of ``seq_len`` tokens (default ``max_seq_len``): every block
        and the head, per token (``moe.models.flops``)."""
        t = self.transformer
        L = seq_len or self.max_seq_len
        return L * (sum(t.block_flops_per_token(L)) + flops.projection_flops(t.d_model, self.vocab_size))


class LanguageModel(TransformerModel):
    """ids[B, L] -> (logits[B, L, V], aux); MoE layers named ``blocks.<i>.moe``.

    ``tp`` (a ``parallel.tensor.TensorParallel``): tensor parallelism. The token embedding
    (and an untied head) is then a vocabulary-parallel megatron-core embedding of
    V_pad = ceil(V / tp) * tp rows, and ``forward`` returns this rank's vocabulary piece of
    the logits, [B, L, V_pad / tp] (padding logits at the dtype's minimum); ``self.loss``
    turns either form into the mean cross entropy.

    ``pipe`` (a ``parallel.pipeline.StageRole``): pipeline parallelism; this rank then
    builds only its blocks, the first stage the embeddings, the last the final norm and
    the head (a tied head keeps a copy of the token embedding there).

    ``group_timeout``: the collective timeout of the groups the model creates (a hierarchical
    dispatcher's node groups; the job's, ``parallel.ProcessGroups.timeout``; None: torch's default).
    """

    tok_embed: Optional[nn.Module]  # on the first stage (and, tied, the last): None on a middle pipeline stage
    pos_embed: Optional[nn.Parameter]  # on the first stage
    head: Optional[nn.Module]  # on the last stage of an untied model

    def __init__(self, cfg: LMConfig, *, ep_group=None, dp_group=None, tp: Optional[TensorParallel] = None,
                 pipe=None, group_timeout: Optional[timedelta] = None):
        super().__init__()
        if not isinstance(cfg, LMConfig):
            raise TypeError(f"cfg must be an LMConfig, got {type(cfg).__name__}")
        self.config = cfg
        self.tp = tp = tp or TensorParallel()
        self.pipe = pipe
        first, last = (True, True) if pipe is None else (pipe.is_first, pipe.is_last)
        D = cfg.transformer.d_model
        # the tied head needs the token embedding on the last stage too: a copy whose gradient
        # is summed with the first stage's (parallel.grads, "pp_ends")
        self.tok_embed = tp.vocab_embedding(cfg.vocab_size, D) if first or (last and cfg.tie_embeddings) else None
        self.pos_embed = nn.Parameter(torch.zeros(cfg.max_seq_len, D)) if first else None
        self.transformer = Transformer(cfg.transformer, ep_group=ep_group, dp_group=dp_group, prefix="blocks", tp=tp,
                                       block_ids=None if pipe is None else pipe.block_ids, final_norm=last,
                                       group_timeout=group_timeout)
        self.head = None
        if not cfg.tie_embeddings and last:  # weight [V, D] either way: a linear head is an embedding-shaped matrix
            self.head = tp.vocab_embedding(cfg.vocab_size, D) if tp.enabled else nn.Linear(D, cfg.vocab_size,
                                                                                          bias=False)
        if pipe is not None and cfg.tie_embeddings and not (first and last) and self.tok_embed is not None:
            pipe.mark_tied(self.tok_embed.weight)  # the first and the last stage's copies (a middle one has none)
        init_weights(self, cfg.init_seed, std=cfg.transformer.init_std, n_layers=cfg.transformer.n_layers)

    def _check_ids(self, ids_BL: torch.Tensor) -> None:
        if ids_BL.dim() != 2 or ids_BL.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"ids must be an integer tensor [B, L], got {tuple(ids_BL.shape)} {ids_BL.dtype}")
        if ids_BL.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence length {ids_BL.shape[1]} exceeds max_seq_len={self.config.max_seq_len}")

    def forward(self, ids_BL: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        self._check_ids(ids_BL)
        (logits,), aux = self.run_pieces(ids_BL)
        return logits, aux

    # ---- pipeline pieces (moe.models.transformer): the state is (x[B, L, D],), a sequence piece under SP
    def pipe_embed(self, ids_BL: torch.Tensor) -> Tuple[torch.Tensor]:
        self._check_ids(ids_BL)
        if self.tok_embed is None or self.pos_embed is None:
            raise RuntimeError("this pipeline stage has no embeddings (they are held by the first stage)")
        x = self.tok_embed(ids_BL) + self.pos_embed[:ids_BL.shape[1]]
        return (self.transformer.enter(x),)

    def pipe_blocks(self, state, inputs, block_ids):
        x, aux = self.transformer.run(state[0], block_ids)
        return (x,), aux

    def pipe_head(self, state, inputs) -> Tuple[torch.Tensor]:
        h = self.transformer.exit(state[0])
        head = self.tok_embed if self.head is None else self.head
        if head is None:
            raise RuntimeError("this pipeline stage has no output head (it is held by the last stage)")
        return (vocab_logits(h, head, self.tp),)

    def state_shapes(self, inputs) -> list:
        B, L = inputs[0].shape
        return [(B, L // self.tp.size if self.tp.sp else L, self.config.transformer.d_model)]

    def loss(self, logits: torch.Tensor, targets_BL: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross entropy (fp32) of ``forward``'s logits (vocabulary-parallel under tp;
        then ``logits`` is consumed: megatron-core's cross entropy works in place)."""
        return vocab_cross_entropy(logits, targets_BL, self.tp)


def lm_loss(logits_BLV: torch.Tensor, targets_BL: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy (nats per token) in fp32."""
    return F.cross_entropy(logits_BLV.float().reshape(-1, logits_BLV.shape[-1]), targets_BL.reshape(-1))
