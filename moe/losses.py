"""Balancing losses computed from the router outputs of one MoE layer.

Legend: T tokens, E experts, k choices per token, M modalities, B sequences,
L tokens per sequence (T = B * L); a suffix such as ``probs_TE`` gives the shape.

Every loss is a plain, differentiable function of router outputs:

================== ============================================ ===============================
function           formula (per group of n tokens)              paper
================== ============================================ ===============================
load_balancing     E * sum_i f_i * P_i                          Switch (Fedus 2021), GShard
z_loss             mean_t (logsumexp_i logits_ti)^2             ST-MoE (Zoph 2022)
importance         CV(sum_t p_t)^2                              Shazeer 2017; V-MoE (Riquelme 2021)
load               CV(sum_t P(x_t, .))^2                        Shazeer 2017; V-MoE
sequence_aux       load_balancing per sequence, averaged        DeepSeek-V3 (2024)
limoe_local        (1/n) sum_t H(p_t)                           LIMoE (Mustafa 2022)
limoe_global       max(0, log(min_experts) - H(mean_t p_t))    LIMoE
================== ============================================ ===============================

Modality semantics (the same for every loss)
--------------------------------------------
* ``modality=None``: the loss is computed over all T tokens.
* ``modality`` given (LongTensor[T] of ids in ``[0, num_modalities)``): the loss
  is computed separately over the tokens of each modality, and the result is
  the MEAN over the modalities that have at least one token. A modality with
  no tokens contributes nothing (it is not counted in the mean).
* No tokens at all (T == 0, or no group present): the result is 0, still
  connected to the autograd graph of the input when the input requires grad,
  so ``loss.backward()`` works and gives zero gradients.
* :func:`per_modality` returns the per-modality values, Tensor[M], for
  telemetry (0 for an absent modality).

Entropies use the natural log, with ``0 * log 0 = 0`` (value and gradient 0).
The LIMoE entropies assume every row of ``probs`` is a distribution (softmax
scores). :func:`aux_losses` normalises each row of ``routing.probs`` to sum to
1 before the probability-based losses: a no-op in value for softmax scores (and
the gradient reaching the logits is unchanged), and for sigmoid scores it is
DeepSeek-V3's ``s'_ti = s_ti / sum_j s_tj`` (also Megatron's practice).

Computation is vectorised over groups (one-hot membership, no per-modality
Python loop and no host sync except input validation); the tests hold it equal
to straightforward per-modality loops. Half-precision inputs are upcast to fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

from parallel.checks import check_int, check_mapping, check_number

__all__ = [
    "load_balancing_loss",
    "z_loss",
    "importance_loss",
    "load_loss",
    "sequence_aux_loss",
    "limoe_local_entropy",
    "limoe_global_entropy",
    "per_modality",
    "LossInputs",
    "AUX_LOSSES",
    "AUX_LOSS_NAMES",
    "aux_losses",
]


# ----------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------

def _check_scores(name: str, x) -> torch.Tensor:
    """A floating [T, E] tensor with E >= 1; half precision is upcast to fp32."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [T, E], got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [T, E]; got shape {tuple(x.shape)} ({x.dim()}-D)")
    if x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one expert column; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor; got dtype {x.dtype}")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x


def _tracing() -> bool:
    """True under torch.compile: data-dependent host checks are skipped there."""
    return torch.compiler.is_compiling()


def _check_experts(experts, num_tokens: int, num_experts: int) -> None:
    check_int("num_experts", num_experts, minimum=1)
    if not isinstance(experts, torch.Tensor):
        raise TypeError(f"experts must be a LongTensor[T, k], got {type(experts).__name__}")
    if experts.dim() != 2 or experts.shape[0] != num_tokens or experts.shape[1] < 1:
        raise ValueError(f"experts must have shape [T, k] with T={num_tokens} (the rows of probs) and k >= 1; "
                         f"got shape {tuple(experts.shape)}")
    if experts.is_floating_point() or experts.is_complex() or experts.dtype == torch.bool:
        raise ValueError(f"experts must be an integer tensor; got dtype {experts.dtype}")
    if experts.numel() and not _tracing() and (int(experts.min()) < 0 or int(experts.max()) >= num_experts):
        raise ValueError(f"experts has ids in [{int(experts.min())}, {int(experts.max())}]; "
                         f"allowed ids are [0, num_experts={num_experts})")


