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
``blocks.<i>.mlp``. MoE layers get ``ep_group`` / ``dp_group`` passed in
explicitly: nothing is read from global state.

A ``MoESettings`` with ``num_experts == 1`` builds a plain dense MLP of width
``MoESettings.d_ffn`` (one expert, softmax weight 1, nothing ever dropped, is
exactly a dense MLP); ``dense_equivalent(cfg)`` uses that to make the dense
baseline with the same active FFN FLOPs per token.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ACTIVATIONS, AUX_LOSS_NAMES, BACKENDS, MoEConfig, RouterConfig, _choice, check_keys
from ..experts import Experts
from ..layer import MoELayer

__all__ = [
    "MoESettings",
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
    "config_from_dict",
]


# ----------------------------------------------------------------------------- validation helpers

def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name}={value} is not allowed; it must be an int >= {minimum}")
    return value


def _float(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    bad = (not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo)
           or (hi_open and value == hi))
    if bad:
        rng = ("(" if lo_open else "[") + f"{lo}, {hi}" + (")" if hi_open else "]")
        raise ValueError(f"{name}={value!r} is not allowed; it must be in {rng}")
    return float(value)


# ----------------------------------------------------------------------------- configs

@dataclass(frozen=True)
class MoESettings:
    """How the MoE blocks of a transformer look (the model width comes from the transformer).

    Fields:
      num_experts: E (>= 1). ``1`` means a dense MLP of width ``d_ffn`` (dense baseline).
      d_ffn: width F of each expert; None = the transformer's ``d_ffn``.
      router: a ``moe.RouterConfig`` (policy, top_k, capacity_factor, drop_policy, ...).
      aux_losses: balancing-loss name -> coefficient (``moe.config.AUX_LOSS_NAMES``).
      limoe_min_experts: S of the thresholded LIMoE global entropy ``max(0, log S - H)``.
      backend: kernel backend for the layer (``moe.config.BACKENDS``).
    """

    num_experts: int = 8
    d_ffn: Optional[int] = None
    router: RouterConfig = field(default_factory=RouterConfig)
    aux_losses: Mapping[str, float] = field(default_factory=lambda: {"load_balancing": 1e-2})
    limoe_min_experts: float = 1.0
    backend: str = "auto"

    def __post_init__(self) -> None:
        _int("moe.num_experts", self.num_experts, 1)
        if self.d_ffn is not None:
            _int("moe.d_ffn", self.d_ffn, 1)
        if not isinstance(self.router, RouterConfig):
            raise TypeError(f"moe.router must be a RouterConfig, got {type(self.router).__name__}")
        if self.num_experts > 1:
            self.router.check_experts(self.num_experts)
        if not isinstance(self.aux_losses, Mapping):
            raise TypeError(f"moe.aux_losses must be a mapping of loss name -> coefficient, got {self.aux_losses!r}")
        for name, coef in self.aux_losses.items():
            _choice("moe.aux_losses key", name, AUX_LOSS_NAMES)
            _float(f"moe.aux_losses[{name!r}]", coef, 0.0, math.inf, hi_open=True)
        object.__setattr__(self, "aux_losses", dict(self.aux_losses))
        _float("moe.limoe_min_experts", self.limoe_min_experts, 0.0, float(self.num_experts), lo_open=True)
        _choice("moe.backend", self.backend, BACKENDS)

    @property
    def is_dense(self) -> bool:
        """True when this is the one-expert dense stand-in."""
        return self.num_experts == 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MoESettings":
        """From a YAML mapping; ``router`` may be a mapping of ``RouterConfig`` fields."""
        allowed = [f.name for f in fields(cls)]
        check_keys("model.moe", d, allowed)
        kw = dict(d)
        router = kw.get("router")
        if isinstance(router, Mapping):
            router_allowed = [f.name for f in fields(RouterConfig)]
            check_keys("model.moe.router", router, router_allowed)
            kw["router"] = RouterConfig(**router)
        return cls(**kw)

    def to_dict(self) -> Dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["router"] = {f.name: getattr(self.router, f.name) for f in fields(RouterConfig)}
        out["aux_losses"] = dict(self.aux_losses)
        return out


