"""Pre-LN transformer blocks whose FFN is a dense MLP or a ``moe.MoELayer``.

Legend: B batch, L sequence length, D model width, H heads, F FFN width,
T tokens (flattened, real tokens only), E experts, k experts per token.

A block is ``x + attn(ln1(x))`` then ``x + ffn(ln2(x))``. The two halves are
separate methods (``attend`` and ``feed_forward``) so a model can run attention
per sequence and hand the FFN any token set it likes: the LIMoE model feeds the
image and text tokens of a batch to one MoE call together, with modality ids.

Every ``moe_every``-th block (layers ``moe_every-1, 2*moe_every-1, ...``, i.e.
"every other layer, the second of each pair" for ``moe_every=2``, as in V-MoE)
has a ``MoELayer`` named ``blocks.<i>.moe``; the others a dense MLP
``blocks.<i>.mlp``. MoE layers get their process groups passed in explicitly (one
``moe.MoEGroups``, built once by ``Transformer``): nothing is read from global state.

``TransformerConfig.moe`` is a ``moe.MoEConfig``; with ``num_experts == 1`` those
blocks are plain dense MLPs of width ``moe.d_ffn`` (one expert, softmax weight 1,
nothing ever dropped, is exactly a dense MLP); ``dense_equivalent(cfg)`` uses that
to make the dense baseline with the same active FFN FLOPs per token.
``compile_blocks(model)`` applies ``torch.compile`` to every block. Activation checkpointing
(``moe.models.activation_checkpointing.apply_activation_checkpointing``) sets ``Block.recompute`` (mode ``block``:
``Block.forward``, or each half a model calls itself, runs again in the backward) or
``MoELayer.recompute`` (mode ``moe``); the recompute replays the routing of the forward.

Blocks are kept by their GLOBAL index (``BlockStack``): a pipeline stage builds only
its blocks (``Transformer(block_ids=...)``) and their parameter names stay those of the
whole model. During training every block re-seeds torch's RNG from the micro-batch's
seed and its own index (``parallel.rng.seed_block``), so the random numbers a block draws
(dropout, GShard's random second expert, noise, jitter) do not depend on which blocks
ran before it in the same process: a pipelined run draws what one process draws.

The pipeline protocol of a ``TransformerModel`` (the stage pieces
``parallel.pipeline`` runs): ``pipe_embed(*inputs) -> state`` (first stage),
``pipe_blocks(state, inputs, block_ids) -> (state, aux)`` (any stage),
``pipe_head(state, inputs) -> outputs`` (last stage) and ``state_shapes(inputs)``; the
state is a tuple of float tensors [B, ..., D] that travels between stages.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallel.pipeline import StageRole
from parallel.rng import init_generator, seed_block
from parallel.shards import shard_of, take_piece
from parallel.tensor import TensorParallel

from parallel.checks import (
    ConfigError,
    check_bool,
    check_choice,
    check_int,
    check_number,
    fail,
    join,
)
from .. import recompute
from ..config import ACTIVATIONS, MoEConfig, RouterConfig
from ..config_build import FromDict, construct
from ..dispatch import world_node_groups
from ..experts import Experts
from ..layer import MoEGroups, MoELayer
from . import flops

__all__ = [
    "OWNED_MOE_FIELDS",
    "BlockStack",
    "TransformerConfig",
    "MLP",
    "Attention",
    "Block",
    "Transformer",
    "TransformerModel",
    "attention_mask",
    "active_ffn_flops_per_token",
    "dense_equivalent",
    "init_weights",
    "sum_aux",
    "FlatModelConfig",
    "compile_blocks",
]


# ----------------------------------------------------------------------------- configs

# MoEConfig fields a transformer sets on its MoE blocks itself (not keys of ``model.moe``).
OWNED_MOE_FIELDS = ("d_model", "activation", "num_modalities")


@dataclass(frozen=True)
class TransformerConfig(FromDict):
    """A stack of pre-LN blocks.

    Fields:
      d_model: D; n_layers: number of blocks; n_heads: H (must divide D).
      d_ffn: width of the dense MLP blocks (and the default width of each expert).
      activation: one of ``moe.config.ACTIVATIONS`` (dense MLPs and experts alike).
      causal: causal self-attention (decoder) or bidirectional (encoder).
      moe_every: 0 = all blocks dense; n > 0 = blocks n-1, 2n-1, ... are MoE blocks.
      moe: the ``moe.MoEConfig`` of the MoE blocks (required iff ``moe_every > 0``). Its
        ``d_model``, ``activation`` and ``num_modalities`` are the transformer's (set here
        whatever they were); ``num_experts == 1`` makes those blocks dense MLPs of width
        ``moe.d_ffn`` (the dense stand-in of ``dense_equivalent``).
      num_modalities: modality ids the MoE layers accept (LIMoE: 2).
      dropout: dropout on attention probabilities and residual branches, in [0, 1). Under
        tensor parallelism the attention masks of each rank's heads (and, with sequence
        parallelism, the residual masks of each sequence piece) come from a per-rank fork
        of the RNG: the same distribution as one process, not the same draws.
      norm_eps: LayerNorm epsilon.
      init_std: std of the normal init of weights (output projections are scaled
        down by ``sqrt(2 * n_layers)``); also ``moe.init_std``'s default from YAML.

    From YAML (``from_dict``), ``moe`` is a mapping of every ``MoEConfig`` field except
    ``OWNED_MOE_FIELDS``; ``moe.d_ffn`` defaults to ``d_ffn``.
    """

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ffn: int = 512
    activation: str = "gelu"
    causal: bool = False
    moe_every: int = 0
    moe: Optional[MoEConfig] = None
    num_modalities: int = 1
    dropout: float = 0.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        p = "TransformerConfig"
        check_int(f"{p}.d_model", self.d_model, minimum=1)
        check_int(f"{p}.n_layers", self.n_layers, minimum=1)
        check_int(f"{p}.n_heads", self.n_heads, minimum=1)
        if self.d_model % self.n_heads:
            divisors = [h for h in range(1, self.d_model + 1) if self.d_model % h == 0]
            fail(f"{p}.n_heads", self.n_heads, f"it must divide d_model={self.d_model} (e.g. one of {divisors[:12]})")
        check_int(f"{p}.d_ffn", self.d_ffn, minimum=1)
        check_choice(f"{p}.activation", self.activation, ACTIVATIONS)
        check_bool(f"{p}.causal", self.causal)
        check_int(f"{p}.moe_every", self.moe_every, minimum=0, maximum=self.n_layers)
        if self.moe_every > 0 and self.moe is None:
            fail(f"{p}.moe", None, f"moe_every={self.moe_every} needs a 'moe' section; "
                 "set moe_every=0 for an all-dense transformer")
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            fail(f"{p}.moe", self.moe, "it must be a moe.MoEConfig or None", wrong_type=True)
        if self.moe_every == 0 and self.moe is not None:
            fail(f"{p}.moe_every", 0, "moe is set, so it must be > 0 (or drop 'moe')")
        check_int(f"{p}.num_modalities", self.num_modalities, minimum=1)
        check_number(f"{p}.dropout", self.dropout, minimum=0.0, maximum=1.0, max_open=True)
        check_number(f"{p}.norm_eps", self.norm_eps, minimum=0.0, maximum=1.0, min_open=True)
        check_number(f"{p}.init_std", self.init_std, minimum=0.0, min_open=True)
        if self.moe is not None:
            owned = {k: getattr(self, k) for k in OWNED_MOE_FIELDS}
            if any(getattr(self.moe, k) != v for k, v in owned.items()):
                try:
                    object.__setattr__(self, "moe", replace(self.moe, **owned))
                except ConfigError as e:
                    raise e.rebased("MoEConfig", f"{p}.moe") from None

    @classmethod
    def dict_kwargs(cls, kw: Dict[str, Any], path: str) -> Dict[str, Any]:
        """``from_dict``'s hook: ``moe`` built as a ``MoEConfig`` with the fields the transformer owns.

        The transformer's own fields are checked first, so a bad d_model is named
        'model.d_model' rather than 'model.moe.d_model'.
        """
        if kw.get("moe") is not None and not isinstance(kw["moe"], MoEConfig):
            construct(cls, {**kw, "moe": None, "moe_every": 0}, path)
            own = {k: kw.get(k, getattr(cls, k)) for k in OWNED_MOE_FIELDS}
            defaults = {"d_ffn": kw.get("d_ffn", cls.d_ffn), "init_std": kw.get("init_std", cls.init_std)}
            kw = {**kw, "moe": MoEConfig.from_dict(kw["moe"], join(path, "moe"), owned=own, defaults=defaults)}
        return super().dict_kwargs(kw, path)

    def to_dict(self) -> Dict[str, Any]:
        """Plain data that ``from_dict`` accepts (``moe`` without the owned fields)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.moe is not None:
            out["moe"] = self.moe.to_dict(exclude=OWNED_MOE_FIELDS)
        return out

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def is_moe_layer(self, i: int) -> bool:
        """Whether block ``i`` (0-based) has an MoE FFN (a sparse one: more than one expert)."""
        return self.is_moe_position(i) and self.moe_config(i).num_experts > 1

    def is_moe_position(self, i: int) -> bool:
        """Whether block ``i`` takes its FFN from ``moe`` (MoE, or its one-expert dense stand-in)."""
        return self.moe_every > 0 and (i + 1) % self.moe_every == 0

    def ffn_width(self, i: int) -> int:
        """Width of block ``i``'s FFN (each expert's width for MoE blocks)."""
        return self.moe_config(i).d_ffn if self.is_moe_position(i) else self.d_ffn

    def moe_config(self, i: int) -> MoEConfig:
        """The ``moe.MoEConfig`` of MoE block ``i`` (the same for every MoE block)."""
        if not self.is_moe_position(i):
            raise ValueError(f"block {i} is not an MoE block (moe_every={self.moe_every})")
        assert self.moe is not None  # __post_init__: moe_every > 0 needs a moe section
        return self.moe

    # ---- forward FLOPs (the formulas: moe.models.flops)
    def ffn_flops_per_token(self, i: int) -> int:
        """Forward FLOPs of block ``i``'s FFN on one token: an MoE block counts ``k`` experts of width
        ``F_expert`` (the nominal ``top_k``: ACTIVE parameters; GShard's random routing skips some 2nd
        choices, and drops skip more, so the realised count is at most this), a dense block its MLP."""
        k = self.moe_config(i).router.top_k if self.is_moe_layer(i) else 1
        return flops.ffn_flops(self.activation, self.ffn_width(i), self.d_model, k)

    def block_flops_per_token(self, seq_len: int) -> List[int]:
        """Forward FLOPs per token of every block attending over ``seq_len``: attention, the FFN
        (``ffn_flops_per_token``) and, in an MoE block, the router (the pipeline's stage costs)."""
        out = []
        for i in range(self.n_layers):
            cost = flops.attention_flops(self.d_model, seq_len) + self.ffn_flops_per_token(i)
            if self.is_moe_layer(i):
                cost += flops.router_flops(self.d_model, self.moe_config(i).num_experts)
            out.append(cost)
        return out

    def active_ffn_flops_per_token(self) -> int:
        """Forward FLOPs of the FFNs one token passes through, summed over blocks (no router: it is
        small and has no dense counterpart); equal for a model and its ``dense_equivalent``."""
        return sum(self.ffn_flops_per_token(i) for i in range(self.n_layers))