def _check_num_experts(num_experts, probs_TE: torch.Tensor) -> None:
    check_int("num_experts", num_experts, minimum=1)
    if num_experts != probs_TE.shape[1]:
        raise ValueError(f"num_experts={num_experts} does not match probs with {probs_TE.shape[1]} expert columns "
                         f"(shape {tuple(probs_TE.shape)})")


def _check_modality(modality, num_tokens: int, num_modalities) -> None:
    check_int("num_modalities", num_modalities, minimum=1)
    if modality is None:
        return
    if not isinstance(modality, torch.Tensor):
        raise TypeError(f"modality must be a LongTensor[T] or None, got {type(modality).__name__}")
    if modality.dim() != 1 or modality.shape[0] != num_tokens:
        raise ValueError(f"modality must have shape [T] = [{num_tokens}]; got shape {tuple(modality.shape)}")
    if modality.is_floating_point() or modality.is_complex() or modality.dtype == torch.bool:
        raise ValueError(f"modality must be an integer tensor; got dtype {modality.dtype}")
    if modality.numel() and not _tracing() and (int(modality.min()) < 0 or int(modality.max()) >= num_modalities):
        raise ValueError(f"modality has ids in [{int(modality.min())}, {int(modality.max())}]; "
                         f"allowed ids are [0, num_modalities={num_modalities})")


def _check_seq_len(seq_len, num_tokens: int) -> None:
    """``seq_len`` splits the T tokens into whole sequences; with no tokens (T = 0) there is
    nothing to split, so any ``seq_len >= 0`` passes (an empty [B, 0, D] batch has L = 0)."""
    if seq_len is None:
        return
    check_int("seq_len", seq_len, minimum=0 if num_tokens == 0 else 1)
    if num_tokens == 0:
        return
    if num_tokens % seq_len != 0:
        raise ValueError(f"seq_len={seq_len} does not divide the number of tokens T={num_tokens}; "
                         "T must be a multiple of seq_len (tokens flattened sequence-major, [B*L])")


# ----------------------------------------------------------------------------
# grouping: (sequence, modality) membership, shared by every loss
# ----------------------------------------------------------------------------