@dataclass(frozen=True)
class TransformerConfig:
    """A stack of pre-LN blocks.

    Fields:
      d_model: D; n_layers: number of blocks; n_heads: H (must divide D).
      d_ffn: width of the dense MLP blocks.
      activation: one of ``moe.config.ACTIVATIONS`` (dense MLPs and experts alike).
      causal: causal self-attention (decoder) or bidirectional (encoder).
      moe_every: 0 = all blocks dense; n > 0 = blocks n-1, 2n-1, ... are MoE blocks.
      moe: ``MoESettings`` for the MoE blocks (required iff ``moe_every > 0``).
      num_modalities: modality ids the MoE layers accept (LIMoE: 2).
      dropout: dropout on attention probabilities and residual branches, in [0, 1).
      norm_eps: LayerNorm epsilon.
      init_std: std of the normal init of weights (output projections are scaled
        down by ``sqrt(2 * n_layers)``).
    """

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ffn: int = 512
    activation: str = "gelu"
    causal: bool = False
    moe_every: int = 0
    moe: Optional[MoESettings] = None
    num_modalities: int = 1
    dropout: float = 0.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        _int("d_model", self.d_model, 1)
        _int("n_layers", self.n_layers, 1)
        _int("n_heads", self.n_heads, 1)
        if self.d_model % self.n_heads:
            divisors = [h for h in range(1, self.d_model + 1) if self.d_model % h == 0]
            raise ValueError(f"n_heads={self.n_heads} is not allowed with d_model={self.d_model}; "
                             f"it must divide d_model (e.g. one of {divisors[:12]})")
        _int("d_ffn", self.d_ffn, 1)
        _choice("activation", self.activation, ACTIVATIONS)
        if not isinstance(self.causal, bool):
            raise TypeError(f"causal must be a bool, got {self.causal!r}")
        _int("moe_every", self.moe_every, 0)
        if self.moe_every > self.n_layers:
            raise ValueError(f"moe_every={self.moe_every} is not allowed with n_layers={self.n_layers}; "
                             f"it must be in [0, {self.n_layers}] (0 = no MoE blocks)")
        if self.moe_every > 0 and self.moe is None:
            raise ValueError(f"moe_every={self.moe_every} needs a 'moe' section (MoESettings); "
                             "set moe_every=0 for an all-dense transformer")
        if self.moe is not None and not isinstance(self.moe, MoESettings):
            raise TypeError(f"moe must be a MoESettings or None, got {type(self.moe).__name__}")
        if self.moe_every == 0 and self.moe is not None:
            raise ValueError("moe is set but moe_every=0 (no MoE blocks); set moe_every > 0 or drop 'moe'")
        _int("num_modalities", self.num_modalities, 1)
        _float("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        _float("norm_eps", self.norm_eps, 0.0, 1.0, lo_open=True)
        _float("init_std", self.init_std, 0.0, math.inf, lo_open=True, hi_open=True)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def is_moe_layer(self, i: int) -> bool:
        """Whether block ``i`` (0-based) has an MoE FFN (a sparse one: more than one expert)."""
        return self.moe_every > 0 and (i + 1) % self.moe_every == 0 and not self.moe.is_dense

    def is_moe_position(self, i: int) -> bool:
        """Whether block ``i`` takes its FFN from ``moe`` (MoE, or its one-expert dense stand-in)."""
        return self.moe_every > 0 and (i + 1) % self.moe_every == 0

    def ffn_width(self, i: int) -> int:
        """Width of block ``i``'s FFN (each expert's width for MoE blocks)."""
        if self.is_moe_position(i):
            return self.moe.d_ffn if self.moe.d_ffn is not None else self.d_ffn
        return self.d_ffn

    def moe_config(self, i: int) -> MoEConfig:
        """The ``moe.MoEConfig`` of MoE block ``i``."""
        m = self.moe
        return MoEConfig(d_model=self.d_model, d_ffn=self.ffn_width(i), num_experts=m.num_experts, router=m.router,
                         activation=self.activation, backend=m.backend, aux_losses=dict(m.aux_losses),
                         num_modalities=self.num_modalities, limoe_min_experts=m.limoe_min_experts,
                         init_std=self.init_std)


def config_from_dict(cls, d: Mapping[str, Any], *, what: str = "model", extra: Optional[Dict[str, Any]] = None):
    """Build dataclass ``cls`` from a flat YAML mapping, rejecting unknown keys by name.

    A ``moe`` entry that is a mapping becomes a ``MoESettings``; ``extra`` entries
    are forced (e.g. ``causal=True`` for a decoder).
    """
    allowed = [f.name for f in fields(cls)]
    check_keys(what, d, allowed)
    kw = dict(d)
    if isinstance(kw.get("moe"), Mapping):
        kw["moe"] = MoESettings.from_dict(kw["moe"])
    if extra:
        kw.update(extra)
    return cls(**kw)


# ----------------------------------------------------------------------------- FLOPs and the dense baseline

def _matmuls_per_ffn(activation: str, width: int, d_model: int) -> int:
    # multiply-adds of one FFN on one token: D*F in, F*D out; SwiGLU's input is [D, 2F]
    return (3 if activation == "swiglu" else 2) * d_model * width


def active_ffn_flops_per_token(cfg) -> int:
    """Forward FLOPs (2 per multiply-add) of the FFNs one token passes through, summed over layers.

    An MoE block counts ``k`` experts of width ``F_expert`` (the nominal ``top_k``;
    GShard's random routing skips some 2nd choices, and drops skip more, so the
    realised count is at most this). The router (``2 * D * E`` FLOPs per token) is
    NOT included: it is small and has no dense counterpart. Accepts a
    ``TransformerConfig`` or anything with a ``.transformer`` config (LM, LIMoE).
    """
    t = cfg.transformer if hasattr(cfg, "transformer") else cfg
    if not isinstance(t, TransformerConfig):
        raise TypeError(f"cfg must be a TransformerConfig or have a .transformer one, got {type(cfg).__name__}")
    total = 0
    for i in range(t.n_layers):
        k = t.moe.router.top_k if t.is_moe_layer(i) else 1
        total += 2 * k * _matmuls_per_ffn(t.activation, t.ffn_width(i), t.d_model)
    return total


def dense_equivalent(cfg: TransformerConfig) -> TransformerConfig:
    """The dense baseline with the same active FFN FLOPs per token.

    Every MoE block becomes a one-expert block, i.e. a dense MLP of width
    ``top_k * F_expert`` (so a top-2 model's baseline MLP is twice as wide as
    one expert); dense blocks are unchanged. No balancing losses remain.
    """
    if not cfg.moe_every or cfg.moe.is_dense:
        return cfg
    width = cfg.moe.router.top_k * (cfg.moe.d_ffn if cfg.moe.d_ffn is not None else cfg.d_ffn)
    dense = MoESettings(num_experts=1, d_ffn=width, router=RouterConfig(top_k=1, policy="topk"), aux_losses={},
                        backend=cfg.moe.backend)
    return replace(cfg, moe=dense)


# ----------------------------------------------------------------------------- modules

class MLP(nn.Module):
    """Dense FFN: x[..., D] -> w_out(act(w_in(x)))[..., D] (SwiGLU: w_in gives gate and up)."""

    def __init__(self, d_model: int, d_ffn: int, activation: str = "gelu"):
        super().__init__()
        self.activation = activation
        self.w_in = nn.Linear(d_model, 2 * d_ffn if activation == "swiglu" else d_ffn)
        self.w_out = nn.Linear(d_ffn, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w_in(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[self.activation](h)
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
    """Multi-head self-attention with ``F.scaled_dot_product_attention``: x[B, L, D] -> [B, L, D]."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x_BLD: torch.Tensor, mask: Optional[torch.Tensor] = None, causal: bool = False) -> torch.Tensor:
        """mask: bool [B|1, 1, L, L] (True = attend) or None; ``causal`` is used only when mask is None."""
        B, L, D = x_BLD.shape
        q, k, v = self.qkv(x_BLD).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal and mask is None)
        return self.out(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """Pre-LN block: ``x + attn(ln1(x))`` then ``x + ffn(ln2(x))``; FFN = ``mlp`` or ``moe``."""

    def __init__(self, cfg: TransformerConfig, index: int, *, ep_group=None, dp_group=None, prefix: str = "blocks"):
        super().__init__()
        self.index, self.causal = index, cfg.causal
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.is_moe = cfg.is_moe_layer(index)
        if self.is_moe:
            self.moe = MoELayer(cfg.moe_config(index), ep_group=ep_group, dp_group=dp_group,
                                name=f"{prefix}.{index}.moe")
        else:
            self.mlp = MLP(cfg.d_model, cfg.ffn_width(index), cfg.activation)

    def attend(self, x_BLD: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Residual attention half: x[B, L, D] -> x + attn(ln1(x)); mask as for ``Attention``."""
        return x_BLD + self.drop(self.attn(self.ln1(x_BLD), mask, causal=self.causal))

    def feed_forward(self, x: torch.Tensor, modality: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Residual FFN half on a token set: x[..., D] (modality[...]) -> (x + ffn(ln2(x)), aux).

        x is [T, D] for a flat token set (LIMoE, padded text) or [B, L, D] for whole
        sequences (then the MoE layer's sequence-level losses see L as the sequence length).
        """
        h = self.ln2(x)
        if self.is_moe:
            y, aux = self.moe(h, modality)
        else:
            y, aux = self.mlp(h), {}
        return x + self.drop(y), aux

    def forward(self, x_BLD: torch.Tensor, *, key_padding_mask: Optional[torch.Tensor] = None,
                modality: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """x[B, L, D] -> (y[B, L, D], aux). Padding positions (key_padding_mask False) skip the FFN.

        modality: LongTensor[B, L] of modality ids, or None.
        """
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


class Transformer(nn.Module):
    """The block stack plus a final LayerNorm; MoE blocks are named ``<prefix>.<i>.moe``."""

    def __init__(self, cfg: TransformerConfig, *, ep_group=None, dp_group=None, prefix: str = "blocks"):
        super().__init__()
        if not isinstance(cfg, TransformerConfig):
            raise TypeError(f"cfg must be a TransformerConfig, got {type(cfg).__name__}")
        self.config = cfg
        self.blocks = nn.ModuleList(Block(cfg, i, ep_group=ep_group, dp_group=dp_group, prefix=prefix)
                                    for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

    def moe_layers(self) -> list:
        return [b.moe for b in self.blocks if b.is_moe]

    def forward(self, x_BLD: torch.Tensor, *, key_padding_mask: Optional[torch.Tensor] = None,
                modality: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """x[B, L, D] -> (ln_f(blocks(x))[B, L, D], aux summed over layers by name)."""
        aux: Dict[str, torch.Tensor] = {}
        for block in self.blocks:
            x_BLD, a = block(x_BLD, key_padding_mask=key_padding_mask, modality=modality)
            sum_aux(aux, a)
        return self.ln_f(x_BLD), aux


class TransformerModel(nn.Module):
    """A model built around ``self.transformer`` (a ``Transformer``): its blocks and MoE layers."""

    transformer: Transformer

    @property
    def blocks(self):
        return self.transformer.blocks

    def moe_layers(self) -> list:
        return self.transformer.moe_layers()


# ----------------------------------------------------------------------------- deterministic init

def _generator(seed: int, name: str, index: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()) * 7_919 + index) % (2 ** 63 - 1))
    return g


def _normal_(p: torch.Tensor, std: float, g: torch.Generator) -> None:
    with torch.no_grad():
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(std).to(p.dtype))


@torch.no_grad()
def init_weights(model: nn.Module, seed: int = 0, *, std: float = 0.02, n_layers: int = 1) -> None:
    """Initialise every parameter from ``(seed, parameter name)`` alone.

    The result does not depend on construction order, device or the expert-parallel
    layout: expert ``g`` of an MoE layer gets the same weights whichever rank holds
    it (seeded by its GLOBAL index), so an expert-parallel model starts equal to
    the single-process one. Linear / conv / embedding weights ~ N(0, std) (residual
    output projections ``attn.out``, ``mlp.w_out`` scaled by ``1/sqrt(2 n_layers)``),
    biases 0, LayerNorm 1 / 0, routers ~ N(0, MoEConfig.init_std), experts as
    ``moe.Experts`` does (w1 ~ N(0, s), w2 ~ N(0, s / sqrt 2)). Parameters of other
    modules named ``*pos*`` / ``*embed*`` get N(0, std) too; anything else keeps
    its constructor value.
    """
    out_std = std / math.sqrt(2.0 * max(1, n_layers))
    handled = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, Experts):
            for pname in ("w1", "w2", "b1", "b2"):
                p = getattr(module, pname)
                if p is None:
                    continue
                handled.add(id(p))
                if pname.startswith("b"):
                    p.zero_()
                    continue
                s = module.init_std if pname == "w1" else module.init_std / math.sqrt(2.0)
                for e in range(module.num_local):
                    _normal_(p[e], s, _generator(seed, f"{mod_name}.{pname}", module.first_expert + e))
        elif isinstance(module, MoELayer):
            router = module.router
            handled.add(id(router.weight))
            _normal_(router.weight, module.config.init_std, _generator(seed, f"{mod_name}.router.weight"))
            if router.noise_weight is not None:
                handled.add(id(router.noise_weight))
                router.noise_weight.zero_()
        elif isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            s = out_std if mod_name.endswith(("attn.out", "mlp.w_out")) else std
            handled.add(id(module.weight))
            _normal_(module.weight, s, _generator(seed, f"{mod_name}.weight"))
            if getattr(module, "bias", None) is not None:
                handled.add(id(module.bias))
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            handled.update((id(module.weight), id(module.bias)))
            module.weight.fill_(1.0)
            module.bias.zero_()
    for name, p in model.named_parameters():
        if id(p) not in handled and ("pos" in name or "embed" in name):
            _normal_(p, std, _generator(seed, name))
