"""Routing policies: from router logits to experts, weights and kept slots.

Legend: T tokens, k choices per token (``K`` in shape suffixes), E experts, N = T*k assignments.

``route`` is the functional API. The policy picks experts and weights; the drop
policy fixes the order in which assignments are served; ``assign_slots`` then
gives each assignment its slot in its expert's buffer and drops whatever falls
beyond the capacity. A dropped assignment contributes zero to the layer output;
the token still passes through the residual connection around the MoE block.

Choices where papers and implementations differ (documented, and tested):
- Every drop policy serves all first choices before any second choice (GShard's
  ``locations2 += count(first choices)``), then all second choices, and so on.
- ``switch`` weighs the chosen expert by its probability p (never renormalised to 1),
  so the router gets a gradient.
- ``gshard`` normalises g1 + g2 = 1 and, in training, dispatches the 2nd expert only
  when ``uniform(0, 1) < 2 * g2``; in eval the 2nd expert is always dispatched.
- ``noisy_topk`` (Shazeer 2017): H = logits + N(0,1) * softplus(noise_logits) in
  training (no noise in eval); weights = softmax over the kept H values; ``probs`` is
  the sparse gate G(x) (zero outside the top k) and ``load`` the smooth estimate
  P(x, i) = Phi((logits_i - kth_excluding_i(H)) / softplus(noise_logits_i)).
- ``expert_bias`` (DeepSeek-V3): the bias is added to the scores only to choose experts.
- ``expert_choice`` (Zhou 2022): k == E columns; column j is expert j, which takes its
  top-C tokens by score (ties: lower token index); weights are the scores, not renormalised.
- Ties between experts go to the lower expert index; ties between tokens to the
  earlier token.
- ``f_i`` of the balancing loss counts the T*k selected assignments before GShard's
  random skip and before capacity drops.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .config import RouterConfig
from .ops import get_backend
from .routing_types import Routing


def validate_modality(modality: Optional[torch.Tensor], num_tokens: int, num_modalities: Optional[int]) -> None:
    """Raise ValueError unless ``modality`` is None or an integer tensor[T] with ids in [0, num_modalities)."""
    if modality is None:
        return
    if not isinstance(modality, torch.Tensor):
        raise TypeError(f"modality must be a torch.Tensor of ids or None, got {type(modality).__name__}")
    if modality.dtype.is_floating_point or modality.dtype == torch.bool or modality.is_complex():
        raise ValueError(f"modality has dtype {modality.dtype}; it must be an integer tensor of modality ids")
    if modality.dim() != 1 or modality.shape[0] != num_tokens:
        raise ValueError(f"modality has shape {tuple(modality.shape)}; it must have one id per token, shape ({num_tokens},)")
    if num_modalities is not None and num_tokens and not torch.compiler.is_compiling() and (int(modality.min()) < 0 or int(modality.max()) >= num_modalities):
        raise ValueError(f"modality ids range over [{int(modality.min())}, {int(modality.max())}]; "
                         f"allowed ids are 0..{num_modalities - 1} (num_modalities={num_modalities})")


def rng_device(generator: Optional[torch.Generator]) -> Union[str, torch.device]:
    """Where random numbers are drawn: the generator's device, else the default CPU RNG.

    Drawing there (and moving the result) keeps a seeded run reproducible on any device.
    """
    return "cpu" if generator is None else generator.device


def _choice_major_order(token_order_T: torch.Tensor, k: int) -> torch.Tensor:
    """Flat assignment indices t*k+j: all first choices in token order, then all second choices, ..."""
    j = torch.arange(k, device=token_order_T.device).unsqueeze(1)
    return (token_order_T.unsqueeze(0) * k + j).reshape(-1)


def service_order(
    drop_policy: str,
    probs_TE: torch.Tensor,
    experts_TK: torch.Tensor,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Order[N] in which assignments claim expert slots under ``drop_policy``."""
    T, k = experts_TK.shape
    device = experts_TK.device
    if drop_policy == "position":
        return _choice_major_order(torch.arange(T, device=device), k)
    if drop_policy == "bpr":
        # V-MoE Batch Prioritized Routing: priority = the router score of the token's top-1
        # expert, descending (the score, not the renormalised weight, which is 1 when k=1).
        priority = probs_TE.detach().gather(1, experts_TK[:, :1]).squeeze(1)
        return _choice_major_order(torch.sort(priority, descending=True, stable=True).indices, k)
    if drop_policy == "random":
        # DeepSpeed's Random Token Selection: a random priority per token.
        perm = torch.randperm(T, generator=generator, device=rng_device(generator))
        return _choice_major_order(perm.to(device), k)
    if drop_policy == "probs":
        # Each expert keeps its highest-probability assignments (Megatron's default):
        # a global stable sort by probability, over the choice-major order for ties.
        base = _choice_major_order(torch.arange(T, device=device), k)
        p = probs_TE.detach().gather(1, experts_TK).reshape(-1)[base]
        return base[torch.sort(p, descending=True, stable=True).indices]
    raise ValueError(f"drop_policy={drop_policy!r} is not allowed; choose 'position', 'bpr', 'probs' or 'random'")