class _Groups:
    """Token membership in B sequences x M modalities, as a one-hot [B, L, M] mask.

    Without ``seq_len`` there is one sequence (B = 1, L = T); without
    ``modality`` there is one modality (M = 1).
    """

    def __init__(self, num_tokens: int, modality: Optional[torch.Tensor], num_modalities: int,
                 seq_len: Optional[int], like: torch.Tensor):
        M = 1 if modality is None else num_modalities
        if num_tokens == 0:  # no tokens: one empty group (the loss is 0), whatever seq_len says
            seq_len = None
        L = num_tokens if seq_len is None else seq_len
        B = 1 if seq_len is None else num_tokens // seq_len
        if modality is None:
            member_TM = like.new_ones(num_tokens, 1)
        else:
            ids_M = torch.arange(M, device=modality.device)
            member_TM = (modality.to(like.device)[:, None] == ids_M.to(like.device)).to(like.dtype)
        self.B, self.L, self.M = B, L, M
        self.member_BLM = member_TM.reshape(B, L, M)
        self.n_BM = self.member_BLM.sum(1)                # tokens per group (float)
        self.present_BM = self.n_BM > 0
        self.safe_n_BM = self.n_BM.clamp_min(1.0)       # avoids 0/0 in absent groups

    def sum_rows(self, x_TE: torch.Tensor) -> torch.Tensor:
        """Sum of the rows of x over each group: [B, M, E]."""
        return torch.einsum("blm,ble->bme", self.member_BLM, x_TE.reshape(self.B, self.L, x_TE.shape[1]))

    def sum_values(self, x_T: torch.Tensor) -> torch.Tensor:
        """Sum of a per-token value over each group: [B, M]."""
        return torch.einsum("blm,bl->bm", self.member_BLM, x_T.reshape(self.B, self.L))

    def mean_rows(self, x_TE: torch.Tensor) -> torch.Tensor:
        return self.sum_rows(x_TE) / self.safe_n_BM[..., None]

    def mean_values(self, x_T: torch.Tensor) -> torch.Tensor:
        return self.sum_values(x_T) / self.safe_n_BM

    def per_modality(self, per_BM: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Average a per-group value over the sequences where the modality is present.

        Returns (per_M, present_M); per_M is 0 where the modality is absent.
        ``per_BM`` must be finite in absent groups.
        """
        w_BM = self.present_BM.to(per_BM.dtype)
        per_M = (per_BM * w_BM).sum(0) / w_BM.sum(0).clamp_min(1.0)
        return per_M, self.present_BM.any(0)


def _mean_present(per_M: torch.Tensor, present_M: torch.Tensor) -> torch.Tensor:
    """Mean over present modalities; 0 (still in the graph) when none is present."""
    w_M = present_M.to(per_M.dtype)
    return (per_M * w_M).sum() / w_M.sum().clamp_min(1.0)


def _xlogx(p: torch.Tensor) -> torch.Tensor:
    """p * log(p) with 0 * log 0 = 0, in value and in gradient (no NaN/inf at p = 0)."""
    positive = p > 0
    return torch.where(positive, p * torch.log(torch.where(positive, p, torch.ones_like(p))), torch.zeros_like(p))


def _entropy(p_NE: torch.Tensor) -> torch.Tensor:
    """Natural-log entropy of each row: -sum_i p_i log p_i."""
    return -_xlogx(p_NE).sum(-1)


def _cv_squared(x_NE: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation of each row over experts, population std.

    A row of zeros (absent group, or all scores 0) gives 0.
    """
    mean_N = x_NE.mean(-1)
    var_N = ((x_NE - mean_N[..., None]) ** 2).mean(-1)
    safe_mean_N = torch.where(mean_N > 0, mean_N, torch.ones_like(mean_N))
    return var_N / safe_mean_N ** 2


# ----------------------------------------------------------------------------
# per-modality implementations: each returns (per_M, present_M)
# ----------------------------------------------------------------------------

def _load_balancing_groups(probs, experts, num_experts, *, modality=None, num_modalities=1, seq_len=None):
    probs_TE = _check_scores("probs", probs)
    T = probs_TE.shape[0]
    _check_num_experts(num_experts, probs_TE)
    _check_experts(experts, T, num_experts)
    _check_modality(modality, T, num_modalities)
    _check_seq_len(seq_len, T)
    g = _Groups(T, modality, num_modalities, seq_len, probs_TE)
    k = experts.shape[1]
    # Selected assignments per (token, expert): counted before capacity drops, not differentiable.
    with torch.no_grad():
        counts_TE = torch.zeros_like(probs_TE).scatter_add_(
            1, experts.to(probs_TE.device, torch.long), torch.ones(experts.shape, dtype=probs_TE.dtype,
                                                                   device=probs_TE.device))
        f_BME = g.sum_rows(counts_TE) / (g.safe_n_BM[..., None] * k)
    P_BME = g.mean_rows(probs_TE)
    per_BM = num_experts * (f_BME * P_BME).sum(-1)
    return g.per_modality(per_BM)


def _z_loss_groups(logits, *, modality=None, num_modalities=1):
    logits_TE = _check_scores("logits", logits)
    T = logits_TE.shape[0]
    _check_modality(modality, T, num_modalities)
    g = _Groups(T, modality, num_modalities, None, logits_TE)
    z2_T = torch.logsumexp(logits_TE, dim=-1) ** 2
    return g.per_modality(g.mean_values(z2_T))


def _importance_groups(probs, *, modality=None, num_modalities=1, _name="probs"):
    probs_TE = _check_scores(_name, probs)
    T = probs_TE.shape[0]
    _check_modality(modality, T, num_modalities)
    g = _Groups(T, modality, num_modalities, None, probs_TE)
    return g.per_modality(_cv_squared(g.sum_rows(probs_TE)))


def _load_groups(load, *, modality=None, num_modalities=1):
    return _importance_groups(load, modality=modality, num_modalities=num_modalities, _name="load")


def _local_entropy_groups(probs, *, modality=None, num_modalities=1):
    probs_TE = _check_scores("probs", probs)
    T = probs_TE.shape[0]
    _check_modality(modality, T, num_modalities)
    g = _Groups(T, modality, num_modalities, None, probs_TE)
    return g.per_modality(g.mean_values(_entropy(probs_TE)))


def _global_entropy_groups(probs, *, min_experts, modality=None, num_modalities=1):
    probs_TE = _check_scores("probs", probs)
    T, E = probs_TE.shape
    check_number("min_experts", min_experts, minimum=0, maximum=E, min_open=True)
    _check_modality(modality, T, num_modalities)
    g = _Groups(T, modality, num_modalities, None, probs_TE)
    H_BM = _entropy(g.mean_rows(probs_TE))
    # tau - H: minimising it RAISES H(mean p); relu stops the push once H >= log(min_experts).
    per_BM = torch.relu(math.log(min_experts) - H_BM)
    return g.per_modality(per_BM)


# ----------------------------------------------------------------------------
# public losses
# ----------------------------------------------------------------------------

def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, num_experts: int, *,
                        modality: Optional[torch.Tensor] = None, num_modalities: int = 1) -> torch.Tensor:
    """Switch / GShard load-balancing loss ``E * sum_i f_i * P_i`` (scalar).

    probs    Tensor[T, E]      router scores
    experts  LongTensor[T, k]  selected experts

    ``f_i`` = fraction of the T*k selected assignments that chose expert i, counted
    before capacity drops (GShard's skipped random second choices are counted
    too: they were selected by the top-k); not differentiable. ``P_i`` = mean over
    tokens of ``probs[:, i]``: the gradient flows through it. Equals 1.0 at
    perfect balance (uniform probs, uniform assignment) and E when every token
    puts all its probability and all its choices on one expert.
    Fedus et al. 2021 (Switch Transformer, eq. 4); Lepikhin et al. 2020 (GShard).
    """
    return _mean_present(*_load_balancing_groups(probs, experts, num_experts, modality=modality,
                                                 num_modalities=num_modalities))


