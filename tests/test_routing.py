"""Routing policies and capacity semantics against naive per-token loops."""
import math

import pytest
import torch

import moe
from moe.ops import reference
from moe.routing import service_order


def naive_topk(scores, k, bias=None):
    """Per token: sort (score + bias) descending, ties to the lower index."""
    out = []
    for t in range(scores.shape[0]):
        sel = [(-(float(scores[t, e]) + (float(bias[e]) if bias is not None else 0.0)), e)
               for e in range(scores.shape[1])]
        out.append([e for _, e in sorted(sel)[:k]])
    return torch.tensor(out, dtype=torch.long).view(scores.shape[0], k)


def naive_slots(experts, dispatched, keys, capacity, E):
    """Serve assignments sorted by ``keys[(t, j)]``; each expert counts its arrivals."""
    T, k = experts.shape
    count = [0] * E
    pos = torch.full((T, k), -1, dtype=torch.long)
    for t, j in sorted(((t, j) for t in range(T) for j in range(k)), key=lambda a: keys[a]):
        if not dispatched[t, j]:
            continue
        e = int(experts[t, j])
        if capacity is None or count[e] < capacity:
            pos[t, j] = count[e]
        count[e] += 1
    return pos


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_matches_loop(score, normalize, k):
    torch.manual_seed(k)
    logits = torch.randn(37, 6)
    r = moe.route(logits, moe.RouterConfig(top_k=k, score=score, normalize_weights=normalize))
    scores = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    exp = naive_topk(scores, k)
    assert torch.equal(r.experts, exp)
    w = scores.gather(1, exp)
    if normalize:
        w = w / w.sum(-1, keepdim=True)
    torch.testing.assert_close(r.weights, w)
    torch.testing.assert_close(r.probs, scores)
    assert r.kept.all() and r.capacity is None
    assert torch.equal(r.tokens_per_expert, torch.bincount(exp.flatten(), minlength=6))


def test_router_math_is_fp32_for_half_inputs():
    logits = torch.randn(8, 4).to(torch.bfloat16)
    r = moe.route(logits, moe.RouterConfig(top_k=2))
    assert r.weights.dtype == torch.float32 and r.probs.dtype == torch.float32


def test_ties_go_to_lower_expert_index():
    logits = torch.zeros(5, 4)
    r = moe.route(logits, moe.RouterConfig(top_k=2))
    assert torch.equal(r.experts, torch.tensor([[0, 1]] * 5))
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0]])
    assert moe.route(logits, moe.RouterConfig(top_k=2)).experts.tolist() == [[1, 2]]


def test_switch_weight_is_the_probability_and_carries_gradient():
    logits = torch.randn(10, 4, requires_grad=True)
    r = moe.route(logits, moe.RouterConfig(top_k=1, policy="switch"))
    p = torch.softmax(logits.detach(), -1)
    torch.testing.assert_close(r.weights[:, 0], p.max(-1).values)
    assert (r.weights < 1).all()
    r.weights.sum().backward()
    assert logits.grad.abs().sum() > 0


def test_gshard_random_second_choice_matches_loop():
    torch.manual_seed(0)
    logits = torch.randn(200, 8)
    cfg = moe.RouterConfig(top_k=2, policy="gshard")
    r = moe.route(logits, cfg, generator=torch.Generator().manual_seed(123))
    u = torch.rand(200, generator=torch.Generator().manual_seed(123))
    p = torch.softmax(logits, -1)
    exp = naive_topk(p, 2)
    g = p.gather(1, exp)
    g = g / g.sum(-1, keepdim=True)
    assert torch.equal(r.experts, exp)
    torch.testing.assert_close(r.weights, g)
    assert r.dispatched[:, 0].all()
    assert torch.equal(r.dispatched[:, 1], u < 2 * g[:, 1])
    assert not r.dispatched[:, 1].all() and r.dispatched[:, 1].any()
    assert torch.equal(r.kept, r.dispatched)  # dropless: everything dispatched is kept
    # Reproducible with the same generator seed.
    r2 = moe.route(logits, cfg, generator=torch.Generator().manual_seed(123))
    assert torch.equal(r.dispatched, r2.dispatched)
    # In eval every second choice is dispatched.
    assert moe.route(logits, cfg, training=False).dispatched.all()


