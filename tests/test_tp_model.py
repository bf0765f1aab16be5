"""Tensor-parallel models (megatron-core layers over our tp group) against the one-process model.

Each rank builds the model at tp=2 (optionally with sequence parallelism) from the same
seed, runs one forward/backward on the same batch and reduces the gradients as the
trainer does (``parallel.grads``). The oracle is the one-process model of the same
config: the loss must be equal, and every parameter's gradient, with the tensor-parallel
pieces cut from the oracle's by the test itself, must match.
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.distributed

LM_DENSE = {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ffn": 48, "max_seq_len": 16, "vocab_size": 37,
            "moe_every": 0}


def _lm_config(swiglu: bool, tie: bool):
    from moe.models.lm import LMConfig

    d = dict(LM_DENSE, activation="swiglu" if swiglu else "gelu", tie_embeddings=tie)
    return LMConfig.from_dict(d)


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 37, (4, 17), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _lm_step(model, ids, targets):
    logits, aux = model(ids)
    loss = model.loss(logits, targets)
    loss.backward()
    return float(loss.detach())


def _limoe(tp=None):
    from moe.models.limoe import LIMoEConfig, LIMoEModel

    cfg = LIMoEConfig.from_dict({"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ffn": 48, "moe_every": 0,
                                 "image_size": 8, "patch_size": 4, "text_length": 6, "embed_dim": 16})
    return LIMoEModel(cfg, tp=tp)


def _limoe_step(model):
    g = torch.Generator().manual_seed(4)
    images = torch.randn(3, 3, 8, 8, generator=g)
    tokens = torch.randint(0, 200, (3, 6), generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    u, v, _ = model(images, tokens, mask)
    loss = model.contrastive_loss(u, v)
    loss.backward()
    return float(loss.detach())


def _piece(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    from parallel.shards import shard_of, take_piece

    return take_piece(full, shard_of(p))


CASES = [(False, True, False), (True, False, False), (False, True, True), (True, True, True)]  # swiglu, tie, sp


def _tp_lm(rank, world):
    from moe.models.lm import LanguageModel
    from parallel.dims import ParallelDims
    from parallel.grads import allreduce_gradients
    from parallel.shards import shard_of
    from parallel.tensor import TensorParallel, clear_megatron_state

    out = []
    for swiglu, tie, sp in CASES:
        groups = ParallelDims(world_size=world, dp=1, tp=world, sequence_parallel=sp).build()
        model = LanguageModel(_lm_config(swiglu, tie), tp=TensorParallel.from_groups(groups))
        ids, targets = _batch()
        loss = _lm_step(model, ids, targets)
        allreduce_gradients(model, groups)
        out.append((loss, {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}))
    # LIMoE's shared tower (dense blocks) under tp
    groups = ParallelDims(world_size=world, dp=1, tp=world).build()
    limoe = _limoe(TensorParallel.from_groups(groups))
    loss = _limoe_step(limoe)
    allreduce_gradients(limoe, groups)
    out.append((loss, {n: (p.detach().clone(), p.grad.clone()) for n, p in limoe.named_parameters()}))
    # Dropout under tp: pieces draw their own masks, replicated tensors stay identical on the tp ranks.
    # Without SP the residual stream is replicated: a rank-dependent draw leaking out of the
    # per-rank fork would make the ranks' activations, losses and norm gradients differ.
    groups = ParallelDims(world_size=world, dp=1, tp=world).build()
    torch.manual_seed(5)
    cfg = _lm_config(False, True)
    model = LanguageModel(type(cfg).from_dict({**cfg.to_dict(), "dropout": 0.2}),
                          tp=TensorParallel.from_groups(groups))
    ids, targets = _batch()
    loss = _lm_step(model, ids, targets)
    allreduce_gradients(model, groups)
    replicated = {n: p.grad.clone() for n, p in model.named_parameters() if shard_of(p) is None}
    clear_megatron_state()
    return out, (loss, replicated)


@pytest.fixture(scope="module")
def tp_lm_results():
    return run_distributed(_tp_lm, 2)  # one start-up (megatron-core import) for every case


@pytest.mark.parametrize("case", range(len(CASES) + 1),
                         ids=[f"lm-swiglu={a}-tie={b}-sp={c}" for a, b, c in CASES] + ["limoe"])
def test_tensor_parallel_lm_equals_one_process(case, tp_lm_results):
    from moe.models.lm import LanguageModel
    from parallel.shards import TensorShard, take_piece

    if case == len(CASES):
        oracle = _limoe()
        loss = _limoe_step(oracle)
    else:
        swiglu, tie, sp = CASES[case]
        oracle = LanguageModel(_lm_config(swiglu, tie))
        ids, targets = _batch()
        loss = _lm_step(oracle, ids, targets)
    full = dict(oracle.named_parameters())
    for rank, per_case in enumerate(tp_lm_results):
        tp_loss, params = per_case[0][case]
        assert tp_loss == pytest.approx(loss, rel=1e-5)
        assert params.keys() == full.keys()
        for name, (value, grad) in params.items():
            ref = full[name]
            if value.shape != ref.shape:  # a piece: cut the oracle the same way
                dim = next(d for d in range(ref.dim()) if value.shape[d] != ref.shape[d])
                shard = TensorShard(dim, rank, 2, "tp", ref.shape[dim])
                ref_value, ref_grad = take_piece(ref.detach(), shard), take_piece(ref.grad, shard)
            else:
                ref_value, ref_grad = ref.detach(), ref.grad
            torch.testing.assert_close(value, ref_value, msg=f"{name} value (rank {rank})")
            torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6, msg=f"{name} grad (rank {rank})")


def test_dropout_under_tp_keeps_replicas_identical(tp_lm_results):
    """Per-rank dropout masks on pieces; the loss and every replicated gradient equal on the tp ranks."""
    (loss0, grads0), (loss1, grads1) = (r[1] for r in tp_lm_results)
    assert loss0 == loss1
    assert grads0.keys() == grads1.keys() and "tok_embed.weight" not in grads0
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name
