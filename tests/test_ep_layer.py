"""The expert-parallel MoELayer equals a single-process layer holding every expert.

Oracle: on every rank, a plain ``MoELayer`` with all E experts and the same weights,
applied to each rank's own tokens separately (capacity is per rank, so this is
exactly what the expert-parallel layer must compute).
"""
import pytest
import torch

import torch.distributed as dist

import moe
from moe.dispatch import AllToAllDispatcher, HierarchicalAllToAllDispatcher, new_node_groups
from parallel.dims import ParallelDims
from parallel.grads import allreduce_gradients
from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.distributed

D, F, E = 8, 16, 4
AUX = {"load_balancing": 0.1, "z_loss": 0.01}


def _tokens(rank, n, seed, positive=False):
    g = torch.Generator().manual_seed(1000 * seed + rank)
    x = torch.randn(n, D, generator=g)
    return (x.abs() if positive else x), torch.randn(n, D, generator=g)


def _copy_weights(ep_layer, full):
    with torch.no_grad():
        ep_layer.router.weight.copy_(full.router.weight)
        lo = ep_layer.experts.first_expert
        hi = lo + ep_layer.num_local_experts
        ep_layer.experts.w1.copy_(full.experts.w1[lo:hi])
        ep_layer.experts.w2.copy_(full.experts.w2[lo:hi])


def _make_dispatcher(kind, groups, ep):
    if kind == "chunked":
        return AllToAllDispatcher(groups.ep_group, E, num_chunks=2)
    if kind == "hierarchical":  # treat 4 ranks as 2 nodes x 2 ranks
        nodes = new_node_groups(ParallelDims.from_world(dist.get_world_size(), ep=ep).group_ranks("ep"), 2)
        return HierarchicalAllToAllDispatcher(groups.ep_group, E, 2, node_groups=nodes)
    return None