class FlatModelConfig(FromDict):
    """Base of a model config (LM, LIMoE) holding a ``transformer: TransformerConfig`` whose
    YAML mapping is flat: the transformer's keys beside the model's own.

    ``from_dict({"d_model": 128, "moe_every": 2, "moe": {...}, "max_seq_len": 128})``; an
    unknown key is named with every allowed key. ``FORCED_TRANSFORMER``: transformer fields
    the model sets itself (a decoder's ``causal``), over whatever the mapping holds.
    """

    DICT_PATH = "model"
    FORCED_TRANSFORMER: ClassVar[Mapping[str, Any]] = {}

    @classmethod
    def dict_keys(cls) -> List[str]:
        return [f.name for f in fields(cls) if f.name != "transformer"] + TransformerConfig.dict_keys()

    @classmethod
    def dict_kwargs(cls, kw: Dict[str, Any], path: str) -> Dict[str, Any]:
        t_keys = TransformerConfig.dict_keys()
        t = {k: v for k, v in kw.items() if k in t_keys}
        own = {k: v for k, v in kw.items() if k not in t_keys}
        return {**own, "transformer": TransformerConfig.from_dict(t, path, forced=cls.FORCED_TRANSFORMER)}


# ----------------------------------------------------------------------------- FLOPs and the dense baseline

