"""LIMoE: one shared (MoE) transformer tower for images and text, trained contrastively.

Legend: B batch, I image channels (``in_channels``), S image side (``image_size``),
p patch side, P = (S/p)^2 patches, L text length, D model width, K shared embedding
width, T tokens routed by an MoE layer (all image patches + the real text tokens of
the batch), W data-parallel world size, Y zero-shot classes.

Images are cut into patches by a strided conv (ViT), text bytes are embedded;
each gets learned positions and a learned modality embedding (image=0, text=1).
Both go through the SAME blocks. In every block attention runs per sequence
within its modality (text with a key-padding mask), while the FFN sees all image
tokens and all real text tokens of the batch as ONE token set with modality ids,
so an MoE layer routes them together: BPR priorities, capacity and the
per-modality LIMoE losses (``limoe_local``, ``limoe_global``, per-modality
``load_balancing``) are computed over both modalities, as in Mustafa et al.
2022. Padding text tokens never reach the FFN (they keep their residual value and
are masked out as attention keys), so they do not change routing, capacity or the
losses, and the text embedding does not depend on how much padding there is.

Embeddings: image = mean of the patch outputs, text = mean of the real-token
outputs (after the final LayerNorm), each linearly projected to K and
L2-normalised. Contrastive loss (CLIP):
``logits = exp(logit_scale) * u v^T``, ``loss = (CE(logits, arange) + CE(logits^T, arange)) / 2``,
``exp(logit_scale)`` starts at ``1/0.07`` and is clamped to at most 100.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, Optional, Sequence, Tuple
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallel.rng import seed_block
from parallel.tensor import TensorParallel

from ..losses import load_balancing_loss
from ..modes import eval_mode
from ..data.shapes import caption_vocabulary
from ..data.tokenizer import VOCAB_SIZE, ByteTokenizer, WordTokenizer
from parallel.checks import check_bool, check_choice, check_int, check_number, fail
from . import flops
from .transformer import (
    FlatModelConfig,
    Transformer,
    TransformerConfig,
    TransformerModel,
    dense_equivalent,
    init_weights,
    sum_aux,
)

__all__ = ["LIMoEConfig", "LIMoEModel", "contrastive_loss", "zero_shot_accuracy", "zero_shot_predictions", "IMAGE",
           "TEXT", "TEXT_TOKENIZERS", "make_tokenizer"]

IMAGE, TEXT = 0, 1

# LIMoEConfig.text_tokenizer and image_stem values.
TEXT_TOKENIZERS = ("bytes", "words")
IMAGE_STEMS = ("patch", "conv")
TEXT_ENCODERS = ("sequence", "bag_of_words")


def make_tokenizer(name: str) -> ByteTokenizer:
    """The tokenizer of ``LIMoEConfig.text_tokenizer`` ``name``: bytes, or words of the shapes captions."""
    check_choice("text_tokenizer", name, TEXT_TOKENIZERS)
    return ByteTokenizer() if name == "bytes" else WordTokenizer(caption_vocabulary())


@dataclass(frozen=True)
class LIMoEConfig(FlatModelConfig):
    """The one-tower image-text model (``from_dict``: one flat mapping, ``FlatModelConfig``).

    Fields:
      transformer: the shared tower (``causal`` forced False, ``num_modalities`` forced 2).
      image_size, patch_size (must divide image_size), in_channels: the ViT patchifier.
      text_length: L, the fixed (padded) caption length in tokens; vocab_size: V (at least
        the tokenizer's vocabulary; extra rows are unused).
      text_tokenizer: ``"bytes"`` (UTF-8 bytes, any text) or ``"words"`` (one token per word
        of the built-in shapes captions' vocabulary, ``moe.data.shapes.caption_vocabulary``;
        other words become UNK): with words, "red" and "circle" are single tokens.
      text_encoder: ``"sequence"`` (text tokens attend to each other, with learned positions) or
        ``"bag_of_words"`` (each text token attends only to itself and gets no position
        embedding: the tower maps every word alone, and the text embedding is the mean of
        its words' outputs, so "a red circle" is built from "red" and "circle" whatever
        other words they were seen with; word order is ignored).
      image_stem: ``"patch"`` (ViT: one strided conv cuts and projects the patches) or
        ``"conv"`` (a 3x3 conv to ``stem_channels`` + GELU at full resolution first, then the
        strided patch conv; a pixel-level nonlinearity, so a shape's outline can be seen
        apart from its colour, as in "early convolutions" ViTs).
      stem_channels: C, the width of the ``"conv"`` stem.
      embed_dim: K, the shared embedding width.
      logit_scale_init: initial ``exp(logit_scale)`` (CLIP: 1/0.07); logit_scale_max: its clamp (100).
      joint_load_balancing: coefficient of a Switch load-balancing loss over the image
        AND text tokens of each MoE layer together (logged as ``load_balancing_joint``).
        The layer's own ``load_balancing`` is per modality (each modality spread over
        all experts); the joint one only asks the TOTAL load to be even, which leaves
        room for image and text experts (LIMoE applies its classic balancing losses
        to the whole batch and its entropy losses per modality).
      gather_negatives: with a data-parallel group of size > 1, compute the contrastive
        loss against the embeddings of the WHOLE global batch (all-gather with autograd,
        as CLIP does); otherwise each rank uses its local batch only.
      init_seed: weights depend only on it and parameter names (not on the EP layout).
    """

    FORCED_TRANSFORMER = {"causal": False, "num_modalities": 2}

    transformer: TransformerConfig = field(default_factory=lambda: TransformerConfig(num_modalities=2))
    image_size: int = 32
    patch_size: int = 8
    in_channels: int = 3
    text_length: int = 48
    vocab_size: int = VOCAB_SIZE
    text_tokenizer: str = "bytes"
    text_encoder: str = "sequence"
    image_stem: str = "patch"
    stem_channels: int = 32
    embed_dim: int = 64
    logit_scale_init: float = 1.0 / 0.07
    logit_scale_max: float = 100.0
    joint_load_balancing: float = 0.0
    gather_negatives: bool = True
    init_seed: int = 0

    def __post_init__(self) -> None:
        p = "LIMoEConfig"
        if not isinstance(self.transformer, TransformerConfig):
            fail(f"{p}.transformer", self.transformer, "it must be a TransformerConfig", wrong_type=True)
        t = self.transformer
        if t.causal or t.num_modalities != 2:
            object.__setattr__(self, "transformer", replace(t, causal=False, num_modalities=2))
        check_int(f"{p}.image_size", self.image_size, minimum=1)
        check_int(f"{p}.patch_size", self.patch_size, minimum=1)
        if self.image_size % self.patch_size:
            fail(f"{p}.patch_size", self.patch_size, f"it must divide image_size={self.image_size}")
        check_int(f"{p}.in_channels", self.in_channels, minimum=1)
        check_int(f"{p}.text_length", self.text_length, minimum=1)
        check_choice(f"{p}.text_tokenizer", self.text_tokenizer, TEXT_TOKENIZERS)
        check_int(f"{p}.vocab_size", self.vocab_size, minimum=2)
        needed = make_tokenizer(self.text_tokenizer).vocab_size
        if self.vocab_size < needed:
            fail(f"{p}.vocab_size", self.vocab_size,
                 f"it must be >= {needed}, the vocabulary of text_tokenizer={self.text_tokenizer!r}")
        check_int(f"{p}.embed_dim", self.embed_dim, minimum=1)
        check_choice(f"{p}.image_stem", self.image_stem, IMAGE_STEMS)
        check_choice(f"{p}.text_encoder", self.text_encoder, TEXT_ENCODERS)
        check_int(f"{p}.stem_channels", self.stem_channels, minimum=1)
        check_number(f"{p}.logit_scale_max", self.logit_scale_max, minimum=0.0, min_open=True)
        check_number(f"{p}.logit_scale_init", self.logit_scale_init, minimum=0.0, min_open=True,
                     maximum=self.logit_scale_max)
        check_number(f"{p}.joint_load_balancing", self.joint_load_balancing, minimum=0.0)
        check_bool(f"{p}.gather_negatives", self.gather_negatives)
        check_int(f"{p}.init_seed", self.init_seed, minimum=0)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> Dict[str, Any]:
        """The flat mapping ``from_dict`` accepts (every field, defaults included)."""
        out = self.transformer.to_dict()
        for forced in ("causal", "num_modalities"):
            out.pop(forced)
        out.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "transformer"})
        return out

    def dense_baseline(self) -> "LIMoEConfig":
        """Same model with every MoE block replaced by a dense MLP of equal active FLOPs."""
        return replace(self, transformer=dense_equivalent(self.transformer))

    def flops_per_sample(self) -> int:
        """Forward FLOPs of one image-caption pair (``moe.models.flops``): P patches through the patchifier
        and every block, the padded caption's L tokens through every block, and the two projections to K."""
        t = self.transformer
        P, L, D = self.num_patches, self.text_length, t.d_model
        image = P * (sum(t.block_flops_per_token(P)) + flops.patch_embedding_flops(self.patch_size, self.in_channels, D))
        text = L * sum(t.block_flops_per_token(L))
        return image + text + 2 * flops.projection_flops(D, self.embed_dim)


