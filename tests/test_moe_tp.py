"""The MoE layer under tensor parallelism (tp) and expert tensor parallelism (etp).

Oracle: a one-process ``MoELayer`` holding every expert whole, initialised by
``moe.models.transformer.init_weights`` from the same seed (which draws each expert's
global weights, so the parallel layer's pieces must equal the oracle's). Tokens: one
set per data-parallel replica, the same on the tp ranks of a replica. On every rank:
the output, aux losses, input and router gradients equal the oracle run on that
replica's tokens (capacity is per routing group, and a tp group routes its tokens
together); expert gradients, summed over the edp group (and over etp for b2, whose
gradient is partial there), equal the oracle's summed over every replica's tokens,
cut to this rank's experts and hidden units.
"""
import pytest
import torch
import torch.distributed as dist

import moe
from moe.experts import Experts
from moe.models.transformer import init_weights
from parallel import comm
from parallel.dims import ParallelDims
from parallel.shards import partial_grad_group, shard_of, take_piece
from tests.helpers.distributed import run_distributed

D, F, E = 8, 16, 4
AUX = {"load_balancing": 0.1, "z_loss": 0.01}
TOKENS = 13  # odd: the tp pieces are uneven


def _config(router, activation="gelu", bias=False, **extra):
    return moe.MoEConfig(d_model=D, d_ffn=F, num_experts=E, aux_losses=AUX, activation=activation, init_std=0.5,
                         bias=bias, router=moe.RouterConfig(**router), **extra)


def _tokens(replica, seed):
    g = torch.Generator().manual_seed(1000 * seed + replica)
    return torch.randn(TOKENS, D, generator=g), torch.randn(TOKENS, D, generator=g)


def _randomize_biases(layer, seed):
    """Random b1 / b2 drawn whole (per layer, the same on every rank), this rank's piece kept."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ex in (layer.experts, layer.shared):
            if ex is None or ex.b1 is None:
                continue
            for b in (ex.b1, ex.b2):
                shard = shard_of(b)
                full = torch.randn(E if ex is layer.experts else 1,
                                   *(b.shape[1:] if shard is None else shard.global_shape(b.shape)[1:]), generator=g)
                lo = ex.first_expert
                b.copy_(take_piece(full[lo:lo + ex.num_local], shard))


def _piece_of(full_param, param, experts):
    """The oracle's tensor cut like ``param``: this rank's experts, then its etp piece."""
    lo = experts.first_expert
    return take_piece(full_param[lo:lo + experts.num_local], shard_of(param))


def _layer_matches_oracle(rank, world, dims, router, seed, options):
    groups = ParallelDims(world_size=world, **dims).build()
    activation, bias = options.get("activation", "gelu"), options.get("bias", False)
    extra = options.get("extra", {})
    cfg = _config(router, activation, bias, **extra)
    full = moe.MoELayer(cfg)
    layer = moe.MoELayer(cfg, groups=moe.MoEGroups.from_process_groups(groups))
    init_weights(full, seed)
    init_weights(layer, seed)
    _randomize_biases(full, seed)
    _randomize_biases(layer, seed)
    full_params = dict(full.named_parameters())
    for name, p in layer.named_parameters():  # the seed-based init gives every layout the same weights
        ref = _piece_of(full_params[name], p, layer.experts) if name.startswith("experts.") else full_params[name]
        assert torch.equal(p, ref), name

    x, g = _tokens(groups.dp_rank, seed)
    x.requires_grad_(True)
    y, aux = layer(x)
    ((y * g).sum() + sum(aux.values())).backward()

    x_ref = x.detach().clone().requires_grad_(True)
    y_ref, aux_ref = full(x_ref)
    ((y_ref * g).sum() + sum(aux_ref.values())).backward()
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, y_ref, **tol)
    assert set(aux) == set(aux_ref)
    for k in aux:
        torch.testing.assert_close(aux[k], aux_ref[k], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    # Replicated parameters (router, shared expert, residual coefficient): the gradient of this
    # replica's tokens, complete on every tp rank.
    for name, p in layer.named_parameters():
        if not name.startswith("experts."):
            torch.testing.assert_close(p.grad, full_params[name].grad, **tol, msg=name)
    assert torch.equal(layer.last_stats["tokens_per_expert"], full.last_stats["tokens_per_expert"])
    assert torch.equal(layer.last_routing.kept, full.last_routing.kept)
    start, end = comm.bounds(TOKENS, groups.dims.tp, groups.tp_rank)
    rows = dict(layer=layer.last_stats["expert_rows"], oracle=full.experts.last_rows,
                piece_kept=int(full.last_routing.kept[start:end].sum()),
                dropped=full.last_stats["dropped_fraction"])

    # Expert gradients: every (token, expert) pair is computed once in the world, so the sum of
    # the local gradients over the edp replicas (and over etp for b2) is the oracle's gradient
    # over every replica's tokens.
    full.zero_grad()
    for replica in range(groups.dims.dp):
        xr, gr = _tokens(replica, seed)
        yr, auxr = full(xr)
        ((yr * gr).sum() + sum(auxr.values())).backward()
    for name, p in layer.experts.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad, group=groups.edp_group)
        if partial_grad_group(p) == "etp":
            dist.all_reduce(grad, group=groups.etp_group)
        torch.testing.assert_close(grad, _piece_of(full.experts.get_parameter(name).grad, p, layer.experts),
                                   **tol, msg=name)
    return rows


TOP2 = dict(top_k=2)
TOP2_CAP = dict(top_k=2, capacity_factor=1.0, drop_policy="bpr")
CASES = {
    # world, ParallelDims sizes, router, options
    "tp2": (2, dict(dp=1, tp=2), TOP2_CAP,
            dict(extra=dict(shared_expert_ffn=8, residual_moe=True, pad_to_capacity=True))),
    "etp2": (2, dict(dp=2, etp=2), TOP2_CAP, dict(bias=True, extra=dict(pad_to_capacity=True))),
    "tp2-etp2-swiglu": (2, dict(dp=1, tp=2, etp=2), TOP2, dict(activation="swiglu", bias=True)),
    "ep2-tp2": (4, dict(dp=2, tp=2, ep=2), TOP2, {}),
    "ep2-tp2-cap": (4, dict(dp=2, tp=2, ep=2), TOP2_CAP, dict(extra=dict(overlap_chunks=2))),
    "ep2-tp2-etp2": (4, dict(dp=2, tp=2, ep=2, etp=2), TOP2_CAP,
                     dict(activation="swiglu", bias=True, extra=dict(overlap_chunks=2))),
}


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_tp_layer_equals_one_process(case):
    world, dims, router, options = CASES[case]
    run_distributed(_layer_matches_oracle, world, dims, router, 7, options, timeout=120)


@pytest.mark.distributed
@pytest.mark.parametrize("router", [TOP2, TOP2_CAP], ids=["dropless", "capacity"])
def test_tp_ranks_split_the_expert_rows(router):
    """No duplicated expert work: at tp=2 each rank's experts compute exactly the kept
    assignments of its piece of the tokens, and the two counts sum to the oracle's."""
    rows = run_distributed(_layer_matches_oracle, 2, dict(dp=1, tp=2), router, 11, {}, timeout=120)
    for r in rows:
        assert r["layer"] == r["piece_kept"] > 0
    assert sum(r["layer"] for r in rows) == rows[0]["oracle"]
    assert (rows[0]["dropped"] > 0) == ("capacity_factor" in router)  # the capacity case drops some


