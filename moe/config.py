"""Typed, validated configuration for routers and MoE layers.

Every field is checked on construction; a bad value raises ``moe.checks.ConfigError``
(a ``ValueError``) that names the field path, the value it got and what is allowed:
``config key 'RouterConfig.top_k': got 0; it must be >= 1``. ``from_dict(d, path)``
(``moe.config_build``) builds a config from a YAML mapping and names YAML key paths
instead (``config key 'model.moe.router.top_k': ...``); ``to_dict()`` is its inverse.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional

from .config_build import FromDict
from parallel.checks import check_bool, check_choice, check_int, check_keys, check_number, fail

# Balancing-loss names accepted in ``MoEConfig.aux_losses``: a live view of the keys
# of the ``moe.losses.AUX_LOSSES`` table, so a new entry there is accepted here.
from .losses import AUX_LOSS_NAMES

# Router score functions (``RouterConfig.score``): the ones the routing kernels implement.
from .ops.library import SCORES

POLICIES = ("topk", "switch", "gshard", "noisy_topk", "expert_bias", "expert_choice")
DROP_POLICIES = ("position", "bpr", "probs", "random")
ACTIVATIONS = ("gelu", "relu", "silu", "swiglu")
# Kernel backends of the MoE ops (``MoEConfig.backend``; ``moe.ops.registry``), not the
# distributed backends of ``parallel.launch.DIST_BACKENDS``.
KERNEL_BACKENDS = ("auto", "torch", "cpp", "cuda", "triton")
NONFINITE_ACTIONS = ("error", "skip")
DISPATCHERS = ("flat", "hierarchical")


@dataclass(frozen=True)
class RouterConfig(FromDict):
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
        p = "RouterConfig"
        check_choice(f"{p}.policy", self.policy, POLICIES)
        check_choice(f"{p}.score", self.score, SCORES)
        check_choice(f"{p}.drop_policy", self.drop_policy, DROP_POLICIES)
        check_choice(f"{p}.on_nonfinite", self.on_nonfinite, NONFINITE_ACTIONS)
        check_int(f"{p}.top_k", self.top_k, minimum=1)
        if self.policy == "switch" and self.top_k != 1:
            fail(f"{p}.top_k", self.top_k, "policy 'switch' routes each token to top_k=1 expert")
        if self.policy == "gshard" and self.top_k != 2:
            fail(f"{p}.top_k", self.top_k, "policy 'gshard' routes each token to top_k=2 experts")
        check_number(f"{p}.capacity_factor", self.capacity_factor, minimum=0, min_open=True, allow_none=True)
        check_number(f"{p}.eval_capacity_factor", self.eval_capacity_factor, minimum=0, min_open=True,
                     allow_none=True)
        check_int(f"{p}.min_capacity", self.min_capacity, minimum=0)
        check_bool(f"{p}.normalize_weights", self.normalize_weights)
        check_number(f"{p}.jitter_eps", self.jitter_eps, minimum=0, maximum=1, max_open=True)
        check_number(f"{p}.expert_bias_rate", self.expert_bias_rate, minimum=0)

    def check_experts(self, num_experts: int, path: str = "MoEConfig") -> None:
        """Validate the choices that depend on the number of experts (``path``: the owner's path)."""
        check_int(f"{path}.num_experts", num_experts, minimum=1)
        if self.policy != "expert_choice" and self.top_k > num_experts:
            fail(f"{path}.router.top_k", self.top_k, f"it must be in [1, num_experts={num_experts}]")

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

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
class MoEConfig(FromDict):
    """One MoE layer: experts, router, balancing losses and execution backend.

    ``aux_losses`` maps loss names (``moe.config.AUX_LOSS_NAMES``) to the
    coefficient the layer applies before returning them. ``num_modalities`` is
    the number of distinct modality ids the layer accepts (LIMoE: 2, image=0,
    text=1); ``limoe_min_experts`` is min_experts in the thresholded global entropy
    ``max(0, log(min_experts) - H(mean p))``. ``pad_to_capacity``, ``dispatcher``,
    ``node_size`` and ``overlap_chunks`` choose the expert-buffer layout and the
    expert-parallel exchange (see the field comments and ``moe.dispatch``).

    From YAML: ``MoEConfig.from_dict(d, path)`` (``router`` a mapping of ``RouterConfig``
    fields); a transformer passes ``owned=`` (the fields it sets, not keys of ``d``) and
    ``defaults=`` (values for keys ``d`` leaves out), see ``moe.config_build.from_dict``.
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
    # Biases in the expert (and shared expert) MLPs.
    bias: bool = False
    # With a capacity, lay expert buffers out padded to it (E*C rows, static shapes; also what
    # torch.compile uses) instead of compactly; the output is the same.
    pad_to_capacity: bool = False
    # Expert-parallel exchange: "flat" (one all-to-all) or "hierarchical" (intra-node, then
    # inter-node; node_size = ep ranks per node). overlap_chunks > 1 pipelines the exchange of
    # chunk c+1 with the expert compute of chunk c.
    dispatcher: str = "flat"
    node_size: Optional[int] = None
    overlap_chunks: int = 1

    def __post_init__(self) -> None:
        p = "MoEConfig"
        check_int(f"{p}.d_model", self.d_model, minimum=1)
        check_int(f"{p}.d_ffn", self.d_ffn, minimum=1)
        check_int(f"{p}.num_experts", self.num_experts, minimum=1)
        if not isinstance(self.router, RouterConfig):
            fail(f"{p}.router", self.router, "it must be a RouterConfig")
        self.router.check_experts(self.num_experts, p)
        check_choice(f"{p}.activation", self.activation, ACTIVATIONS)
        check_choice(f"{p}.backend", self.backend, KERNEL_BACKENDS)
        check_int(f"{p}.num_modalities", self.num_modalities, minimum=1)
        check_int(f"{p}.shared_expert_ffn", self.shared_expert_ffn, minimum=0)
        check_bool(f"{p}.residual_moe", self.residual_moe)
        if self.residual_moe and self.shared_expert_ffn == 0:
            fail(f"{p}.residual_moe", True, "it needs a dense branch: set shared_expert_ffn > 0")
        check_keys(f"{p}.aux_losses", self.aux_losses, AUX_LOSS_NAMES)
        for name, coef in self.aux_losses.items():
            check_number(f"{p}.aux_losses.{name}", coef, minimum=0)
        if "load" in self.aux_losses and self.router.policy != "noisy_topk":
            fail(f"{p}.aux_losses.load", self.aux_losses["load"],
                 f"the smooth load estimate exists only for router.policy='noisy_topk', "
                 f"not {self.router.policy!r}")
        check_number(f"{p}.limoe_min_experts", self.limoe_min_experts, minimum=0, min_open=True,
                     maximum=self.num_experts)
        check_number(f"{p}.init_std", self.init_std, minimum=0, min_open=True)
        check_bool(f"{p}.bias", self.bias)
        check_bool(f"{p}.pad_to_capacity", self.pad_to_capacity)
        check_choice(f"{p}.dispatcher", self.dispatcher, DISPATCHERS)
        check_int(f"{p}.node_size", self.node_size, minimum=1, allow_none=True)
        if (self.dispatcher == "hierarchical") != (self.node_size is not None):
            fail(f"{p}.node_size", self.node_size,
                 "set it (ep ranks per node, dividing the ep size) exactly when dispatcher='hierarchical'")
        check_int(f"{p}.overlap_chunks", self.overlap_chunks, minimum=1)

    def to_dict(self, *, exclude=()) -> Dict[str, Any]:
        """Plain data that ``from_dict`` accepts (leaving out the ``exclude`` fields)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in exclude}
        out["router"] = self.router.to_dict()
        out["aux_losses"] = dict(self.aux_losses)
        return out
