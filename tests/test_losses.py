"""Tests for moe/losses.py against hand-computed values and plain-Python/numpy oracles."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moe import losses as L
from moe.routing_types import Routing

# ----------------------------------------------------------------------------
# helpers and independent oracles (plain Python / numpy, one token at a time)
# ----------------------------------------------------------------------------


def _rand_probs(T, E, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(T, E, generator=g, dtype=dtype) * 2.0, dim=-1)


def _rand_experts(T, E, k, seed=0):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])


def oracle_load_balancing(probs, experts, E):
    p = probs.tolist()
    ex = experts.tolist()
    T, k = len(ex), len(ex[0])
    total = 0.0
    for i in range(E):
        f_i = sum(1 for row in ex for e in row if e == i) / (T * k)
        P_i = sum(row[i] for row in p) / T
        total += f_i * P_i
    return E * total


def oracle_z(logits):
    vals = []
    for row in logits.tolist():
        vals.append(math.log(sum(math.exp(v) for v in row)) ** 2)
    return sum(vals) / len(vals)


def oracle_cv2(x_TE):
    imp = np.asarray(x_TE.detach().tolist(), dtype=np.float64).sum(axis=0)
    return float((np.std(imp, ddof=0) / np.mean(imp)) ** 2)


def oracle_entropy(row):
    return -sum(v * math.log(v) for v in row if v > 0)


def oracle_local(probs):
    rows = probs.tolist()
    return sum(oracle_entropy(r) for r in rows) / len(rows)


def oracle_global(probs, S):
    rows = probs.tolist()
    E = len(rows[0])
    mean = [sum(r[i] for r in rows) / len(rows) for i in range(E)]
    return max(0.0, math.log(S) - oracle_entropy(mean))


def _routing(probs, experts, *, logits=None, modality=None, load=None, skipped=False):
    T, k = experts.shape
    E = probs.shape[1]
    if logits is None:
        logits = torch.log(probs)
    return Routing(
        experts=experts, weights=torch.gather(probs, 1, experts), probs=probs, logits=logits,
        dispatched=torch.ones(T, k, dtype=torch.bool), kept=torch.ones(T, k, dtype=torch.bool),
        positions=torch.zeros(T, k, dtype=torch.long),
        tokens_per_expert=torch.bincount(experts.reshape(-1), minlength=E),
        capacity=None, modality=modality, load=load, skipped=skipped)


def _close(actual, expected, tol=1e-10):
    if isinstance(actual, torch.Tensor):
        actual = actual.detach()
    if isinstance(expected, torch.Tensor):
        expected = expected.detach()
    assert abs(float(actual) - float(expected)) <= tol * max(1.0, abs(float(expected))), (float(actual), expected)


# ----------------------------------------------------------------------------
# load balancing (Switch / GShard)
# ----------------------------------------------------------------------------


def test_load_balancing_is_one_at_perfect_balance():
    T, E = 8, 4
    probs = torch.full((T, E), 1.0 / E, dtype=torch.float64)
    experts = torch.tensor([[t % E, (t + 1) % E] for t in range(T)])  # each expert chosen 4 times
    _close(L.load_balancing_loss(probs, experts, E), 1.0)


def test_load_balancing_is_E_when_everything_on_one_expert():
    T, E = 6, 5
    probs = torch.zeros(T, E, dtype=torch.float64)
    probs[:, 2] = 1.0
    experts = torch.full((T, 1), 2)
    _close(L.load_balancing_loss(probs, experts, E), float(E))


def test_load_balancing_matches_loop_oracle():
    T, E, k = 13, 6, 2
    probs, experts = _rand_probs(T, E, seed=3), _rand_experts(T, E, k, seed=3)
    _close(L.load_balancing_loss(probs, experts, E), oracle_load_balancing(probs, experts, E))


def test_load_balancing_gradient_only_through_P():
    # d/dp[t, i] of E * sum_i f_i * mean_t p[t, i] = E * f_i / T: f carries no gradient.
    T, E = 5, 3
    probs = _rand_probs(T, E, seed=4).requires_grad_()
    experts = torch.tensor([[0], [0], [1], [2], [0]])
    L.load_balancing_loss(probs, experts, E).backward()
    f = torch.tensor([3 / 5, 1 / 5, 1 / 5], dtype=torch.float64)
    torch.testing.assert_close(probs.grad, (E * f / T).expand(T, E))


# ----------------------------------------------------------------------------
# z-loss, importance, load
# ----------------------------------------------------------------------------


def test_z_loss_matches_loop():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(7, 5, generator=g, dtype=torch.float64) * 3
    _close(L.z_loss(logits), oracle_z(logits))


def test_z_loss_of_zero_logits_is_log_E_squared():
    _close(L.z_loss(torch.zeros(3, 8, dtype=torch.float64)), math.log(8) ** 2)


def test_importance_matches_numpy_population_cv():
    probs = _rand_probs(11, 5, seed=6)
    _close(L.importance_loss(probs), oracle_cv2(probs))


def test_importance_uses_population_std():
    # All mass on one of E experts: importance = (T, 0, ..., 0); population CV^2 = E - 1
    # (a sample std would give E).
    T, E = 4, 5
    probs = torch.zeros(T, E, dtype=torch.float64)
    probs[:, 0] = 1.0
    _close(L.importance_loss(probs), E - 1.0)
    _close(L.importance_loss(torch.full((T, E), 0.2, dtype=torch.float64)), 0.0)


def test_load_loss_matches_numpy():
    g = torch.Generator().manual_seed(7)
    load = torch.rand(9, 4, generator=g, dtype=torch.float64)
    _close(L.load_loss(load), oracle_cv2(load))


# ----------------------------------------------------------------------------
# sequence-wise aux (DeepSeek-V3)
# ----------------------------------------------------------------------------


def test_sequence_aux_sees_per_sequence_imbalance():
    # Each sequence puts everything on one expert, the batch as a whole is balanced.
    E = 2
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    experts = torch.tensor([[0], [0], [1], [1]])
    _close(L.load_balancing_loss(probs, experts, E), 1.0)
    _close(L.sequence_aux_loss(probs, experts, E, 2), 2.0)


def test_sequence_aux_matches_loop_over_sequences():
    T, E, k, n = 12, 5, 2, 4
    probs, experts = _rand_probs(T, E, seed=8), _rand_experts(T, E, k, seed=8)
    expected = sum(oracle_load_balancing(probs[s:s + n], experts[s:s + n], E) for s in range(0, T, n)) / (T // n)
    _close(L.sequence_aux_loss(probs, experts, E, n), expected)


def test_sequence_aux_whole_batch_equals_load_balancing():
    T, E, k = 10, 4, 2
    probs, experts = _rand_probs(T, E, seed=9), _rand_experts(T, E, k, seed=9)
    expected = oracle_load_balancing(probs, experts, E)
    _close(L.sequence_aux_loss(probs, experts, E, None), expected)
    _close(L.sequence_aux_loss(probs, experts, E, T), expected)


# ----------------------------------------------------------------------------
# LIMoE entropies
# ----------------------------------------------------------------------------


def test_limoe_local_one_hot_is_zero_uniform_is_log_E():
    E = 6
    one_hot = torch.eye(E, dtype=torch.float64)[[0, 3, 5, 3]]
    _close(L.limoe_local_entropy(one_hot), 0.0)
    _close(L.limoe_local_entropy(torch.full((4, E), 1.0 / E, dtype=torch.float64)), math.log(E))


def test_limoe_local_matches_loop():
    probs = _rand_probs(9, 5, seed=10)
    _close(L.limoe_local_entropy(probs), oracle_local(probs))


def test_limoe_local_zero_probability_has_finite_gradient():
    probs = torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    loss = L.limoe_local_entropy(probs)
    loss.backward()
    _close(loss, math.log(2) / 2)
    assert torch.isfinite(probs.grad).all()


def test_limoe_global_uniform_mean_meets_threshold():
    E = 8
    probs = torch.full((5, E), 1.0 / E, dtype=torch.float64)
    for S in (1, 4, 8):
        assert float(L.limoe_global_entropy(probs, min_experts=S)) == pytest.approx(0.0, abs=1e-12)


def test_limoe_global_all_on_one_expert_is_log_S():
    E = 8
    probs = torch.zeros(5, E, dtype=torch.float64)
    probs[:, 3] = 1.0
    for S in (2, 3.5, 8):
        _close(L.limoe_global_entropy(probs, min_experts=S), math.log(S))


def test_limoe_global_uses_entropy_of_the_mean():
    # Half the tokens one-hot on expert 0, half on expert 1: every token has H = 0,
    # but the mean distribution is uniform over 2 of 4 experts, H = log 2.
    E = 4
    probs = torch.eye(E, dtype=torch.float64)[[0, 1, 0, 1]]
    _close(L.limoe_global_entropy(probs, min_experts=4), math.log(4) - math.log(2))
    _close(L.limoe_global_entropy(probs, min_experts=2), 0.0)
    _close(L.limoe_global_entropy(probs, min_experts=3), math.log(3) - math.log(2))


def test_limoe_global_matches_loop():
    probs = _rand_probs(9, 6, seed=11)
    _close(L.limoe_global_entropy(probs, min_experts=6), oracle_global(probs, 6))


def test_limoe_global_descent_increases_entropy_of_mean():
    # The sign trap: minimising the loss must spread the tokens over experts.
    g = torch.Generator().manual_seed(12)
    E = 6
    logits = (torch.randn(16, E, generator=g, dtype=torch.float64) * 0.3)
    logits[:, 0] += 4.0  # start concentrated on expert 0
    logits.requires_grad_()

    def mean_entropy():
        return oracle_entropy(torch.softmax(logits, -1).mean(0).tolist())

    h0 = mean_entropy()
    opt = torch.optim.SGD([logits], lr=2.0)
    for _ in range(30):
        opt.zero_grad()
        L.limoe_global_entropy(torch.softmax(logits, -1), min_experts=E).backward()
        opt.step()
    assert mean_entropy() > h0 + 0.5, (h0, mean_entropy())


def test_limoe_global_stops_pushing_above_threshold():
    # H(mean p) = log 2 >= log S for S = 1.5: loss 0 and zero gradient.
    probs = torch.tensor([[0.7, 0.3, 0.0], [0.3, 0.7, 0.0]], dtype=torch.float64, requires_grad=True)
    loss = L.limoe_global_entropy(probs, min_experts=1.5)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.count_nonzero(probs.grad) == 0


# ----------------------------------------------------------------------------
# modality semantics
# ----------------------------------------------------------------------------

_M_CASES = {
    "load_balancing": (lambda p, lg, ex, ld, **kw: L.load_balancing_loss(p, ex, p.shape[1], **kw)),
    "z_loss": (lambda p, lg, ex, ld, **kw: L.z_loss(lg, **kw)),
    "importance": (lambda p, lg, ex, ld, **kw: L.importance_loss(p, **kw)),
    "load": (lambda p, lg, ex, ld, **kw: L.load_loss(ld, **kw)),
    "limoe_local": (lambda p, lg, ex, ld, **kw: L.limoe_local_entropy(p, **kw)),
    "limoe_global": (lambda p, lg, ex, ld, **kw: L.limoe_global_entropy(p, min_experts=4, **kw)),
}

_ORACLES = {
    "load_balancing": lambda p, lg, ex, ld: oracle_load_balancing(p, ex, p.shape[1]),
    "z_loss": lambda p, lg, ex, ld: oracle_z(lg),
    "importance": lambda p, lg, ex, ld: oracle_cv2(p),
    "load": lambda p, lg, ex, ld: oracle_cv2(ld),
    "limoe_local": lambda p, lg, ex, ld: oracle_local(p),
    "limoe_global": lambda p, lg, ex, ld: oracle_global(p, 4),
}


def _two_modality_batch():
    T, E, k = 10, 4, 2
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(T, E, generator=g, dtype=torch.float64)
    modality = torch.tensor([0, 1, 1, 0, 1, 1, 1, 0, 1, 1])
    logits[modality == 0, 0] += 3.0  # modality 0 concentrated, modality 1 diffuse
    probs = torch.softmax(logits, -1)
    experts = _rand_experts(T, E, k, seed=13)
    load = torch.rand(T, E, generator=g, dtype=torch.float64)
    return probs, logits, experts, load, modality


@pytest.mark.parametrize("name", sorted(_M_CASES))
def test_modality_mean_of_single_modality_values(name):
    probs, logits, experts, load, modality = _two_modality_batch()
    per = []
    for m in (0, 1):
        sel = modality == m
        per.append(_ORACLES[name](probs[sel], logits[sel], experts[sel], load[sel]))
    assert abs(per[0] - per[1]) > 1e-3  # the modalities really differ
    got = _M_CASES[name](probs, logits, experts, load, modality=modality, num_modalities=2)
    _close(got, (per[0] + per[1]) / 2)
    # An absent third modality changes nothing.
    got3 = _M_CASES[name](probs, logits, experts, load, modality=modality, num_modalities=3)
    _close(got3, (per[0] + per[1]) / 2)


@pytest.mark.parametrize("name", sorted(_M_CASES))
def test_per_modality_values_and_absent_zero(name):
    probs, logits, experts, load, modality = _two_modality_batch()
    fn = {
        "load_balancing": (L.load_balancing_loss, (probs, experts, 4), {}),
        "z_loss": (L.z_loss, (logits,), {}),
        "importance": (L.importance_loss, (probs,), {}),
        "load": (L.load_loss, (load,), {}),
        "limoe_local": (L.limoe_local_entropy, (probs,), {}),
        "limoe_global": (L.limoe_global_entropy, (probs,), {"min_experts": 4}),
    }[name]
    vals = L.per_modality(fn[0], *fn[1], modality=modality, num_modalities=3, **fn[2])
    assert vals.shape == (3,)
    for m in (0, 1):
        sel = modality == m
        _close(vals[m], _ORACLES[name](probs[sel], logits[sel], experts[sel], load[sel]))
    assert float(vals[2]) == 0.0


def test_sequence_aux_per_modality_matches_loop():
    # modality m's loss = mean over the sequences containing m of the LB loss over m's tokens there.
    T, E, k, n = 12, 4, 2, 4
    probs, experts = _rand_probs(T, E, seed=14), _rand_experts(T, E, k, seed=14)
    modality = torch.tensor([0, 0, 1, 0, 0, 0, 0, 0, 1, 1, 0, 1])  # sequence 1 has no modality-1 token
    per_m = []
    for m in (0, 1):
        vals = []
        for s in range(0, T, n):
            sel = modality[s:s + n] == m
            if sel.any():
                vals.append(oracle_load_balancing(probs[s:s + n][sel], experts[s:s + n][sel], E))
        per_m.append(sum(vals) / len(vals))
    got = L.sequence_aux_loss(probs, experts, E, n, modality=modality, num_modalities=2)
    _close(got, sum(per_m) / 2)


def test_single_present_modality_equals_unmasked_loss():
    probs = _rand_probs(7, 4, seed=15)
    modality = torch.full((7,), 1)
    _close(L.limoe_local_entropy(probs, modality=modality, num_modalities=2), oracle_local(probs))


def test_no_tokens_gives_zero_connected_to_graph():
    E = 4
    probs = torch.zeros(0, E, dtype=torch.float64, requires_grad=True)
    logits = torch.zeros(0, E, dtype=torch.float64, requires_grad=True)
    experts = torch.zeros(0, 2, dtype=torch.long)
    empty_mod = torch.zeros(0, dtype=torch.long)
    results = [
        L.load_balancing_loss(probs, experts, E),
        L.load_balancing_loss(probs, experts, E, modality=empty_mod, num_modalities=2),
        L.sequence_aux_loss(probs, experts, E, 3),
        L.z_loss(logits, modality=empty_mod, num_modalities=2),
        L.importance_loss(probs),
        L.load_loss(probs),
        L.limoe_local_entropy(probs, modality=empty_mod, num_modalities=2),
        L.limoe_global_entropy(probs, min_experts=2),
    ]
    for r in results:
        assert r.shape == () and float(r.detach()) == 0.0
        assert r.grad_fn is not None
        r.backward()


# ----------------------------------------------------------------------------
# gradcheck (float64)
# ----------------------------------------------------------------------------


def _gc_inputs():
    g = torch.Generator().manual_seed(16)
    logits = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    experts = _rand_experts(6, 4, 2, seed=16)
    modality = torch.tensor([0, 1, 0, 0, 1, 1])
    return logits, experts, modality


@pytest.mark.parametrize("with_modality", [False, True])
@pytest.mark.parametrize("name", ["load_balancing", "z_loss", "importance", "load", "sequence_aux",
                                  "limoe_local", "limoe_global"])
def test_gradcheck(name, with_modality):
    logits, experts, modality = _gc_inputs()
    kw = {"modality": modality, "num_modalities": 2} if with_modality else {}
    fns = {
        "load_balancing": lambda x: L.load_balancing_loss(torch.softmax(x, -1), experts, 4, **kw),
        "z_loss": lambda x: L.z_loss(x, **kw),
        "importance": lambda x: L.importance_loss(torch.softmax(x, -1), **kw),
        "load": lambda x: L.load_loss(torch.sigmoid(x), **kw),
        "sequence_aux": lambda x: L.sequence_aux_loss(torch.softmax(x, -1), experts, 4, 3, **kw),
        "limoe_local": lambda x: L.limoe_local_entropy(torch.softmax(x, -1), **kw),
        "limoe_global": lambda x: L.limoe_global_entropy(torch.softmax(x, -1), min_experts=4, **kw),
    }
    fn = fns[name]
    assert float(fn(logits).detach()) > 0  # away from the relu kink / not trivially zero
    assert torch.autograd.gradcheck(fn, (logits,))


def test_gradcheck_probs_directly():
    probs = _rand_probs(5, 3, seed=17).requires_grad_()
    experts = _rand_experts(5, 3, 1, seed=17)
    assert torch.autograd.gradcheck(lambda p: L.load_balancing_loss(p, experts, 3), (probs,))
    assert torch.autograd.gradcheck(lambda p: L.limoe_global_entropy(p, min_experts=3), (probs,))


# ----------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------


def _bad_calls():
    p = _rand_probs(6, 4)
    ex = _rand_experts(6, 4, 2)
    mod = torch.tensor([0, 1, 0, 1, 0, 1])
    return [
        ("modality", lambda: L.z_loss(p, modality=mod[:5], num_modalities=2)),
        ("modality", lambda: L.importance_loss(p, modality=mod.reshape(2, 3), num_modalities=2)),
        ("modality", lambda: L.limoe_local_entropy(p, modality=mod.double(), num_modalities=2)),
        ("modality", lambda: L.load_balancing_loss(p, ex, 4, modality=mod, num_modalities=1)),
        ("modality", lambda: L.load_loss(p, modality=mod - 1, num_modalities=2)),
        ("config key 'num_modalities': got 0; it must be >= 1", lambda: L.z_loss(p, modality=mod, num_modalities=0)),
        ("probs", lambda: L.importance_loss(p.reshape(-1))),
        ("probs", lambda: L.limoe_global_entropy(p[None], min_experts=2)),
        ("logits", lambda: L.z_loss(p.reshape(2, 3, 4))),
        ("load", lambda: L.load_loss(p.reshape(-1))),
        ("experts", lambda: L.load_balancing_loss(p, ex[:5], 4)),
        ("experts", lambda: L.load_balancing_loss(p, ex.reshape(-1), 4)),
        ("experts", lambda: L.sequence_aux_loss(p, ex + 3, 4, 2)),
        ("num_experts", lambda: L.load_balancing_loss(p, ex, 5)),
        (r"config key 'min_experts': got 0; it must be in \(0, 4\]", lambda: L.limoe_global_entropy(p, min_experts=0)),
        (r"config key 'min_experts': got -1.0; it must be in \(0, 4\]",
         lambda: L.limoe_global_entropy(p, min_experts=-1.0)),
        (r"config key 'min_experts': got 4.5; it must be in \(0, 4\]",
         lambda: L.limoe_global_entropy(p, min_experts=4.5)),
        ("config key 'seq_len': got 0; it must be >= 1", lambda: L.sequence_aux_loss(p, ex, 4, 0)),
        ("seq_len", lambda: L.sequence_aux_loss(p, ex, 4, 4)),  # 6 tokens not a multiple of 4
    ]


@pytest.mark.parametrize("index", range(19))
def test_validation_errors_name_the_argument(index):
    calls = _bad_calls()
    assert len(calls) == 19
    arg, call = calls[index]
    with pytest.raises(ValueError, match=arg):
        call()


# ----------------------------------------------------------------------------
# dispatcher
# ----------------------------------------------------------------------------


def test_aux_losses_applies_coefficients():
    probs, logits, experts, load, modality = _two_modality_batch()
    r = _routing(probs, experts, logits=logits, modality=modality, load=load)
    coefs = {"load_balancing": 0.01, "z_loss": 0.001, "importance": 0.5, "load": 0.25,
             "sequence_aux": 0.1, "limoe_local": 0.2, "limoe_global": 0.3}
    out = L.aux_losses(r, coefs, num_modalities=2, min_experts=3, seq_len=5)
    assert list(out) == list(coefs)
    kw = dict(modality=modality, num_modalities=2)
    expected = {
        "load_balancing": L.load_balancing_loss(probs, experts, 4, **kw),
        "z_loss": L.z_loss(logits, **kw),
        "importance": L.importance_loss(probs, **kw),
        "load": L.load_loss(load, **kw),
        "sequence_aux": L.sequence_aux_loss(probs, experts, 4, 5, **kw),
        "limoe_local": L.limoe_local_entropy(probs, **kw),
        "limoe_global": L.limoe_global_entropy(probs, min_experts=3, **kw),
    }
    for name, coef in coefs.items():
        assert float(expected[name]) > 0
        _close(out[name], coef * float(expected[name]), tol=1e-9)


def test_aux_losses_sequence_aux_default_is_one_sequence_and_backprops():
    logits = torch.randn(8, 4, generator=torch.Generator().manual_seed(18), dtype=torch.float64,
                         requires_grad=True)
    probs = torch.softmax(logits, -1)
    experts = _rand_experts(8, 4, 2, seed=18)
    out = L.aux_losses(_routing(probs, experts, logits=logits), {"sequence_aux": 2.0, "load_balancing": 2.0})
    _close(out["sequence_aux"], 2.0 * oracle_load_balancing(probs.detach(), experts, 4), tol=1e-9)
    _close(out["sequence_aux"], out["load_balancing"], tol=1e-12)
    sum(out.values()).backward()
    assert logits.grad is not None and torch.count_nonzero(logits.grad) > 0


def test_aux_losses_normalises_sigmoid_scores():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(19), dtype=torch.float64)
    scores = torch.sigmoid(logits)
    experts = torch.topk(scores, 2, dim=-1).indices
    out = L.aux_losses(_routing(scores, experts, logits=logits), {"load_balancing": 1.0})
    normalised = scores / scores.sum(-1, keepdim=True)
    _close(out["load_balancing"], oracle_load_balancing(normalised, experts, 4))


def test_aux_losses_rejects_unknown_name():
    r = _routing(_rand_probs(4, 3), _rand_experts(4, 3, 1))
    with pytest.raises(ValueError, match="load_balancing") as info:
        L.aux_losses(r, {"balance": 1.0})
    assert "balance" in str(info.value)


def test_aux_losses_load_needs_noisy_topk():
    r = _routing(_rand_probs(4, 3), _rand_experts(4, 3, 1))
    with pytest.raises(ValueError, match="noisy_topk"):
        L.aux_losses(r, {"load": 1.0})


def test_aux_losses_checks_coefficients():
    r = _routing(_rand_probs(4, 3), _rand_experts(4, 3, 1))
    with pytest.raises(ValueError, match="config key 'coefficients.z_loss': got -1.0; it must be >= 0"):
        L.aux_losses(r, {"z_loss": -1.0})
    with pytest.raises(TypeError, match="config key 'coefficients.z_loss': got True; it must be a number"):
        L.aux_losses(r, {"z_loss": True})
    with pytest.raises(TypeError, match="config key 'coefficients': got 'z_loss'; it must be a mapping with keys "):
        L.aux_losses(r, "z_loss")


def test_aux_losses_skipped_returns_zeros():
    probs = torch.full((4, 3), float("nan"), dtype=torch.float64)
    r = _routing(probs, _rand_experts(4, 3, 1), skipped=True)
    out = L.aux_losses(r, {"load_balancing": 1.0, "z_loss": 0.5})
    assert set(out) == {"load_balancing", "z_loss"}
    for v in out.values():
        assert v.shape == () and float(v) == 0.0


# ----------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------


def test_registry_names_are_the_config_names():
    from moe import config

    assert list(L.AUX_LOSS_NAMES) == list(L.AUX_LOSSES)
    assert list(config.AUX_LOSS_NAMES) == list(L.AUX_LOSSES)
    assert set(L.AUX_LOSSES) == {"load_balancing", "z_loss", "importance", "load", "sequence_aux",
                                 "limoe_local", "limoe_global"}


def test_registering_a_loss_makes_it_usable_from_config_and_layer(monkeypatch):
    """One function and one table entry: MoEConfig accepts the name, aux_losses and the layer compute it."""
    import moe

    def max_prob(inputs):
        # Mean over tokens of the largest routing probability, per modality.
        top_T = inputs.probs.max(-1).values
        if inputs.modality is None:
            return top_T.mean()[None], torch.ones(1, dtype=torch.bool)
        M = inputs.num_modalities
        per_M = torch.stack([top_T[inputs.modality == m].sum() for m in range(M)])
        n_M = torch.bincount(inputs.modality, minlength=M)
        return per_M / n_M.clamp_min(1), n_M > 0

    with pytest.raises(ValueError, match="max_prob"):
        moe.MoEConfig(d_model=4, d_ffn=8, num_experts=3, aux_losses={"max_prob": 1.0})
    monkeypatch.setitem(L.AUX_LOSSES, "max_prob", max_prob)
    assert "max_prob" in L.AUX_LOSS_NAMES

    probs = _rand_probs(6, 3, seed=40)
    experts = _rand_experts(6, 3, 1, seed=40)
    modality = torch.tensor([0, 0, 0, 0, 2, 2])  # modality 1 absent: not in the mean
    out = L.aux_losses(_routing(probs, experts, modality=modality), {"max_prob": 0.5, "load_balancing": 1.0},
                       num_modalities=3)
    top = probs.max(-1).values.tolist()
    expected = (sum(top[:4]) / 4 + sum(top[4:]) / 2) / 2
    _close(out["max_prob"], 0.5 * expected, tol=1e-12)
    _close(out["load_balancing"], float(L.load_balancing_loss(probs, experts, 3, modality=modality,
                                                              num_modalities=3)), tol=1e-12)

    cfg = moe.MoEConfig(d_model=4, d_ffn=8, num_experts=3, aux_losses={"max_prob": 2.0})
    layer = moe.MoELayer(cfg)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(41))
    _, aux = layer(x)
    assert set(aux) == {"max_prob"}
    p = layer.last_routing.probs.detach().double()
    _close(aux["max_prob"], 2.0 * float(p.max(-1).values.mean()), tol=1e-6)