def _ep_matches_single(rank, world, ep, router_kwargs, tokens_per_rank, seed, skew, dispatcher=None):
    groups = ParallelDims.from_world(world, ep=ep).build()
    torch.manual_seed(seed)
    cfg = moe.MoEConfig(d_model=D, d_ffn=F, num_experts=E, aux_losses=AUX,
                        router=moe.RouterConfig(**router_kwargs))
    full = moe.MoELayer(cfg)
    if skew == "one_expert":  # every token on every rank goes to expert 0
        with torch.no_grad():
            full.router.weight.zero_()
    elif skew == "no_traffic_to_last_rank":  # positive inputs, so these experts score very low
        with torch.no_grad():
            full.router.weight[E - E // ep:] = -10.0
    layer = moe.MoELayer(cfg, ep_group=groups.ep_group, dispatcher=_make_dispatcher(dispatcher, groups, ep))
    _copy_weights(layer, full)

    positive = skew == "no_traffic_to_last_rank"
    x, g = _tokens(rank, tokens_per_rank[rank], seed, positive)
    x.requires_grad_(True)
    y, aux = layer(x)
    loss = (y * g).sum() + sum(aux.values())
    loss.backward()

    # Oracle for this rank's outputs, aux and input/router grads: the full layer on x alone.
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref, aux_ref = full(x_ref)
    ((y_ref * g).sum() + sum(aux_ref.values())).backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert set(aux) == set(aux_ref)
    for k in aux:
        torch.testing.assert_close(aux[k], aux_ref[k], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.router.weight.grad, full.router.weight.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.last_routing.kept, full.last_routing.kept)

    # Expert grads: this rank's experts collect the contributions of every rank in its ep group.
    full.zero_grad()
    ep_ranks = ParallelDims.from_world(world, ep=ep).group_of("ep", rank)
    for q in ep_ranks:
        xq, gq = _tokens(q, tokens_per_rank[q], seed, positive)
        yq, _ = full(xq)
        (yq * gq).sum().backward()
    lo, hi = layer.experts.first_expert, layer.experts.first_expert + layer.num_local_experts
    torch.testing.assert_close(layer.experts.w1.grad, full.experts.w1.grad[lo:hi], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.experts.w2.grad, full.experts.w2.grad[lo:hi], rtol=1e-5, atol=1e-6)

    # Traffic is exactly the routed rows x D x itemsize, with no padding (one hop; the
    # hierarchical exchange may move a row twice, once inside the node and once across).
    r = layer.last_routing
    owner = r.experts // (E // ep)
    remote = int((r.kept & (owner != groups.ep_rank)).sum())
    if dispatcher != "hierarchical":
        assert layer.last_stats["bytes_sent"] == remote * D * 4
    if positive:
        assert int((owner == ep - 1)[r.kept].sum()) == 0
    return layer.last_stats["bytes_sent"], layer.last_stats["bytes_received"]


ROUTERS = {
    "top1": dict(top_k=1, policy="switch"),
    "top2": dict(top_k=2),
    "top2-cap": dict(top_k=2, capacity_factor=1.0),
    "bpr-cap": dict(top_k=2, capacity_factor=0.75, drop_policy="bpr"),
}


# Every router at world 2; at world 4 (ep=4, and ep=2 x edp=2) the capacity cases, plus
# dropless top-1 and top-2 once each.
CASES = ([(2, 2, r) for r in ROUTERS] + [(4, ep, r) for ep in (4, 2) for r in ("top2-cap", "bpr-cap")]
         + [(4, 2, "top1"), (4, 4, "top2")])


@pytest.mark.parametrize("world, ep, router", CASES, ids=[f"w{w}-ep{e}-{r}" for w, e, r in CASES])
def test_ep_layer_equals_single_process(world, ep, router):
    tokens = [12, 7, 16, 9][:world]
    sent = run_distributed(_ep_matches_single, world, ep, ROUTERS[router], tokens, 3, None, timeout=120)
    # What one rank sends, others receive: totals agree.
    assert sum(s for s, _ in sent) == sum(r for _, r in sent)


@pytest.mark.parametrize("skew, tokens", [
    ("one_expert", [10, 6]),
    ("no_traffic_to_last_rank", [10, 6]),
    (None, [0, 9]),  # a rank with zero tokens
])
def test_ep_layer_skewed_traffic(skew, tokens):
    run_distributed(_ep_matches_single, 2, 2, dict(top_k=2, capacity_factor=1.5), tokens, 5, skew, timeout=120)


@pytest.mark.parametrize("world, ep, kind", [(2, 2, "chunked"), (4, 4, "hierarchical")])
def test_ep_layer_overlap_and_hierarchical(world, ep, kind):
    tokens = [12, 7, 16, 9][:world]
    run_distributed(_ep_matches_single, world, ep, ROUTERS["bpr-cap"], tokens, 4, None, kind, timeout=120)


def test_ep_size_must_divide_experts():
    run_distributed(_bad_ep, 3, timeout=60)


def _bad_ep(rank, world):
    import torch.distributed as dist
    with pytest.raises(ValueError, match="num_experts=4"):
        moe.MoELayer(moe.MoEConfig(d_model=D, d_ffn=F, num_experts=4), ep_group=dist.group.WORLD)


# ------------------------------------------------------------------ a short training run

class TinyModel(torch.nn.Module):
    def __init__(self, ep_group=None):
        super().__init__()
        self.inp = torch.nn.Linear(D, D)
        cfg = moe.MoEConfig(d_model=D, d_ffn=F, num_experts=E, aux_losses=AUX,
                            router=moe.RouterConfig(top_k=2, capacity_factor=1.25, drop_policy="bpr"))
        self.moe = moe.MoELayer(cfg, ep_group=ep_group)
        self.out = torch.nn.Linear(D, 1)

    def forward(self, x):
        h = self.inp(x)
        y, aux = self.moe(h)
        return self.out(h + y).squeeze(-1), sum(aux.values())


def _batch(rank, step):
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(16, D, generator=g)
    return x, x.sum(-1).sin()


def _loss(model, rank, step):
    x, target = _batch(rank, step)
    pred, aux = model(x)
    return torch.nn.functional.mse_loss(pred, target) + aux


def _train_ep(rank, world, ep, steps):
    groups = ParallelDims.from_world(world, ep=ep).build()
    torch.manual_seed(0)
    full = TinyModel()
    model = TinyModel(ep_group=groups.ep_group)
    state = {k: v for k, v in full.state_dict().items() if "experts" not in k}
    model.load_state_dict(state, strict=False)
    _copy_weights(model.moe, full.moe)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        opt.zero_grad()
        _loss(model, rank, step).backward()
        allreduce_gradients(model, groups)
        opt.step()
    lo = model.moe.experts.first_expert
    return {"inp": model.inp.weight.detach(), "router": model.moe.router.weight.detach(),
            "w1": model.moe.experts.w1.detach(), "lo": lo}


def test_short_training_run_equals_single_process():
    world, ep, steps = 2, 2, 4
    results = run_distributed(_train_ep, world, ep, steps, timeout=120)
    torch.manual_seed(0)
    full = TinyModel()
    opt = torch.optim.SGD(full.parameters(), lr=0.1)
    for step in range(steps):
        opt.zero_grad()
        # Data-parallel semantics: the loss is the mean over ranks of each rank's loss.
        (sum(_loss(full, r, step) for r in range(world)) / world).backward()
        opt.step()
    for res in results:
        torch.testing.assert_close(res["inp"], full.inp.weight.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["router"], full.moe.router.weight.detach(), rtol=1e-5, atol=1e-6)
        lo, n = res["lo"], res["w1"].shape[0]
        torch.testing.assert_close(res["w1"], full.moe.experts.w1.detach()[lo:lo + n], rtol=1e-5, atol=1e-6)