def test_noisy_topk_matches_loop():
    torch.manual_seed(1)
    T, E, k = 30, 5, 2
    logits, noise_logits = torch.randn(T, E), torch.randn(T, E)
    r = moe.route(logits, moe.RouterConfig(top_k=k, policy="noisy_topk"), noise_logits=noise_logits,
                  generator=torch.Generator().manual_seed(7))
    noise = torch.randn(T, E, generator=torch.Generator().manual_seed(7))
    std = torch.nn.functional.softplus(noise_logits)
    h = logits + noise * std
    for t in range(T):
        order = sorted(range(E), key=lambda e: (-float(h[t, e]), e))
        top = order[:k]
        assert r.experts[t].tolist() == top
        w = torch.softmax(h[t, top], -1)
        torch.testing.assert_close(r.weights[t], w)
        assert float(r.probs[t].sum()) == pytest.approx(1.0, abs=1e-6)
        for e in range(E):
            others = sorted((float(h[t, o]) for o in range(E) if o != e), reverse=True)
            thr = others[k - 1]
            phi = 0.5 * (1 + math.erf((float(logits[t, e]) - thr) / float(std[t, e]) / math.sqrt(2)))
            assert float(r.load[t, e]) == pytest.approx(phi, abs=1e-5)


def test_noisy_topk_needs_noise_logits():
    with pytest.raises(ValueError, match="noise_logits"):
        moe.route(torch.randn(4, 4), moe.RouterConfig(policy="noisy_topk"))


def test_expert_bias_only_chooses_never_weighs():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 1.0, 0.0])
    r = moe.route(logits, moe.RouterConfig(top_k=2, policy="expert_bias"), expert_bias=bias)
    p = torch.softmax(logits, -1)
    assert r.experts.tolist() == [[2, 0]]  # bias lifts expert 2 above expert 0/1
    w = p[0, [2, 0]]
    torch.testing.assert_close(r.weights[0], w / w.sum())


def test_sigmoid_with_expert_bias_matches_loop():
    torch.manual_seed(3)
    logits, bias = torch.randn(20, 6), torch.randn(6) * 0.3
    r = moe.route(logits, moe.RouterConfig(top_k=2, policy="expert_bias", score="sigmoid"), expert_bias=bias)
    s = torch.sigmoid(logits)
    exp = naive_topk(s, 2, bias)
    assert torch.equal(r.experts, exp)
    w = s.gather(1, exp)
    torch.testing.assert_close(r.weights, w / w.sum(-1, keepdim=True))


def test_expert_choice_matches_loop():
    torch.manual_seed(2)
    T, E = 12, 3
    logits = torch.randn(T, E)
    cfg = moe.RouterConfig(top_k=2, policy="expert_choice", capacity_factor=1.0)
    r = moe.route(logits, cfg)
    C = math.ceil(1.0 * T / E)
    assert r.capacity == C
    p = torch.softmax(logits, -1)
    for e in range(E):
        chosen = sorted(range(T), key=lambda t: (-float(p[t, e]), t))[:C]
        for pos, t in enumerate(chosen):
            assert r.kept[t, e] and r.positions[t, e] == pos
        assert int(r.kept[:, e].sum()) == C
    assert torch.equal(r.experts, torch.arange(E).expand(T, E))
    torch.testing.assert_close(r.weights, p)


# ----------------------------------------------------------------------------- capacity


def test_capacity_formula():
    cfg = moe.RouterConfig(top_k=2, capacity_factor=1.25, eval_capacity_factor=2.0, min_capacity=4)
    assert cfg.capacity_for(100, 8, training=True) == math.ceil(1.25 * 100 * 2 / 8)
    assert cfg.capacity_for(100, 8, training=False) == math.ceil(2.0 * 100 * 2 / 8)
    assert cfg.capacity_for(4, 8, training=True) == 4  # min_capacity
    assert moe.RouterConfig(capacity_factor=1.0).capacity_for(7, 3, training=False) == math.ceil(14 / 3)
    assert moe.RouterConfig().capacity_for(100, 8, training=True) is None


def test_position_keeps_earliest_and_serves_first_choices_first():
    # 4 tokens, E=2, k=2. Every token's first choice is expert 0, second expert 1, except
    # token 3 whose first choice is expert 1. capacity = ceil(0.5*4*2/2) = 2.
    logits = torch.tensor([[2.0, 1.0], [2.0, 1.0], [2.0, 1.0], [1.0, 2.0]])
    r = moe.route(logits, moe.RouterConfig(top_k=2, capacity_factor=0.5, normalize_weights=False))
    assert r.capacity == 2
    # Expert 0: first choices of tokens 0, 1 kept; token 2's first choice dropped.
    assert r.kept[:, 0].tolist() == [True, True, False, True]
    # Expert 1: token 3's FIRST choice is served before any second choice, then token 0's second.
    assert r.kept[:, 1].tolist() == [True, False, False, False]
    assert r.positions[3, 0] == 0 and r.positions[0, 1] == 1
    assert r.tokens_per_expert.tolist() == [2, 2]
    assert r.dropped_fraction() == pytest.approx(4 / 8)