def active_ffn_flops_per_token(cfg) -> int:
    """``TransformerConfig.active_ffn_flops_per_token`` of a ``TransformerConfig`` or of a model
    config holding one as ``.transformer`` (LM, LIMoE)."""
    t = getattr(cfg, "transformer", cfg)
    if not isinstance(t, TransformerConfig):
        raise TypeError(f"cfg must be a TransformerConfig or have a .transformer one, got {type(cfg).__name__}")
    return t.active_ffn_flops_per_token()


def dense_equivalent(cfg: TransformerConfig) -> TransformerConfig:
    """The dense baseline with the same active FFN FLOPs per token.

    Every MoE block becomes a one-expert block, i.e. a dense MLP of width
    ``top_k * F_expert`` (so a top-2 model's baseline MLP is twice as wide as
    one expert); dense blocks are unchanged. No balancing losses remain.
    """
    if cfg.moe is None or cfg.moe.num_experts == 1:  # moe is None exactly when moe_every == 0
        return cfg
    width = cfg.moe.router.top_k * cfg.moe.d_ffn
    dense = MoEConfig(d_model=cfg.d_model, d_ffn=width, num_experts=1, router=RouterConfig(top_k=1, policy="topk"),
                      activation=cfg.activation, backend=cfg.moe.backend, aux_losses={},
                      num_modalities=cfg.num_modalities, init_std=cfg.moe.init_std)
    return replace(cfg, moe=dense)