def z_loss(logits: torch.Tensor, *, modality: Optional[torch.Tensor] = None,
           num_modalities: int = 1) -> torch.Tensor:
    """Router z-loss ``mean_t (logsumexp_i logits_ti)^2`` (scalar), logits Tensor[T, E].

    Keeps router logits small (numerically stable softmax). Zoph et al. 2022
    (ST-MoE, eq. 5).
    """
    return _mean_present(*_z_loss_groups(logits, modality=modality, num_modalities=num_modalities))


def importance_loss(probs: torch.Tensor, *, modality: Optional[torch.Tensor] = None,
                    num_modalities: int = 1) -> torch.Tensor:
    """Importance loss ``CV(sum_t p_t)^2`` (scalar), probs Tensor[T, E].

    ``Importance_i = sum_t probs[t, i]``; CV = std / mean over the E experts, with
    the POPULATION std (divide by E, not E - 1): the E importances are the whole
    population, not a sample of a larger one; it matches Shazeer et al.'s
    reference ``cv_squared``; it is defined for E = 1 (the sample std is not);
    and it bounds the loss by E - 1 (all mass on one expert). A group whose
    importances are all 0 gives 0. Shazeer et al. 2017 (eq. 6);
    Riquelme et al. 2021 (V-MoE, appendix A).
    """
    return _mean_present(*_importance_groups(probs, modality=modality, num_modalities=num_modalities))


def load_loss(load: torch.Tensor, *, modality: Optional[torch.Tensor] = None,
              num_modalities: int = 1) -> torch.Tensor:
    """Load loss ``CV(sum_t P(x_t, i))^2`` (scalar), load Tensor[T, E].

    ``load`` is the noisy top-k smooth estimate ``P(x, i)`` of the probability
    that expert i is selected for token x (``Routing.load``, policy
    'noisy_topk'). Same CV (population std) as :func:`importance_loss`.
    Shazeer et al. 2017 (eqs. 8-10); Riquelme et al. 2021 (V-MoE).
    """
    return _mean_present(*_load_groups(load, modality=modality, num_modalities=num_modalities))