def test_bpr_keeps_highest_priority_tokens():
    # Top-1 weights differ; BPR keeps the most confident tokens, not the earliest.
    logits = torch.tensor([[0.1, 0.0], [3.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    r = moe.route(logits, moe.RouterConfig(top_k=1, capacity_factor=0.5, drop_policy="bpr"))
    assert r.capacity == 1
    assert r.kept[:, 0].tolist() == [False, True, False, False]
    r = moe.route(logits, moe.RouterConfig(top_k=1, capacity_factor=1.0, drop_policy="bpr"))
    assert r.kept[:, 0].tolist() == [False, True, False, True]
    assert r.positions[1, 0] == 0 and r.positions[3, 0] == 1


def test_bpr_serves_every_first_choice_before_second_choices():
    # Token 0 is the most confident: its SECOND choice (expert 1) must still wait until
    # every first choice (token 1 and 2 pick expert 1 first) has been served.
    logits = torch.tensor([[5.0, 4.0, 0.0], [0.0, 1.0, 0.5], [0.0, 1.0, 0.9]])
    r = moe.route(logits, moe.RouterConfig(top_k=2, capacity_factor=2 / 3, drop_policy="bpr", min_capacity=2))
    assert r.capacity == 2
    assert r.experts[:, 0].tolist() == [0, 1, 1]
    assert r.kept[1, 0] and r.kept[2, 0] and not r.kept[0, 1]


def test_probs_keeps_highest_probability_per_expert():
    # Expert 0 receives tokens 0, 1 and 3 (a tie, so the lower index); expert 1 token 2.
    logits = torch.tensor([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 5.0, 4.9], [0.0, 0.0, 0.0]])
    r = moe.route(logits, moe.RouterConfig(top_k=1, capacity_factor=0.75, drop_policy="probs"))
    assert r.capacity == 1
    # Expert 0 holds token 1 (highest probability), not the earlier token 0 or token 3.
    assert r.experts[:, 0].tolist() == [0, 0, 1, 0]
    assert r.kept[:, 0].tolist() == [False, True, True, False]
    p = torch.softmax(logits, -1)
    assert p[1, 0] > p[0, 0]


def test_random_drop_policy_is_reproducible_and_fills_capacity():
    logits = torch.zeros(40, 2)
    logits[:, 0] = 1.0  # everything to expert 0
    cfg = moe.RouterConfig(top_k=1, capacity_factor=0.25, drop_policy="random")
    r1 = moe.route(logits, cfg, generator=torch.Generator().manual_seed(5))
    r2 = moe.route(logits, cfg, generator=torch.Generator().manual_seed(5))
    r3 = moe.route(logits, cfg, generator=torch.Generator().manual_seed(6))
    assert torch.equal(r1.kept, r2.kept) and not torch.equal(r1.kept, r3.kept)
    assert int(r1.kept.sum()) == r1.capacity == 5
    assert r1.kept[:5, 0].sum() < 5 or r1.kept[5:, 0].any()  # not simply the first five


@pytest.mark.parametrize("policy", ["position", "bpr", "probs"])
@pytest.mark.parametrize("capacity", [None, 0, 1, 3])
def test_slot_assignment_matches_naive_loop(policy, capacity):
    torch.manual_seed(11)
    T, E, k = 25, 4, 2
    logits = torch.randn(T, E)
    logits[:10, 2] += 3  # make one expert overflow
    _, experts, probs, _, _ = reference.router_topk(logits, k, "softmax", True)
    dispatched = torch.rand(T, k) < 0.85
    dispatched[:, 0] = True
    order = service_order(policy, probs, experts)
    pos, kept, tpe = reference.assign_slots(experts, order, dispatched, E, capacity)
    if policy == "position":
        keys = {(t, j): (j, t) for t in range(T) for j in range(k)}
    elif policy == "bpr":
        keys = {(t, j): (j, -float(probs[t, experts[t, 0]]), t) for t in range(T) for j in range(k)}
    else:
        keys = {(t, j): (-float(probs[t, experts[t, j]]), j, t) for t in range(T) for j in range(k)}
    exp = naive_slots(experts, dispatched, keys, capacity, E)
    assert torch.equal(pos, exp)
    assert torch.equal(kept, exp >= 0)
    assert torch.equal(tpe, torch.bincount(experts[exp >= 0], minlength=E))


def test_nonfinite_logits_raise_with_layer_name_or_skip():
    logits = torch.randn(6, 4)
    logits[2, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="block3.moe"):
        moe.route(logits, moe.RouterConfig(), name="block3.moe")
    r = moe.route(logits, moe.RouterConfig(on_nonfinite="skip"))
    assert r.skipped and not r.kept.any() and int(r.tokens_per_expert.sum()) == 0