def _noisy_topk(logits, noise_logits, k, training, generator):
    std = torch.nn.functional.softplus(noise_logits.float())
    if training:
        noise = torch.randn(logits.shape, generator=generator, dtype=logits.dtype,
                            device=rng_device(generator)).to(logits.device)
        h = logits + noise * std
    else:
        h = logits
    T, E = h.shape
    order = torch.sort(h.detach(), dim=-1, descending=True, stable=True).indices
    experts = order[:, :k]
    kept_h = h.gather(1, experts)
    weights = torch.softmax(kept_h, dim=-1)
    gate = torch.zeros_like(h).scatter(1, experts, weights)
    # Smooth load estimate: the chance that expert i stays in the top k under fresh noise,
    # given the other experts' noisy values: threshold = k-th largest H excluding i.
    if k >= E:
        load = torch.ones_like(h)
    else:
        sorted_h = h.gather(1, order[:, : k + 1])
        in_top = torch.zeros(T, E, dtype=torch.bool, device=h.device).scatter(1, experts, True)
        threshold = torch.where(in_top, sorted_h[:, k : k + 1], sorted_h[:, k - 1 : k])
        # std can underflow to 0 (softplus of a very negative noise logit); the floor keeps
        # 0 / 0 out of Phi: a zero numerator gives Phi(0) = 1/2, any other the limit 0 or 1.
        z = (logits - threshold) / std.clamp_min(torch.finfo(std.dtype).tiny)
        load = torch.distributions.Normal(torch.zeros((), device=h.device), torch.ones((), device=h.device),
                                          validate_args=False).cdf(z)
    return experts, weights, gate, load


def _expert_choice(probs, capacity):
    T, E = probs.shape
    c = min(capacity, T)
    # Each expert takes its top-c tokens; stable sort keeps the earlier token among ties.
    picked = torch.sort(probs.detach().t(), dim=-1, descending=True, stable=True).indices[:, :c]  # [E, c]
    positions = torch.full((E, T), -1, dtype=torch.long, device=probs.device)
    positions.scatter_(1, picked, torch.arange(c, device=probs.device).expand(E, c).contiguous())
    positions_TK = positions.t().contiguous()
    kept = positions_TK >= 0
    experts = torch.arange(E, device=probs.device).expand(T, E).contiguous()
    return experts, probs, kept, positions_TK


def _all_finite(logits, noise_logits, expert_bias) -> bool:
    """Whether the logits and the router state that picks experts are all finite (one host sync)."""
    ok = torch.isfinite(logits).all()
    if noise_logits is not None:
        ok = ok & torch.isfinite(noise_logits).all()
    if expert_bias is not None:
        ok = ok & torch.isfinite(expert_bias).all()
    return bool(ok)


def _nonfinite_what(logits, noise_logits, expert_bias) -> str:
    """Which of the router's inputs and state hold non-finite values, for the error message."""
    T = logits.shape[0]
    parts = []
    bad = int((~torch.isfinite(logits)).any(dim=1).sum())
    if bad:
        parts.append(f"router logits are not finite for {bad} of {T} tokens")
    if noise_logits is not None:
        bad = int((~torch.isfinite(noise_logits)).any(dim=1).sum())
        if bad:
            parts.append(f"noisy top-k noise logits (x @ noise_weight) are not finite for {bad} of {T} tokens")
    if expert_bias is not None:
        bad_e = torch.nonzero(~torch.isfinite(expert_bias)).flatten().tolist()
        if bad_e:
            values = [float(expert_bias[e]) for e in bad_e[:4]]
            parts.append(f"the expert bias (router state, moved by RouterConfig.expert_bias_rate) is not finite "
                         f"for expert(s) {bad_e[:8]}{' ...' if len(bad_e) > 8 else ''} (values {values})")
    return "; ".join(parts)


