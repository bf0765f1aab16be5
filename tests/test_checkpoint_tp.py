"""Tensor-parallel pieces in checkpoints: stored at their global offsets, so tp=2 <-> tp=1 reloads exactly.

The oracle is a set of known FULL tensors (parameters and AdamW exp_avg / exp_avg_sq,
drawn from fixed seeds): a tensor-parallel rank holds ``take_piece(full, shard)`` of
each, a one-process model holds them whole. AdamW takes one real step first (so its
state is the one it creates, ``step`` = 1); the state is then overwritten with the
known tensors, so every comparison below is exact.

The toy model has a dim-0 piece (``col``), a dim-1 piece (``row.weight``), a padded
vocabulary with an odd length (``embed``: 7 rows, 4 per rank at tp=2, one padding
row on rank 1), an ``Experts`` stack whose w1 / w2 / b1 are etp pieces (SwiGLU) and
replicated parameters (``norm``, ``row.bias``, ``experts.b2``).
"""
from __future__ import annotations

import zlib

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from moe.experts import Experts
from moe.trainer import checkpoint as ckpt
from parallel.grads import mark_expert_params
from parallel.shards import TensorShard, mark_shard, shard_of, take_piece
from tests.helpers.distributed import run_distributed

# V vocabulary (odd: padded at tp=2), D width, D_IN -> D_OUT the col layer, E experts of width F
V, D, D_OUT, D_IN, E, F = 7, 4, 6, 5, 4, 4
SENTINEL = -7.0
# parameter -> (dim, group) of its tensor-parallel split; the rest is replicated
SPLIT = {"col.weight": (0, "tp"), "col.bias": (0, "tp"), "row.weight": (1, "tp"), "embed.weight": (0, "tp"),
         "experts.w1": (2, "etp"), "experts.w2": (1, "etp"), "experts.b1": (1, "etp")}
ONE = {"tp": 1, "tp_rank": 0, "etp": 1, "etp_rank": 0, "ep": 1, "ep_rank": 0}