def sequence_aux_loss(probs: torch.Tensor, experts: torch.Tensor, num_experts: int,
                      seq_len: Optional[int], *, modality: Optional[torch.Tensor] = None,
                      num_modalities: int = 1) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss (scalar).

    The tokens are read as consecutive sequences of ``seq_len`` tokens (flatten
    [B, L] batch-major: ``x.reshape(B * L, d)``); for each sequence the
    :func:`load_balancing_loss` ``E * sum_i f_i * P_i`` is computed over its own
    tokens, and the results are averaged over sequences. ``seq_len=None``: all
    tokens form one sequence. No tokens (T = 0, also an empty [B, 0] batch with
    ``seq_len=0``) gives 0, like every loss here. With ``modality``, for each modality the loss is
    averaged over the sequences that contain tokens of it, then averaged over
    present modalities. DeepSeek-V3 applies it to normalised sigmoid scores
    (:func:`aux_losses` normalises rows). DeepSeek-AI 2024 (DeepSeek-V3, eqs. 17-20).
    """
    return _mean_present(*_load_balancing_groups(probs, experts, num_experts, modality=modality,
                                                 num_modalities=num_modalities, seq_len=seq_len))


def limoe_local_entropy(probs: torch.Tensor, *, modality: Optional[torch.Tensor] = None,
                        num_modalities: int = 1) -> torch.Tensor:
    """LIMoE local entropy ``(1/n_m) sum_t H(p_t)`` (scalar), probs Tensor[T, E].

    Mean per-token routing entropy (natural log); minimised, each token's routing
    becomes confident. One-hot rows give 0, uniform rows log E.
    Mustafa et al. 2022 (LIMoE, section 2.2).
    """
    return _mean_present(*_local_entropy_groups(probs, modality=modality, num_modalities=num_modalities))


def limoe_global_entropy(probs: torch.Tensor, *, min_experts: float,
                         modality: Optional[torch.Tensor] = None, num_modalities: int = 1) -> torch.Tensor:
    """LIMoE thresholded global entropy ``max(0, log(min_experts) - H(mean_t p_t))`` (scalar).

    probs Tensor[T, E]; ``min_experts`` in (0, E], tau = log(min_experts).
    ``L_global = -H(mean p)``; thresholded ``max(0, tau + L_global)``. Minimising
    it INCREASES the entropy of the modality's mean routing distribution, i.e.
    spreads its tokens over at least about ``min_experts`` experts, and stops pushing
    once ``H(mean p) >= tau``. All tokens on one expert give tau; a mean
    distribution uniform over E >= ``min_experts`` experts gives 0.
    Mustafa et al. 2022 (LIMoE, section 2.2).
    """
    return _mean_present(*_global_entropy_groups(probs, min_experts=min_experts, modality=modality,
                                                 num_modalities=num_modalities))


_PER_GROUP: Dict[Callable, Callable] = {
    load_balancing_loss: _load_balancing_groups,
    z_loss: _z_loss_groups,
    importance_loss: _importance_groups,
    load_loss: _load_groups,
    sequence_aux_loss: lambda probs, experts, num_experts, seq_len, **kw: _load_balancing_groups(
        probs, experts, num_experts, seq_len=seq_len, **kw),
    limoe_local_entropy: _local_entropy_groups,
    limoe_global_entropy: _global_entropy_groups,
}


def per_modality(loss_fn: Callable, *args, modality: Optional[torch.Tensor],
                 num_modalities: int, **kwargs) -> torch.Tensor:
    """Per-modality values of one of this module's losses: Tensor[M] (telemetry).

    ``per_modality(limoe_global_entropy, probs, modality=m, num_modalities=2, min_experts=4)``.
    Entry m is the loss over modality m's tokens; 0 for a modality without tokens.
    ``modality=None`` gives Tensor[1] (all tokens). The loss itself is the mean of
    the entries of present modalities.
    """
    impl = _PER_GROUP.get(loss_fn)
    if impl is None:
        allowed = ", ".join(f.__name__ for f in _PER_GROUP)
        raise ValueError(f"loss_fn={getattr(loss_fn, '__name__', loss_fn)!r} is not allowed; choose one of {allowed}")
    per_M, _ = impl(*args, modality=modality, num_modalities=num_modalities, **kwargs)
    return per_M


# ----------------------------------------------------------------------------
# registry: loss name -> per-modality function of the routing
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class LossInputs:
    """What one layer's routing offers a balancing loss (built by :func:`aux_losses`).

    probs           Tensor[T, E]       router scores, rows normalised to sum to 1, fp32 or wider
    experts         LongTensor[T, k]   selected experts
    logits          Tensor[T, E]       router logits
    load            Tensor[T, E]|None  smooth load estimate (policy 'noisy_topk' only)
    modality        LongTensor[T]|None modality ids in [0, num_modalities)
    num_modalities  int
    seq_len         int|None           tokens per sequence (None: one sequence)
    min_experts     float              LIMoE S
    """

    probs: torch.Tensor
    experts: torch.Tensor
    logits: torch.Tensor
    load: Optional[torch.Tensor]
    modality: Optional[torch.Tensor]
    num_modalities: int
    seq_len: Optional[int]
    min_experts: float

    @property
    def num_experts(self) -> int:
        return self.probs.shape[1]

    @property
    def by_modality(self) -> Dict[str, object]:
        """The ``modality=..., num_modalities=...`` keywords every loss takes."""
        return dict(modality=self.modality, num_modalities=self.num_modalities)


def _load_from_routing(r: LossInputs):
    if r.load is None:
        raise ValueError("aux loss 'load' needs routing.load (the smooth load estimate), which only "
                         "RouterConfig.policy='noisy_topk' produces; routing.load is None")
    return _load_groups(r.load, **r.by_modality)


# The one table of balancing losses. Each entry maps a LossInputs to
# (per_M, present_M): the loss of each modality's tokens (0 where absent) and
# which modalities have tokens; the loss is the mean over present modalities.
# Adding a loss: one such function and one entry here; ``AUX_LOSS_NAMES`` (and
# so ``MoEConfig.aux_losses`` validation) follows the table.
AUX_LOSSES: Dict[str, Callable[[LossInputs], Tuple[torch.Tensor, torch.Tensor]]] = {
    "load_balancing": lambda r: _load_balancing_groups(r.probs, r.experts, r.num_experts, **r.by_modality),
    "z_loss": lambda r: _z_loss_groups(r.logits, **r.by_modality),
    "importance": lambda r: _importance_groups(r.probs, **r.by_modality),
    "load": _load_from_routing,
    "sequence_aux": lambda r: _load_balancing_groups(r.probs, r.experts, r.num_experts, seq_len=r.seq_len,
                                                     **r.by_modality),
    "limoe_local": lambda r: _local_entropy_groups(r.probs, **r.by_modality),
    "limoe_global": lambda r: _global_entropy_groups(r.probs, min_experts=r.min_experts, **r.by_modality),
}
# The accepted names: a live view of the table's keys, in table order.
AUX_LOSS_NAMES = AUX_LOSSES.keys()


# ----------------------------------------------------------------------------
# dispatcher
# ----------------------------------------------------------------------------

def aux_losses(routing, coefficients: Mapping[str, float], *, num_modalities: int = 1,
               min_experts: float = 1.0, seq_len: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """The named balancing losses of one layer, each ALREADY multiplied by its coefficient.

    routing       moe.Routing (reads probs, experts, logits, load, modality, skipped)
    coefficients  loss name (a key of :data:`AUX_LOSSES`) -> coefficient >= 0
    Returns ``{name: coefficient * loss}`` (scalar tensors) in the order given.
    Rows of ``routing.probs`` are normalised to sum to 1 for the probability-based
    losses (see the module docstring). ``seq_len=None``: one sequence for
    'sequence_aux'. If ``routing.skipped`` (non-finite logits), every requested
    loss is a plain 0 with no graph (a graph through NaN logits would give NaN
    gradients).
    """
    check_mapping("coefficients", coefficients, AUX_LOSSES)
    for name, coef in coefficients.items():
        if name not in AUX_LOSSES:
            raise ValueError(f"coefficients has unknown loss name {name!r}; allowed names are "
                             f"{', '.join(map(repr, AUX_LOSSES))}")
        check_number(f"coefficients.{name}", coef, minimum=0)

    if routing.skipped:
        return {name: torch.zeros((), dtype=torch.float32, device=routing.probs.device) for name in coefficients}

    probs_TE = _check_scores("routing.probs", routing.probs)
    probs_TE = probs_TE / probs_TE.sum(-1, keepdim=True).clamp_min(torch.finfo(probs_TE.dtype).tiny)
    inputs = LossInputs(probs=probs_TE, experts=routing.experts, logits=routing.logits, load=routing.load,
                        modality=routing.modality, num_modalities=num_modalities, seq_len=seq_len,
                        min_experts=min_experts)
    return {name: coef * _mean_present(*AUX_LOSSES[name](inputs)) for name, coef in coefficients.items()}