def _skipped_routing(logits, cfg, num_experts, modality, capacity):
    T = logits.shape[0]
    k = num_experts if cfg.policy == "expert_choice" else cfg.top_k
    device = logits.device
    uniform = torch.full((T, num_experts), 1.0 / num_experts, device=device)
    return Routing(
        experts=torch.zeros(T, k, dtype=torch.long, device=device),
        weights=torch.zeros(T, k, device=device),
        probs=uniform,
        logits=torch.zeros(T, num_experts, device=device),
        dispatched=torch.zeros(T, k, dtype=torch.bool, device=device),
        kept=torch.zeros(T, k, dtype=torch.bool, device=device),
        positions=torch.full((T, k), -1, dtype=torch.long, device=device),
        tokens_per_expert=torch.zeros(num_experts, dtype=torch.long, device=device),
        capacity=capacity,
        modality=modality,
        skipped=True,
    )


def route(
    logits: torch.Tensor,
    router_config: RouterConfig,
    *,
    modality: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    training: bool = True,
    noise_logits: Optional[torch.Tensor] = None,
    expert_bias: Optional[torch.Tensor] = None,
    backend: str = "auto",
    name: str = "router",
) -> Routing:
    """Route T tokens given their router ``logits[T, E]`` (computed in fp32 here).

    ``noise_logits[T, E]`` (x @ W_noise) is required by ``noisy_topk``;
    ``expert_bias[E]`` by ``expert_bias``. ``generator`` makes GShard's random 2nd
    choice, the noise and the ``random`` drop policy reproducible.

    Non-finite values in ``logits``, or in the router state that chooses experts
    (``noise_logits`` for ``noisy_topk``, ``expert_bias`` for ``expert_bias``), raise a
    ``FloatingPointError`` that starts with ``name`` (the layer) and says which of them
    is bad; with ``RouterConfig.on_nonfinite='skip'`` the layer is skipped instead
    (``Routing.skipped``: nothing dispatched, the balancing losses 0).
    """
    cfg = router_config
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a 2-D tensor [tokens, experts], got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits has dtype {logits.dtype}; it must be a floating-point tensor")
    T, E = logits.shape
    cfg.check_experts(E)
    validate_modality(modality, T, num_modalities=None)
    logits = logits.float()
    capacity = cfg.capacity_for(T, E, training)
    if cfg.policy == "noisy_topk" and noise_logits is None:
        raise ValueError("policy='noisy_topk' needs noise_logits[T, E] (x @ W_noise)")
    if cfg.policy == "expert_bias" and expert_bias is None:
        raise ValueError("policy='expert_bias' needs expert_bias[E]")
    bias = expert_bias if cfg.policy == "expert_bias" else None
    noise = noise_logits if cfg.policy == "noisy_topk" else None
    # A host-side check of the logits and of the router state that chooses experts (one
    # sync); under torch.compile it is skipped: there a data-dependent raise cannot be part
    # of the graph.
    if not torch.compiler.is_compiling() and not _all_finite(logits, noise, bias):
        if cfg.on_nonfinite == "error":
            raise FloatingPointError(f"{name}: {_nonfinite_what(logits, noise, bias)} "
                                     "(set RouterConfig(on_nonfinite='skip') to skip the layer for such steps)")
        return _skipped_routing(logits, cfg, E, modality, capacity)
    ops = get_backend(backend, logits.device).ops
    load = None

    if cfg.policy == "expert_choice":
        probs = torch.softmax(logits, dim=-1) if cfg.score == "softmax" else torch.sigmoid(logits)
        experts, weights, kept, positions = _expert_choice(probs, capacity)
        tokens_per_expert = kept.sum(dim=0)
        return Routing(experts, weights, probs, logits, kept.clone(), kept, positions,
                       tokens_per_expert, capacity, modality)

    if cfg.policy == "noisy_topk":
        experts, weights, probs, load = _noisy_topk(logits, noise, cfg.top_k, training, generator)
    else:
        normalize = cfg.normalize_weights and cfg.policy != "switch"
        if cfg.policy == "gshard":
            normalize = True
        weights, experts, probs, _, _ = ops.router_topk(logits, cfg.top_k, cfg.score, normalize, bias)

    dispatched = torch.ones_like(experts, dtype=torch.bool)
    if cfg.policy == "gshard" and training and T:
        u = torch.rand(T, generator=generator, device=rng_device(generator))
        dispatched[:, 1] = u.to(logits.device) < 2.0 * weights[:, 1].detach()

    order = service_order(cfg.drop_policy, probs, experts, generator)
    positions, kept, tokens_per_expert = ops.assign_slots(experts, order, dispatched, E, capacity)
    return Routing(experts, weights, probs, logits, dispatched, kept, positions,
                   tokens_per_expert, capacity, modality, load)
