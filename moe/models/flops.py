"""Model FLOPs: the formulas of a block's, a token's and a sample's forward FLOPs (for MFU and the pipeline cut).

Each model config answers for its own FLOPs with these formulas:
``TransformerConfig.block_flops_per_token(seq_len)`` (every block; the pipeline's stage costs),
``TransformerConfig.active_ffn_flops_per_token()`` (the FFNs only; the dense twins),
``LMConfig.flops_per_sample(seq_len)`` and ``LIMoEConfig.flops_per_sample()`` (the trainer's MFU).
This module is a leaf: it knows the formulas, not the configs.

Legend: D model width, L sequence length (tokens attended over), E experts, k experts per
token, F an FFN's hidden width, V vocabulary size, J shared (contrastive) embedding width,
P patches per image, p patch side, I image channels.

A multiply-add counts 2 FLOPs. Forward FLOPs of one token in block i:

    attention projections   2 * 4 D^2         (q, k, v and the output projection)
    attention itself        2 * 2 L D         (scores q k^T and the weighted sum of v; the full
                                               L x L square, causal or not, as PaLM and Megatron count)
    FFN                     2 * k * m D F     (m = 3 for SwiGLU, else 2; an MoE block counts its k
                                               routed experts of width F_expert: ACTIVE parameters)
    router (MoE blocks)     2 D E

Training FLOPs are 3x the forward (the backward computes two products per forward one);
activation recomputation is not counted (model FLOPs, not hardware FLOPs). Embedding
lookups, norms, softmax and the losses are left out; the LM head (2 D V per token) and
LIMoE's patch embedding (2 p^2 I D per patch) and projections (2 D J per pooled
embedding) are in.
"""
from __future__ import annotations

__all__ = ["TRAIN_FLOPS_PER_FORWARD", "ffn_matmuls", "attention_flops", "ffn_flops", "router_flops",
           "projection_flops", "patch_embedding_flops"]

TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward (2x)


def ffn_matmuls(activation: str, width: int, d_model: int) -> int:
    """Multiply-adds of one FFN of hidden width ``width`` on one token (SwiGLU's input is [D, 2F])."""
    return (3 if activation == "swiglu" else 2) * d_model * width


def attention_flops(d_model: int, seq_len: int) -> int:
    """Attention of one token attending over ``seq_len``: projections 2 * 4 D^2, scores and sum 2 * 2 L D."""
    return 8 * d_model * d_model + 4 * seq_len * d_model


def ffn_flops(activation: str, width: int, d_model: int, experts_per_token: int = 1) -> int:
    """One token through ``experts_per_token`` FFNs of hidden width ``width`` (k routed experts, or 1 dense MLP)."""
    return 2 * experts_per_token * ffn_matmuls(activation, width, d_model)


def router_flops(d_model: int, num_experts: int) -> int:
    """The router's logits of one token: 2 D E."""
    return 2 * d_model * num_experts


def projection_flops(d_in: int, d_out: int) -> int:
    """One vector through a [d_in, d_out] linear map: the LM head (D -> V), LIMoE's projections (D -> J)."""
    return 2 * d_in * d_out


def patch_embedding_flops(patch_size: int, in_channels: int, d_model: int) -> int:
    """One image patch through the patchifier: 2 p^2 I D."""
    return 2 * patch_size ** 2 * in_channels * d_model
