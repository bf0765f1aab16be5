"""Model FLOPs: the forward FLOPs of a block, a token and a sample (for MFU and the pipeline cut).

Legend: D model width, L sequence length (tokens attended over), E experts, k experts per
token, F an FFN's hidden width, V vocabulary size, K shared embedding width, P patches
per image, p patch side, I image channels.

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
LIMoE's patch embedding (2 p^2 I D per patch) and projections (2 D K per pooled
embedding) are in.
"""
from __future__ import annotations

from typing import List

__all__ = ["ffn_matmuls", "block_flops_per_token", "forward_flops_per_sample", "TRAIN_FLOPS_PER_FORWARD"]

TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward (2x)


def ffn_matmuls(activation: str, width: int, d_model: int) -> int:
    """Multiply-adds of one FFN of hidden width ``width`` on one token (SwiGLU's input is [D, 2F])."""
    return (3 if activation == "swiglu" else 2) * d_model * width


def block_flops_per_token(cfg, seq_len: int) -> List[int]:
    """Forward FLOPs per token of every block of a ``TransformerConfig`` attending over ``seq_len``."""
    D = cfg.d_model
    out = []
    for i in range(cfg.n_layers):
        flops = 8 * D * D + 4 * seq_len * D
        if cfg.is_moe_layer(i):
            flops += 2 * cfg.moe.router.top_k * ffn_matmuls(cfg.activation, cfg.moe.d_ffn, D)
            flops += 2 * D * cfg.moe.num_experts
        else:
            flops += 2 * ffn_matmuls(cfg.activation, cfg.ffn_width(i), D)
        out.append(flops)
    return out


def forward_flops_per_sample(model_cfg, *, seq_len: int = None) -> int:
    """Forward FLOPs of one sample: an ``LMConfig`` sequence of ``seq_len`` tokens (default
    ``max_seq_len``), or a ``LIMoEConfig`` image-caption pair (P patches + the padded caption)."""
    from .limoe import LIMoEConfig
    from .lm import LMConfig

    t = model_cfg.transformer
    D = t.d_model
    if isinstance(model_cfg, LMConfig):
        L = seq_len or model_cfg.max_seq_len
        return L * (sum(block_flops_per_token(t, L)) + 2 * D * model_cfg.vocab_size)
    if isinstance(model_cfg, LIMoEConfig):
        P, L = model_cfg.num_patches, model_cfg.text_length
        image = P * (sum(block_flops_per_token(t, P)) + 2 * model_cfg.patch_size ** 2 * model_cfg.in_channels * D)
        text = L * sum(block_flops_per_token(t, L))
        return image + text + 2 * 2 * D * model_cfg.embed_dim
    raise TypeError(f"model_cfg must be an LMConfig or a LIMoEConfig, got {type(model_cfg).__name__}")