def contrastive_loss(u_BK: torch.Tensor, v_BK: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """CLIP loss for matched rows: ``(CE(s u v^T, arange) + CE(s v u^T, arange)) / 2`` (fp32)."""
    logits = (u_BK.float() @ v_BK.float().t()) * scale
    target = torch.arange(u_BK.shape[0], device=u_BK.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


class _GatherRows(torch.autograd.Function):
    """x[b, K] on every rank of ``group`` -> cat over ranks [W*b, K]; backward: the sum over
    ranks of the gradient w.r.t. this rank's rows (every rank's loss used them)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


class LIMoEModel(TransformerModel):
    """``u, v, aux = model(images, tokens, mask)``: L2-normalised embeddings u[B, K], v[B, K]."""

    # Its blocks run as ``attend`` (images, then text) + ``feed_forward``, not through ``Block.forward``:
    # ZeRO on FSDP2 (moe.models.sharding) shards their dense parameters in the root unit, not per block.
    fsdp_block_units = False

    def __init__(self, cfg: LIMoEConfig, *, ep_group=None, dp_group=None, tp: Optional[TensorParallel] = None,
                 pipe=None, group_timeout: Optional[timedelta] = None):
        super().__init__()
        if not isinstance(cfg, LIMoEConfig):
            raise TypeError(f"cfg must be a LIMoEConfig, got {type(cfg).__name__}")
        if tp is not None and tp.sp:
            raise ValueError("LIMoEModel: sequence parallelism is not supported (image and text token sets are "
                             "not sequences of one length); tensor parallelism without it is")
        self.config, self.dp_group, self.pipe = cfg, dp_group, pipe
        first, last = (True, True) if pipe is None else (pipe.is_first, pipe.is_last)
        D = cfg.transformer.d_model
        if first:  # the embeddings live on the first pipeline stage
            patch_in = cfg.in_channels
            if cfg.image_stem == "conv":  # [B, I, S, S] -> [B, C, S, S]
                self.stem = nn.Sequential(nn.Conv2d(cfg.in_channels, cfg.stem_channels, 3, padding=1), nn.GELU())
                patch_in = cfg.stem_channels
            self.patch_embed = nn.Conv2d(patch_in, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
            self.image_pos_embed = nn.Parameter(torch.zeros(cfg.num_patches, D))
            self.tok_embed = nn.Embedding(cfg.vocab_size, D)
            if cfg.text_encoder == "sequence":  # a bag of words has no positions
                self.text_pos_embed = nn.Parameter(torch.zeros(cfg.text_length, D))
            self.modality_embed = nn.Embedding(2, D)
        self.transformer = Transformer(cfg.transformer, ep_group=ep_group, dp_group=dp_group, prefix="blocks", tp=tp,
                                       block_ids=None if pipe is None else pipe.block_ids, final_norm=last,
                                       group_timeout=group_timeout)
        if last:  # the projections and the temperature on the last one
            self.image_proj = nn.Linear(D, cfg.embed_dim, bias=False)
            self.text_proj = nn.Linear(D, cfg.embed_dim, bias=False)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale_init)))
        self.tokenizer = make_tokenizer(cfg.text_tokenizer)
        init_weights(self, cfg.init_seed, std=cfg.transformer.init_std, n_layers=cfg.transformer.n_layers)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ pieces
    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped to ``logit_scale_max``."""
        return self.logit_scale.clamp(max=math.log(self.config.logit_scale_max)).exp()

    def tokenize(self, texts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (ids[B, L], mask[B, L]) as ``ImageTextCollator`` does (EOS appended, right padding)."""
        enc = self.tokenizer.encode_batch(list(texts), self.config.text_length, add_eos=True)
        return enc.ids.to(self.device), enc.mask.to(self.device)

    def _embed_images(self, images_BISS: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if images_BISS.dim() != 4 or tuple(images_BISS.shape[1:]) != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"images must have shape [B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}], "
                             f"got {tuple(images_BISS.shape)}")
        x = images_BISS.to(self.patch_embed.weight.dtype)
        if cfg.image_stem == "conv":
            x = self.stem(x)                                                     # [B, C, S, S]
        x = self.patch_embed(x).flatten(2).transpose(1, 2)                      # [B, P, D]
        return x + self.image_pos_embed + self.modality_embed.weight[IMAGE]

    def _embed_text(self, tokens_BL: torch.Tensor, mask_BL: Optional[torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        if tokens_BL.dim() != 2 or tokens_BL.shape[1] > cfg.text_length:
            raise ValueError(f"tokens must have shape [B, L] with L <= text_length={cfg.text_length}, "
                             f"got {tuple(tokens_BL.shape)}")
        if mask_BL is None or tuple(mask_BL.shape) != tuple(tokens_BL.shape):
            raise ValueError(f"mask must be a bool tensor of the tokens' shape {tuple(tokens_BL.shape)}")
        if not bool(mask_BL.any(1).all()):
            raise ValueError("every text row needs at least one real token (mask row all False)")
        L = tokens_BL.shape[1]
        if cfg.text_encoder == "bag_of_words":
            return self.tok_embed(tokens_BL) + self.modality_embed.weight[TEXT]
        return self.tok_embed(tokens_BL) + self.text_pos_embed[:L] + self.modality_embed.weight[TEXT]

    def encode_tokens(self, images: Optional[torch.Tensor] = None, tokens: Optional[torch.Tensor] = None,
                      mask: Optional[torch.Tensor] = None
                      ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        """Run the shared tower on images[B_i, I, S, S] and/or text tokens[B_t, L] (mask[B_t, L]).

        Returns (image outputs[B_i, P, D] or None, text outputs[B_t, L, D] or None, aux), after
        the final LayerNorm. The MoE FFN of each block gets ``cat(image tokens, real text
        tokens)`` [T, D] with modality ids [T] (0 image, 1 text). One process only (a pipeline
        stage holds part of the tower: use ``forward`` / ``encode_image`` / ``encode_text``).
        """
        if self.pipe is not None:
            raise RuntimeError("encode_tokens runs the whole tower; under pipeline parallelism use forward, "
                               "encode_image or encode_text")
        inputs = (images, tokens, mask)
        state, aux = self.pipe_blocks(self.pipe_embed(*inputs), inputs, self.blocks.indices())
        img, txt = state
        ln = self.transformer.exit
        return (ln(img) if img is not None else None, ln(txt) if txt is not None else None, aux)

    # ---- pipeline pieces (moe.models.transformer): the state is (x_img[B, P, D] | None, x_txt[B, L, D] | None)
    def pipe_embed(self, images, tokens, mask) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        if images is None and tokens is None:
            raise ValueError("give images, tokens or both")
        x_img = self._embed_images(images) if images is not None else None
        x_txt = self._embed_text(tokens, None if mask is None else mask.to(torch.bool)) if tokens is not None else None
        return x_img, x_txt

    def pipe_blocks(self, state, inputs, block_ids):
        x_img, x_txt = state
        mask = inputs[2]
        real = mask.to(torch.bool) if x_txt is not None else None
        txt_mask = real[:, None, None, :] if real is not None else None  # [B, 1, 1, L]: keys that may be attended
        if txt_mask is not None and self.config.text_encoder == "bag_of_words":  # [B, 1, L, L]: itself only
            L = real.shape[1]
            txt_mask = txt_mask & torch.eye(L, dtype=torch.bool, device=real.device)[None, None]
        aux: Dict[str, torch.Tensor] = {}
        for i in block_ids:
            block = self.transformer.blocks[i]
            seed_block(i)
            parts, mods = [], []
            if x_img is not None:
                x_img = block.attend(x_img)
                parts.append(x_img.reshape(-1, x_img.shape[-1]))
                mods.append(torch.full((parts[-1].shape[0],), IMAGE, dtype=torch.long, device=x_img.device))
            if x_txt is not None:
                x_txt = block.attend(x_txt, txt_mask)
                parts.append(x_txt[real])
                mods.append(torch.full((parts[-1].shape[0],), TEXT, dtype=torch.long, device=x_txt.device))
            y_TD, a = block.feed_forward(torch.cat(parts) if len(parts) > 1 else parts[0],
                                         torch.cat(mods) if len(mods) > 1 else mods[0])
            sum_aux(aux, a)
            if block.is_moe and self.config.joint_load_balancing > 0:
                sum_aux(aux, {"load_balancing_joint": self._joint_balance(block.moe)})
            n_img = 0
            if x_img is not None:
                n_img = x_img.shape[0] * x_img.shape[1]
                x_img = y_TD[:n_img].view_as(x_img)
            if x_txt is not None:
                x_txt = x_txt.masked_scatter(real[..., None], y_TD[n_img:])
        return (x_img, x_txt), aux

    def pipe_head(self, state, inputs) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
        """(u or None, v or None, exp(logit_scale)): the temperature travels with the embeddings so an
        evaluation on any pipeline stage can score them."""
        x_img, x_txt = state
        ln = self.transformer.exit
        mask = inputs[2]
        u, v = self._pool_project(ln(x_img) if x_img is not None else None,
                                  ln(x_txt) if x_txt is not None else None,
                                  mask.to(torch.bool) if mask is not None else None)
        return u, v, self.scale()

    def state_shapes(self, inputs) -> list:
        images, tokens, _ = inputs
        D = self.config.transformer.d_model
        return [None if images is None else (images.shape[0], self.config.num_patches, D),
                None if tokens is None else (tokens.shape[0], tokens.shape[1], D)]

    def _joint_balance(self, layer) -> torch.Tensor:
        r = layer.last_routing
        if r.skipped:
            return torch.zeros((), device=r.probs.device)
        probs = r.probs / r.probs.sum(-1, keepdim=True).clamp_min(1e-30)
        return self.config.joint_load_balancing * load_balancing_loss(probs, r.experts, r.num_experts)

    def _pool_project(self, img_BPD, txt_BLD, real_BL):
        u = v = None
        if img_BPD is not None:
            u = F.normalize(self.image_proj(img_BPD.mean(1)).float(), dim=-1)
        if txt_BLD is not None:
            w = real_BL.to(txt_BLD.dtype)[..., None]
            pooled = (txt_BLD * w).sum(1) / w.sum(1)
            v = F.normalize(self.text_proj(pooled).float(), dim=-1)
        return u, v

    # ------------------------------------------------------------------ API
    def forward(self, images: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        """images[B, I, S, S], tokens[B, L], mask[B, L] -> (u[B, K], v[B, K], aux), rows L2-normalised, fp32."""
        if mask is None:
            raise ValueError("mask must be a bool tensor of the tokens' shape")
        (u, v, _), aux = self.run_pieces(images, tokens, mask)
        return u, v, aux

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images[B, I, S, S] -> u[B, K] (an image-only forward; aux discarded)."""
        return self.run_pieces(images, None, None)[0][0]

    def encode_text(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens[B, L], mask[B, L] -> v[B, K] (a text-only forward; aux discarded)."""
        if mask is None:
            raise ValueError("mask must be a bool tensor of the tokens' shape")
        return self.run_pieces(None, tokens, mask)[0][1]

    def contrastive_loss(self, u_BK: torch.Tensor, v_BK: torch.Tensor) -> torch.Tensor:
        """CLIP loss with the learned temperature; over the global batch when gathering negatives.

        With ``gather_negatives`` and a data-parallel group of size W > 1 (every rank
        holding the same local batch size b), rank r scores its b rows against all
        W*b columns: ``(CE(s u_r V^T, r*b + arange) + CE(s v_r U^T, r*b + arange)) / 2``.
        The all-gather's backward sums the gradients, so after the usual data-parallel
        gradient averaging the update equals that of the single-process loss on the
        global batch.
        """
        scale = self.scale()
        group = self.dp_group
        if not (self.config.gather_negatives and group is not None and dist.is_initialized()
                and dist.get_world_size(group) > 1):
            return contrastive_loss(u_BK, v_BK, scale)
        u_all = _GatherRows.apply(u_BK, group)
        v_all = _GatherRows.apply(v_BK, group)
        b = u_BK.shape[0]
        target = dist.get_rank(group) * b + torch.arange(b, device=u_BK.device)
        li = F.cross_entropy((u_BK.float() @ v_all.float().t()) * scale, target)
        lt = F.cross_entropy((v_BK.float() @ u_all.float().t()) * scale, target)
        return 0.5 * (li + lt)


@torch.no_grad()
def zero_shot_predictions(model: LIMoEModel, images: torch.Tensor, prompts: Sequence[str], *,
                          batch_size: int = 256) -> torch.Tensor:
    """LongTensor[n]: for each of images[n, I, S, S], the index of its closest prompt (argmax of ``u v^T``).

    Runs in eval mode and restores the previous mode.
    """
    if len(prompts) == 0:
        raise ValueError("prompts is empty; give one caption per class")
    check_int("batch_size", batch_size, minimum=1)
    with eval_mode(model):
        ids, mask = model.tokenize(prompts)
        v = model.encode_text(ids, mask)                                        # [Y, K]
        preds = [(model.encode_image(images[start:start + batch_size].to(v.device)) @ v.t()).argmax(-1).cpu()
                 for start in range(0, images.shape[0], batch_size)]            # [b] each
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def zero_shot_accuracy(model: LIMoEModel, images: torch.Tensor, labels: torch.Tensor, prompts: Sequence[str],
                       *, batch_size: int = 256) -> float:
    """Share of images[n, I, S, S] whose closest prompt embedding is prompts[labels[n]].

    One caption per class (``prompts[c]`` for class c); a prediction is the argmax of
    ``u v^T`` over the classes. Runs in eval mode and restores the previous mode.
    """
    if len(prompts) == 0:
        raise ValueError("prompts is empty; give one caption per class")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images ({images.shape[0]}) and labels ({labels.shape[0]}) differ in length")
    pred = zero_shot_predictions(model, images, prompts, batch_size=batch_size)
    return int((pred == labels.cpu()).sum()) / max(1, images.shape[0])