# ----------------------------------------------------------------------------- modules

# The element-wise activations of a dense MLP (SwiGLU, which pairs the hidden units, is MLP.forward's own).
_ACTIVATION_FNS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class MLP(nn.Module):
    """Dense FFN: x[..., D] -> w_out(act(w_in(x)))[..., D].

    SwiGLU: ``w_in`` gives gate and up of every hidden unit side by side (unit-major rows
    ``(unit, {gate, up})``, ``parallel.shards``). Under tensor parallelism ``w_in`` is
    column-parallel and ``w_out`` row-parallel (megatron-core, ``parallel.tensor``): each
    tp rank holds F/tp hidden units.
    """

    def __init__(self, d_model: int, d_ffn: int, activation: str = "gelu", *, tp: Optional[TensorParallel] = None):
        super().__init__()
        tp = tp or TensorParallel()
        self.activation = activation
        self.w_in = tp.column_linear(d_model, 2 * d_ffn if activation == "swiglu" else d_ffn)
        self.w_out = tp.row_linear(d_ffn, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w_in(x)
        if self.activation == "swiglu":
            units = h.view(*h.shape[:-1], -1, 2)
            h = F.silu(units[..., 0]) * units[..., 1]
        else:
            h = _ACTIVATION_FNS[self.activation](h)
        return self.w_out(h)


def attention_mask(key_padding_mask: Optional[torch.Tensor], causal: bool, length: int,
                   device=None) -> Optional[torch.Tensor]:
    """Boolean SDPA mask (True = may attend) of shape [B or 1, 1, L, L], or None when nothing is masked.

    key_padding_mask: BoolTensor[B, L], True on real tokens. Causal masks key j > query i.
    """
    mask = None
    if causal:
        mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
    if key_padding_mask is not None:
        keys = key_padding_mask[:, None, None, :].to(torch.bool)
        mask = keys if mask is None else (mask & keys)
    return mask


class Attention(nn.Module):
    """Multi-head self-attention with ``F.scaled_dot_product_attention``: x[B, L, D] -> [B, L, D].

    ``qkv`` rows are head-major, ``(head, {q, k, v}, head_dim)``, so under tensor
    parallelism (``qkv`` column-parallel, ``out`` row-parallel, megatron-core) each tp rank
    holds whole heads: H/tp of them. With sequence parallelism x and the result are
    sequence pieces [B, L/tp, D]; ``qkv`` gathers the sequence, ``out`` scatters it.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, *, tp: Optional[TensorParallel] = None):
        super().__init__()
        tp = self.tp = tp or TensorParallel()
        if n_heads % tp.size:
            raise ValueError(f"n_heads={n_heads} must be divisible by the tensor-parallel size {tp.size}")
        self.n_heads, self.head_dim, self.dropout = n_heads // tp.size, d_model // n_heads, dropout
        self.qkv = tp.column_linear(d_model, 3 * d_model)
        self.out = tp.row_linear(d_model, d_model)

    def forward(self, x_BLD: torch.Tensor, mask: Optional[torch.Tensor] = None, causal: bool = False) -> torch.Tensor:
        """mask: bool [B|1, 1, L, L] (True = attend) or None; ``causal`` is used only when mask is None."""
        qkv = self.qkv(x_BLD)
        B, L = qkv.shape[:2]
        q, k, v = qkv.view(B, L, self.n_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        p = self.dropout if self.training else 0.0
        with self.tp.rank_rng(p > 0):  # this rank's heads draw their own dropout masks
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                               is_causal=causal and mask is None)
        return self.out(y.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))


class Block(nn.Module):
    """Pre-LN block: ``x + attn(ln1(x))`` then ``x + ffn(ln2(x))``; FFN = ``mlp`` or ``moe``."""

    index: int
    attn: Attention
    moe: MoELayer  # set on an MoE block (``is_moe``)
    mlp: MLP  # set on a dense block

    def __init__(self, cfg: TransformerConfig, index: int, *, groups: Optional[MoEGroups] = None,
                 prefix: str = "blocks", tp: Optional[TensorParallel] = None):
        """``groups``: the process groups of the block's MoE layer (``Transformer`` builds them once)."""
        super().__init__()
        tp = self.tp = tp or TensorParallel()
        self.index, self.causal = index, cfg.causal
        self.ln1 = tp.mark_norm(nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps))
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout, tp=tp)
        self.ln2 = tp.mark_norm(nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps))
        self.drop = nn.Dropout(cfg.dropout)
        self.is_moe = cfg.is_moe_layer(index)
        if self.is_moe:
            self.moe = MoELayer(cfg.moe_config(index), groups=groups, name=f"{prefix}.{index}.moe")
        else:
            self.mlp = MLP(cfg.d_model, cfg.ffn_width(index), cfg.activation, tp=tp)
        # Activation checkpointing 'block' (set by moe.models.activation_checkpointing): the
        # block (or each half a model calls itself) runs again in the backward, routing replayed.
        self.recompute = False

    def attend(self, x_BLD: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Residual attention half: x[B, L, D] -> x + attn(ln1(x)); mask as for ``Attention``."""
        if self.recompute and recompute.current_tape() is None:  # a model calling the halves itself
            return recompute.checkpoint(self._attend, x_BLD, mask)
        return self._attend(x_BLD, mask)

    def _attend(self, x_BLD: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.attn(self.ln1(x_BLD), mask, causal=self.causal)
        with self.tp.rank_rng(self.tp.sp and self.training and self.drop.p > 0):  # a sequence piece's own mask
            return x_BLD + self.drop(y)

    def feed_forward(self, x: torch.Tensor, modality: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Residual FFN half on a token set: x[..., D] (modality[...]) -> (x + ffn(ln2(x)), aux).

        x is [T, D] for a flat token set (LIMoE, padded text) or [B, L, D] for whole
        sequences (then the MoE layer's sequence-level losses see L as the sequence length).
        """
        if self.recompute and recompute.current_tape() is None:  # a model calling the halves itself
            return recompute.checkpoint(self._feed_forward, x, modality)
        return self._feed_forward(x, modality)

    def _feed_forward(self, x: torch.Tensor, modality: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        h = self.ln2(x)
        if self.is_moe:  # the MoE layer takes the whole token set (replicated over tp)
            y, aux = self.moe(self.tp.gather_sequence(h), modality)
            y = self.tp.scatter_sequence(y)
        else:
            y, aux = self.mlp(h), {}
        with self.tp.rank_rng(self.tp.sp and self.training and self.drop.p > 0):
            return x + self.drop(y), aux

    def forward(self, x_BLD: torch.Tensor, *, key_padding_mask: Optional[torch.Tensor] = None,
                modality: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """x[B, L, D] -> (y[B, L, D], aux). Padding positions (key_padding_mask False) skip the FFN.

        modality: LongTensor[B, L] of modality ids, or None.
        """
        if self.recompute and recompute.current_tape() is None:  # activation checkpointing 'block'
            return recompute.checkpoint(self._forward, x_BLD, key_padding_mask, modality)
        return self._forward(x_BLD, key_padding_mask, modality)

    def _forward(self, x_BLD: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                 modality: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        B, L, D = x_BLD.shape
        mask = attention_mask(key_padding_mask, self.causal, L, x_BLD.device) if key_padding_mask is not None else None
        x = self.attend(x_BLD, mask)
        if key_padding_mask is None:
            return self.feed_forward(x, modality)
        real = key_padding_mask.to(torch.bool)
        y, aux = self.feed_forward(x[real], None if modality is None else modality[real])
        return x.masked_scatter(real[..., None], y), aux


def sum_aux(total: Dict[str, torch.Tensor], aux: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Add ``aux`` into ``total`` by loss name (in place) and return ``total``."""
    for name, value in aux.items():
        total[name] = total[name] + value if name in total else value
    return total


class BlockStack(nn.ModuleDict):
    """Blocks keyed by their global index (``str(i)``, so names read ``blocks.<i>.attn...``).

    Iterates over the blocks (not the keys) in index order and indexes by the global
    block index, like the ``nn.ModuleList`` it replaces; a pipeline stage holds a subset.
    """

    def __init__(self, blocks: Sequence[Block]):
        super().__init__({str(b.index): b for b in sorted(blocks, key=lambda b: b.index)})

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, index) -> nn.Module:
        return self._modules[str(index)]

    def __contains__(self, index) -> bool:
        return str(index) in self._modules

    def indices(self) -> list:
        """The global indices of the blocks held, ascending."""
        return [int(k) for k in self._modules]


class Transformer(nn.Module):
    """The block stack plus a final LayerNorm; MoE blocks are named ``<prefix>.<i>.moe``.

    With ``moe.dispatcher == "hierarchical"`` and an ``ep_group``, the node groups of
    the two-hop exchange are created once here and shared by every MoE layer; that is
    collective over the whole world (``moe.dispatch.world_node_groups``), so every
    rank builds its model at the same time.

    ``block_ids``: the global indices of the blocks to build (a pipeline stage's; default
    all); ``final_norm``: whether to build ``ln_f`` (the last pipeline stage's);
    ``group_timeout``: the collective timeout of those node groups (the job's,
    ``parallel.ProcessGroups.timeout``; None: torch's default).
    """

    def __init__(self, cfg: TransformerConfig, *, ep_group: Optional[dist.ProcessGroup] = None,
                 dp_group: Optional[dist.ProcessGroup] = None, prefix: str = "blocks",
                 tp: Optional[TensorParallel] = None, block_ids: Optional[Sequence[int]] = None,
                 final_norm: bool = True, group_timeout: Optional[timedelta] = None):
        super().__init__()
        if not isinstance(cfg, TransformerConfig):
            raise TypeError(f"cfg must be a TransformerConfig, got {type(cfg).__name__}")
        self.config = cfg
        self.tp = tp = tp or TensorParallel()
        node_groups = None
        moe = cfg.moe
        if (ep_group is not None and any(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
                and moe is not None and moe.dispatcher == "hierarchical"):
            assert moe.node_size is not None  # MoEConfig: node_size is set exactly when dispatcher='hierarchical'
            node_groups = world_node_groups(ep_group, moe.node_size, timeout=group_timeout)
        ids = range(cfg.n_layers) if block_ids is None else sorted(block_ids)
        bad = [i for i in ids if not 0 <= i < cfg.n_layers]
        if bad:
            raise ValueError(f"block_ids {bad} out of range for n_layers={cfg.n_layers}")
        split = tp.size * tp.etp_size > 1  # the MoE layers get the tp / etp groups only when these split something
        groups = MoEGroups(ep_group=ep_group, dp_group=dp_group, tp_group=tp.group if split else None,
                           etp_group=tp.etp_group if split else None, node_groups=node_groups)
        self.blocks = BlockStack([Block(cfg, i, groups=groups, prefix=prefix, tp=tp) for i in ids])
        self.ln_f = tp.mark_norm(nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)) if final_norm else None

    def moe_layers(self) -> list:
        return [b.moe for b in self.blocks if b.is_moe]

    def forward(self, x_BLD: torch.Tensor, *, key_padding_mask: Optional[torch.Tensor] = None,
                modality: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """x[B, L, D] -> (ln_f(blocks(x))[B, L, D], aux summed over layers by name).

        With sequence parallelism x is whole (replicated over tp) and the result is this
        rank's sequence piece [B, L/tp, D] (``parallel.comm.bounds``).
        """
        if self.tp.sp and (key_padding_mask is not None or modality is not None):
            raise ValueError("sequence parallelism supports whole causal sequences only (no key padding mask, "
                             "no modality ids)")
        x_BLD, aux = self.run(self.enter(x_BLD), self.blocks.indices(), key_padding_mask=key_padding_mask,
                              modality=modality)
        return self.exit(x_BLD), aux

    def enter(self, x_BLD: torch.Tensor) -> torch.Tensor:
        """What enters the first block: x itself, or this rank's sequence piece under sequence parallelism."""
        return self.tp.scatter_sequence(x_BLD) if self.tp.sp else x_BLD

    def run(self, x_BLD: torch.Tensor, block_ids: Sequence[int], *, key_padding_mask: Optional[torch.Tensor] = None,
            modality: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Blocks ``block_ids`` (held here, ascending) on x: (x, aux summed by name)."""
        aux: Dict[str, torch.Tensor] = {}
        for i in block_ids:
            seed_block(i)
            x_BLD, a = self.blocks[i](x_BLD, key_padding_mask=key_padding_mask, modality=modality)
            sum_aux(aux, a)
        return x_BLD, aux

    def exit(self, x_BLD: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm (held by the last pipeline stage)."""
        if self.ln_f is None:
            raise RuntimeError("this pipeline stage has no final norm (it is held by the last stage)")
        return self.ln_f(x_BLD)


class TransformerModel(nn.Module):
    """A model built around ``self.transformer`` (a ``Transformer``): its blocks and MoE layers.

    A subclass implements the pipeline protocol (module doc): ``pipe_embed``, ``pipe_blocks``,
    ``pipe_head`` and ``state_shapes``; ``run_pieces(*inputs)`` chains them into ``(outputs,
    aux)``. On a pipeline-parallel rank (``self.pipe``, a ``parallel.pipeline.StageRole``)
    ``run_pieces`` relays the state through the stages instead, without gradients
    (evaluation); training runs through ``parallel.pipeline.PipelineEngine``.
    """

    transformer: Transformer
    pipe: Optional[StageRole] = None

    @property
    def blocks(self):
        return self.transformer.blocks

    def moe_layers(self) -> list:
        return self.transformer.moe_layers()

    def pipe_embed(self, *inputs) -> Tuple[Optional[torch.Tensor], ...]:
        """The first stage: model inputs -> the state entering block 0."""
        raise NotImplementedError

    def pipe_blocks(self, state: Tuple[Optional[torch.Tensor], ...], inputs: tuple,
                  block_ids: Sequence[int]) -> Tuple[Tuple[Optional[torch.Tensor], ...], Dict[str, torch.Tensor]]:
        """Blocks ``block_ids`` on the state: (state, aux summed by name)."""
        raise NotImplementedError

    def pipe_head(self, state: Tuple[Optional[torch.Tensor], ...], inputs: tuple) -> tuple:
        """The last stage: the state after the last block -> the model's outputs (without aux)."""
        raise NotImplementedError

    def state_shapes(self, inputs: tuple) -> list:
        """The shape of each state tensor for these inputs (None where a part is absent)."""
        raise NotImplementedError

    def run_pieces(self, *inputs) -> Tuple[tuple, Dict[str, torch.Tensor]]:
        """``(outputs, aux)`` of the whole model (relayed through the stages under pipelining)."""
        if self.pipe is not None:
            return self.pipe.relay(self, inputs)
        state = self.pipe_embed(*inputs)
        state, aux = self.pipe_blocks(state, inputs, self.blocks.indices())
        return self.pipe_head(state, inputs), aux


# ----------------------------------------------------------------------------- deterministic init

def _normal_(p: torch.Tensor, std: float, g: torch.Generator) -> None:
    """p ~ N(0, std): the GLOBAL tensor is drawn, a tensor-parallel piece keeps its part."""
    shard = shard_of(p)
    shape = p.shape if shard is None else shard.global_shape(p.shape)
    with torch.no_grad():
        p.copy_(take_piece(torch.randn(shape, generator=g, dtype=torch.float32).mul_(std), shard).to(p.dtype))


def _expert_generators(seed: int, module_name: str) -> Callable[[str, int], torch.Generator]:
    """``Experts.reset_parameters``' ``generator_for``: one generator per (parameter, global expert)."""
    return lambda pname, expert: init_generator(seed, f"{module_name}.{pname}", expert)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int = 0, *, std: float = 0.02, n_layers: int = 1) -> None:
    """Initialise every parameter from ``(seed, parameter name)`` alone.

    The result does not depend on construction order, device or the expert-parallel
    layout: expert ``g`` of an MoE layer gets the same weights whichever rank holds
    it (seeded by its GLOBAL index), so an expert-parallel model starts equal to
    the single-process one; a tensor-parallel piece (``parallel.shards``) is cut from the
    global tensor drawn the same way. Linear / conv / embedding weights ~ N(0, std) (residual
    output projections ``attn.out``, ``mlp.w_out`` scaled by ``1/sqrt(2 n_layers)``),
    biases 0, LayerNorm 1 / 0, routers ~ N(0, MoEConfig.init_std), experts by
    ``moe.Experts.reset_parameters`` fed one generator per (parameter, global expert). Parameters of other
    modules named ``*pos*`` / ``*embed*`` get N(0, std) too; anything else keeps
    its constructor value.
    """
    out_std = std / math.sqrt(2.0 * max(1, n_layers))
    handled: Set[int] = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, Experts):
            handled.update(id(p) for p in module.parameters(recurse=False))
            module.reset_parameters(_expert_generators(seed, mod_name))
        elif isinstance(module, MoELayer):
            router = module.router
            handled.add(id(router.weight))
            _normal_(router.weight, module.config.init_std, init_generator(seed, f"{mod_name}.router.weight"))
            if router.noise_weight is not None:
                handled.add(id(router.noise_weight))
                router.noise_weight.zero_()
        elif isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)) or getattr(module, "tp_linear", False):
            s = out_std if mod_name.endswith(("attn.out", "mlp.w_out")) else std
            handled.add(id(module.weight))
            _normal_(module.weight, s, init_generator(seed, f"{mod_name}.weight"))
            if getattr(module, "bias", None) is not None:
                handled.add(id(module.bias))
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            handled.update((id(module.weight), id(module.bias)))
            module.weight.fill_(1.0)
            module.bias.zero_()
    for name, p in model.named_parameters():
        if id(p) not in handled and ("pos" in name or "embed" in name):
            _normal_(p, std, init_generator(seed, name))


# ----------------------------------------------------------------------------- torch.compile

def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Apply ``torch.compile`` to every transformer block of ``model`` (in place; returns it).

    The two halves of each block (``attend`` and ``feed_forward``) are compiled, so
    models that call them directly (LIMoE) benefit as well as ``Block.forward``.
    Parameter names and the state dict are unchanged. An MoE layer with a capacity
    compiles with static shapes (expert buffers padded to the capacity); dropless
    routing has data-dependent shapes and runs with graph breaks. ``compile_kwargs``
    go to ``torch.compile`` (e.g. ``backend="aot_eager"``).
    """
    owner = model.transformer if isinstance(model, TransformerModel) else model
    if not isinstance(owner, Transformer):
        raise TypeError(f"model must have transformer blocks (a TransformerModel or a Transformer), "
                        f"got {type(model).__name__}")
    blocks: Iterable[Block] = owner.blocks
    if any(block.recompute or (block.is_moe and block.moe.recompute) for block in blocks):
        raise ValueError("compile_blocks: these blocks use activation checkpointing (moe.recompute), which "
                         "torch.compile does not support here; turn it off (mode 'none') or do not compile")
    for block in blocks:
        for half in ("attend", "feed_forward"):  # compiled callables in instance attributes, shadowing the methods
            setattr(block, half, torch.compile(getattr(block, half), **compile_kwargs))
    return model
