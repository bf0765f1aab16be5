"""Typed, validated configuration for routers and MoE layers.

Every field is checked on construction; a bad value raises ``ValueError`` (or
``TypeError``) that names the field, the value it got and what is allowed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional

# Balancing-loss names accepted in ``MoEConfig.aux_losses``: a live view of the keys
# of the ``moe.losses.AUX_LOSSES`` table, so a new entry there is accepted here.
from .losses import AUX_LOSS_NAMES

POLICIES = ("topk", "switch", "gshard", "noisy_topk", "expert_bias", "expert_choice")
SCORES = ("softmax", "sigmoid")
DROP_POLICIES = ("position", "bpr", "probs", "random")
ACTIVATIONS = ("gelu", "relu", "silu", "swiglu")
BACKENDS = ("auto", "torch", "cpp", "cuda", "triton")
NONFINITE_ACTIONS = ("error", "skip")

def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")


def check_keys(what: str, d: Mapping, allowed) -> None:
    """Raise ValueError naming the unknown keys of the YAML section ``d`` and the allowed ones."""
    if not isinstance(d, Mapping):
        raise TypeError(f"{what} must be a mapping (a YAML section), got {type(d).__name__}: {d!r}")
    unknown = sorted(k for k in d if k not in allowed)
    if unknown:
        raise ValueError(f"unknown {what} key(s) {unknown}; allowed keys: {sorted(allowed)}")


def _int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name}={value} is not allowed; it must be >= {minimum}")


def _positive_float(name: str, value, *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number{' or None' if allow_none else ''}, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value} is not allowed; it must be a finite number > 0"
                         + (" (or None for dropless)" if allow_none else ""))


@dataclass(frozen=True)
class RouterConfig:
    """How tokens pick experts and how expert buffers drop overflow.

    ``capacity_factor=None`` is dropless. Otherwise each expert holds
    ``C = max(min_capacity, ceil(cf * T * k / E))`` assignments, where T is the
    number of tokens seen by the router *on this rank* (per-rank capacity, as in
    DeepSpeed and Megatron). ``eval_capacity_factor=None`` reuses
    ``capacity_factor`` in eval mode. For ``expert_choice`` the per-expert
    capacity is ``ceil(cf * T / E)`` with ``cf = top_k`` when ``capacity_factor``
    is None (on average ``top_k`` experts per token).
    """

    top_k: int = 2
    policy: str = "topk"
    score: str = "softmax"
    capacity_factor: Optional[float] = None
    eval_capacity_factor: Optional[float] = None
    min_capacity: int = 0
    drop_policy: str = "position"
    normalize_weights: bool = True
    # Switch multiplicative jitter on the router input during training: x * U(1-eps, 1+eps).
    jitter_eps: float = 0.0
    # Aux-loss-free expert bias (policy "expert_bias"): b_i += rate * sign(mean_load - load_i).
    expert_bias_rate: float = 1e-3
    # What to do with non-finite router logits: raise, or skip the layer for this step.
    on_nonfinite: str = "error"

    def __post_init__(self) -> None:
        _choice("RouterConfig.policy", self.policy, POLICIES)
        _choice("RouterConfig.score", self.score, SCORES)
        _choice("RouterConfig.drop_policy", self.drop_policy, DROP_POLICIES)
        _choice("RouterConfig.on_nonfinite", self.on_nonfinite, NONFINITE_ACTIONS)
        _int("RouterConfig.top_k", self.top_k, minimum=1)
        if self.policy == "switch" and self.top_k != 1:
            raise ValueError(f"RouterConfig.top_k={self.top_k} is not allowed with policy='switch'; Switch routing uses top_k=1")
        if self.policy == "gshard" and self.top_k != 2:
            raise ValueError(f"RouterConfig.top_k={self.top_k} is not allowed with policy='gshard'; GShard routing uses top_k=2")
        _positive_float("RouterConfig.capacity_factor", self.capacity_factor, allow_none=True)
        _positive_float("RouterConfig.eval_capacity_factor", self.eval_capacity_factor, allow_none=True)
        _int("RouterConfig.min_capacity", self.min_capacity, minimum=0)
        if not isinstance(self.normalize_weights, bool):
            raise TypeError(f"RouterConfig.normalize_weights must be a bool, got {self.normalize_weights!r}")
        if not (isinstance(self.jitter_eps, (int, float)) and 0.0 <= self.jitter_eps < 1.0):
            raise ValueError(f"RouterConfig.jitter_eps={self.jitter_eps!r} is not allowed; it must be in [0, 1)")
        if not (isinstance(self.expert_bias_rate, (int, float)) and self.expert_bias_rate >= 0):
            raise ValueError(f"RouterConfig.expert_bias_rate={self.expert_bias_rate!r} is not allowed; it must be >= 0")

    def check_experts(self, num_experts: int) -> None:
        """Validate the choices that depend on the number of experts."""
        _int("num_experts", num_experts, minimum=1)
        if self.policy != "expert_choice" and self.top_k > num_experts:
            raise ValueError(f"RouterConfig.top_k={self.top_k} is not allowed with num_experts={num_experts}; "
                             f"it must be in [1, {num_experts}]")

    def capacity_for(self, num_tokens: int, num_experts: int, training: bool) -> Optional[int]:
        """Per-expert capacity for ``num_tokens`` tokens on this rank (None: dropless)."""
        cf = self.capacity_factor if (training or self.eval_capacity_factor is None) else self.eval_capacity_factor
        if self.policy == "expert_choice":
            cf = float(self.top_k) if cf is None else cf
            return max(self.min_capacity, math.ceil(cf * num_tokens / num_experts))
        if cf is None:
            return None
        return max(self.min_capacity, math.ceil(cf * num_tokens * self.top_k / num_experts))


@dataclass(frozen=True)
class MoEConfig:
    """One MoE layer: experts, router, balancing losses and execution backend.

    ``aux_losses`` maps loss names (``moe.config.AUX_LOSS_NAMES``) to the
    coefficient the layer applies before returning them. ``num_modalities`` is
    the number of distinct modality ids the layer accepts (LIMoE: 2, image=0,
    text=1); ``limoe_min_experts`` is S in the thresholded global entropy
    ``max(0, log(S) - H(mean p))``.
    """

    d_model: int
    d_ffn: int
    num_experts: int
    router: RouterConfig = field(default_factory=RouterConfig)
    activation: str = "gelu"
    backend: str = "auto"
    aux_losses: Mapping[str, float] = field(default_factory=lambda: {"load_balancing": 1e-2})
    num_modalities: int = 1
    limoe_min_experts: float = 1.0
    # Dense FFN that every token passes through, added to the MoE output (DeepSeek/PR-MoE style).
    shared_expert_ffn: int = 0
    # Residual-MoE (PR-MoE style): y = a(x) * moe(x) + b(x) * dense(x), [a, b] = softmax(x W_c).
    residual_moe: bool = False
    init_std: float = 0.02
    bias: bool = False

    def __post_init__(self) -> None:
        _int("MoEConfig.d_model", self.d_model, minimum=1)
        _int("MoEConfig.d_ffn", self.d_ffn, minimum=1)
        _int("MoEConfig.num_experts", self.num_experts, minimum=1)
        if not isinstance(self.router, RouterConfig):
            raise TypeError(f"MoEConfig.router must be a RouterConfig, got {type(self.router).__name__}")
        self.router.check_experts(self.num_experts)
        _choice("MoEConfig.activation", self.activation, ACTIVATIONS)
        _choice("MoEConfig.backend", self.backend, BACKENDS)
        _int("MoEConfig.num_modalities", self.num_modalities, minimum=1)
        _int("MoEConfig.shared_expert_ffn", self.shared_expert_ffn, minimum=0)
        if self.residual_moe and self.shared_expert_ffn == 0:
            raise ValueError("MoEConfig.residual_moe=True needs a dense branch: set shared_expert_ffn > 0")
        if not isinstance(self.aux_losses, Mapping):
            raise TypeError(f"MoEConfig.aux_losses must be a mapping of loss name -> coefficient, got {self.aux_losses!r}")
        for name, coef in self.aux_losses.items():
            _choice("MoEConfig.aux_losses key", name, AUX_LOSS_NAMES)
            if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef) or coef < 0:
                raise ValueError(f"MoEConfig.aux_losses[{name!r}]={coef!r} is not allowed; it must be a finite number >= 0")
        if "load" in self.aux_losses and self.router.policy != "noisy_topk":
            raise ValueError(f"MoEConfig.aux_losses has 'load' with RouterConfig.policy={self.router.policy!r}; "
                             "the smooth load estimate exists only for policy='noisy_topk'")
        _positive_float("MoEConfig.limoe_min_experts", self.limoe_min_experts, allow_none=False)
        if self.limoe_min_experts > self.num_experts:
            raise ValueError(f"MoEConfig.limoe_min_experts={self.limoe_min_experts} is not allowed; "
                             f"it must be in (0, num_experts={self.num_experts}]")
        _positive_float("MoEConfig.init_std", self.init_std, allow_none=False)