# ------------------------------------------------------------------ one process


@pytest.mark.parametrize("pad", [False, True])
def test_routing_pieces_compute_the_full_output(pad):
    """Routing.piece keeps each expert within capacity (padded layout works) and the pieces'
    outputs, put together, are the full routing's."""
    torch.manual_seed(0)
    layer = moe.MoELayer(_config(dict(top_k=2, capacity_factor=0.75)))
    x = torch.randn(TOKENS, D)
    routing = layer.router(x)
    assert not bool(routing.kept.all())  # some drops, so the slots have gaps to renumber
    rows, plan = moe.permute(x, routing)
    y_full = moe.unpermute(layer.experts(rows, plan.rows_per_expert), plan, routing)
    outs = []
    for r in range(3):
        start, end = comm.bounds(TOKENS, 3, r)
        piece = routing.piece(start, end)
        assert torch.equal(piece.tokens_per_expert, torch.bincount(routing.experts[start:end][routing.kept[start:end]], minlength=E))
        assert int(piece.positions.max()) < routing.capacity
        for e in range(E):  # slots 0..n_e-1 of each expert, in the full routing's slot order
            mine = piece.kept & (piece.experts == e)
            assert sorted(piece.positions[mine].tolist()) == list(range(int(mine.sum())))
            order_full = routing.positions[start:end][mine].argsort()
            assert torch.equal(piece.positions[mine][order_full], torch.arange(int(mine.sum())))
        rows, plan = moe.permute(x[start:end], piece, pad_to_capacity=pad)
        out = layer.experts(rows, plan.rows_per_expert, padded_capacity=plan.padded_capacity)
        outs.append(moe.unpermute(out, plan, piece))
    torch.testing.assert_close(torch.cat(outs), y_full)


@pytest.mark.parametrize("activation, bias", [("gelu", True), ("swiglu", True), ("swiglu", False)])
def test_etp_pieces_sum_to_the_whole_expert(activation, bias):
    """Experts(etp_rank, etp_size): each piece is drawn from the global weights, and the partial
    outputs of the pieces (b2 left out) plus b2 are the whole expert's output."""
    def gen(name, e):
        return torch.Generator().manual_seed(100 * e + len(name))

    whole = Experts(E, D, F, activation, bias=bias)
    whole.reset_parameters(gen)
    pieces = [Experts(E, D, F, activation, bias=bias, etp_rank=r, etp_size=2) for r in range(2)]
    for p in pieces:
        p.reset_parameters(gen)
        assert shard_of(p.w1).dim == 2 and shard_of(p.w2).dim == 1 and shard_of(p.w1).group == "etp"
        assert tuple(p.w2.shape) == (E, F // 2, D)
        torch.testing.assert_close(p.w1, take_piece(whole.w1, shard_of(p.w1)), rtol=0, atol=0)
        torch.testing.assert_close(p.w2, take_piece(whole.w2, shard_of(p.w2)), rtol=0, atol=0)
    if bias:
        with torch.no_grad():
            whole.b1.normal_()
            whole.b2.normal_()
            for p in pieces:
                p.b1.copy_(take_piece(whole.b1, shard_of(p.b1)))
                p.b2.copy_(whole.b2)
                assert partial_grad_group(p.b2) == "etp"
    rows, counts = torch.randn(20, D), torch.tensor([5, 0, 9, 6])
    partial = sum(p(rows, counts, output_bias=False) for p in pieces)
    torch.testing.assert_close(pieces[0].add_output_bias(partial, counts), whole(rows, counts))
    assert pieces[0].last_rows == 20


def test_etp_must_divide_d_ffn():
    with pytest.raises(ValueError, match="d_ffn=16 is not divisible by the expert-tensor-parallel size etp=3"):
        Experts(2, D, F, etp_rank=0, etp_size=3)