class TPToy(nn.Module):
    def __init__(self, layout, vocab=V):
        super().__init__()
        tp, etp, ep = layout["tp"], layout["etp"], layout["ep"]
        self.col = nn.Linear(D_IN, D_OUT // tp)
        self.row = nn.Linear(D_OUT // tp, D_IN)
        self.embed = nn.Embedding(-(-vocab // tp), D)
        self.norm = nn.Parameter(torch.ones(D))
        self.experts = Experts(E // ep, D, F // etp, "swiglu", first_expert=layout["ep_rank"] * (E // ep), bias=True)
        mark_expert_params(self.experts, ep)


def _known(name, shape, what):
    g = torch.Generator().manual_seed(zlib.crc32(f"{what}:{name}".encode()))
    t = torch.randn(shape, generator=g)
    return t.abs() if what == "exp_avg_sq" else t


FULL_MODEL = TPToy(ONE)
SHAPES = {n: tuple(p.shape) for n, p in FULL_MODEL.named_parameters()}
FULL = {what: {n: _known(n, s, what) for n, s in SHAPES.items()} for what in ("param", "exp_avg", "exp_avg_sq")}


def _shard(name, layout):
    if name not in SPLIT:
        return None
    dim, group = SPLIT[name]
    size = layout[group]
    if size == 1:
        return None
    return TensorShard(dim, layout[f"{group}_rank"], size, group, SHAPES[name][dim])


def _piece(name, full, layout):
    """This layout's piece of the global tensor ``full`` of parameter ``name`` (padding rows zero)."""
    if name.startswith("experts."):
        e_l = E // layout["ep"]
        full = full.narrow(0, layout["ep_rank"] * e_l, e_l)
    return take_piece(full, _shard(name, layout))


def _real(name, t, layout):
    """The real (non-padding) part of a piece."""
    shard = _shard(name, layout)
    return t if shard is None else t.narrow(shard.dim, 0, shard.real_len(t.shape[shard.dim]))


@torch.no_grad()
def build(layout, *, known=True):
    """The toy at ``layout`` with the known tensors (or SENTINEL everywhere) and AdamW after one step."""
    model = TPToy(layout)
    for name, p in model.named_parameters():
        shard = _shard(name, layout)
        if shard is not None:
            mark_shard(p, dim=shard.dim, rank=shard.rank, size=shard.size, group=shard.group,
                       global_len=shard.global_len)
        p.copy_(_piece(name, FULL["param"][name], layout) if known else torch.full_like(p, SENTINEL))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    if not known:
        return model, opt  # a fresh optimizer: no state until a load creates it
    for name, p in model.named_parameters():
        p.grad = _piece(name, torch.ones(SHAPES[name]), layout)
    opt.step()
    for name, p in model.named_parameters():
        p.copy_(_piece(name, FULL["param"][name], layout))
        for what in ("exp_avg", "exp_avg_sq"):
            opt.state[p][what].copy_(_piece(name, FULL[what][name], layout))
    return model, opt


def _layout(groups):
    d = groups.dims
    return {"tp": d.tp, "tp_rank": groups.tp_rank, "etp": d.etp, "etp_rank": groups.etp_rank,
            "ep": d.ep, "ep_rank": groups.ep_rank}


def _assert_full(model, opt):
    """``model`` / ``opt`` (one process, no pieces) hold exactly the known full tensors."""
    for name, p in model.named_parameters():
        assert torch.equal(p, FULL["param"][name]), name
        st = opt.state[p]
        assert float(st["step"]) == 1.0, name
        for what in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[what], FULL[what][name]), (name, what)


def _stored(path):
    return dcp.FileSystemReader(path).read_metadata()


# --------------------------------------------------------------------------------------
def _save_tp2(rank, world, root):
    from parallel.dims import ParallelDims

    groups = ParallelDims(world_size=2, dp=1, tp=2, etp=2).build()
    layout = _layout(groups)
    model, opt = build(layout)
    assert model.embed.weight.shape == (4, D) and shard_of(model.experts.w1).group == "etp"
    return ckpt.save_checkpoint(root, 1, model, opt, groups=groups)


@pytest.mark.distributed
def test_saved_at_tp2_loads_whole_in_one_process(tmp_path):
    path = run_distributed(_save_tp2, 2, str(tmp_path / "ck"), timeout=60)[0]
    md = _stored(path)
    # global shapes; pieces as chunks at their offsets; the padding row is not stored
    emb = md.state_dict_metadata["model.embed.weight"]
    assert tuple(emb.size) == (V, D)
    assert sorted((tuple(c.offsets), tuple(c.sizes)) for c in emb.chunks) == [((0, 0), (4, D)), ((4, 0), (3, D))]
    row = md.state_dict_metadata["optim.row.weight.exp_avg"]
    assert sorted(tuple(c.offsets) for c in row.chunks) == [(0, 0), (0, D_OUT // 2)] and tuple(row.size) == (D_IN, D_OUT)
    w1 = md.state_dict_metadata["model.experts.w1.expert_3"]
    assert tuple(w1.size) == (D, 2 * F) and sorted(tuple(c.offsets) for c in w1.chunks) == [(0, 0), (0, F)]

    model, opt = build(ONE, known=False)
    assert ckpt.load_checkpoint(path, model, opt) == 1  # no groups: nothing is split here
    _assert_full(model, opt)

    # shapes are compared globally: another vocabulary is a clear error
    with pytest.raises(ckpt.CheckpointError, match=r"'model.embed.weight' has shape \(7, 4\), the model has \(9, 4\)"):
        ckpt.load_checkpoint(path, TPToy(ONE, vocab=9))


def _load_tp2(rank, world, path):
    from parallel.dims import ParallelDims

    groups = ParallelDims(world_size=2, dp=1, tp=2, etp=2).build()
    layout = _layout(groups)
    model, opt = build(layout, known=False)
    step = ckpt.load_checkpoint(path, model, opt, groups=groups)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    return layout, step, params, state


@pytest.mark.distributed
def test_saved_whole_loads_into_tp2_pieces(tmp_path):
    model, opt = build(ONE)
    path = ckpt.save_checkpoint(str(tmp_path / "ck"), 1, model, opt)
    out = run_distributed(_load_tp2, 2, path, timeout=60)
    for layout, step, params, state in out:
        assert step == 1
        for name, p in params.items():
            want = _piece(name, FULL["param"][name], layout)
            assert torch.equal(_real(name, p, layout), _real(name, want, layout)), (layout, name)
            assert float(state[name]["step"]) == 1.0
            for what in ("exp_avg", "exp_avg_sq"):
                want = _piece(name, FULL[what][name], layout)
                assert torch.equal(_real(name, state[name][what], layout), _real(name, want, layout)), (name, what)
    # the padding row (rank 1's last embedding row) was not touched by the load
    (_, _, p0, s0), (_, _, p1, s1) = out
    assert bool((p1["embed.weight"][3] == SENTINEL).all()) and bool((s1["embed.weight"]["exp_avg"][3] == 0).all())
    assert p0["embed.weight"].shape == p1["embed.weight"].shape == (4, D)
    assert p0["experts.w1"].shape == (E, D, F)  # SwiGLU: 2F / etp columns


def _save_dp2_tp2(rank, world, root):
    from parallel.dims import ParallelDims

    paths = []
    for name, ep in (("edp2", 1), ("ep2", 2)):
        groups = ParallelDims(world_size=4, dp=2, tp=2, ep=ep, etp=2).build()
        model, opt = build(_layout(groups))
        paths.append(ckpt.save_checkpoint(f"{root}/{name}", 1, model, opt, groups=groups))
    return paths


@pytest.mark.distributed
def test_dp2_tp2_replicas_are_stored_once(tmp_path):
    """World 4 = dp 2 x tp 2, etp 2 with ep 1 (experts on 2 replicas) and ep 2 (experts split)."""
    paths = run_distributed(_save_dp2_tp2, 4, str(tmp_path), timeout=90)[0]
    for path in paths:
        md = _stored(path)
        per_key = {}
        for index in md.storage_data:
            per_key.setdefault(index.fqn, []).append(tuple(index.offset))
        # one stored chunk per piece: the dp (or edp) replicas were deduplicated
        assert sorted(per_key["model.col.weight"]) == [(0, 0), (D_OUT // 2, 0)], path
        assert sorted(per_key["optim.experts.w2.expert_1.exp_avg_sq"]) == [(0, 0), (F // 2, 0)], path
        assert per_key["model.norm"] == [(0,)] and per_key["optim.norm.step"] == [()], path
        model, opt = build(ONE, known=False)
        assert ckpt.load_checkpoint(path, model, opt) == 1
        _assert_full(model, opt)


def test_piece_without_groups_is_a_clear_error(tmp_path):
    model, opt = build({**ONE, "tp": 2, "tp_rank": 1})
    with pytest.raises(ckpt.CheckpointError, match=r"'col.weight' is a tensor-parallel piece .* pass groups="):
        ckpt.full_state_dict(model, opt, 1)
    with pytest.raises(ckpt.CheckpointError, match="pass groups="):
        ckpt.save_checkpoint(str(tmp_path / "ck"), 1, model, opt)
