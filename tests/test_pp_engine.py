"""The pipeline engine's MoE aux-loss path (``parallel.pipeline``): ``AttachAux`` and the router gradients.

An aux loss is no stage's output: ``AttachAux`` ties it to the activation a stage sends on.
With a balancing loss as the ONLY objective (the task loss multiplied by 0), every router of
every stage must receive the gradient one process computes (gradient accumulation over the
same micro-batches), under 1F1B and interleaved 1F1B; without the attachment the routers of
the earlier stages would get none.
"""
from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.layout import TINY_LM, relative_error

pytestmark = pytest.mark.distributed


def test_attach_aux_is_identity_and_gives_the_aux_loss_gradient_one():
    """Forward returns x; backward passes x's gradient through and d(aux)/dw as if aux were added to the loss."""
    from parallel.pipeline import AttachAux

    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(4, requires_grad=True)
    aux = (w ** 2).sum() * 0.5
    y = AttachAux.apply(x, aux)
    assert torch.equal(y, x)
    (y * 2.0).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))
    assert torch.allclose(w.grad, w.detach())  # d/dw of 0.5 |w|^2, the aux loss's own gradient


def _aux_only_grads(rank, world, overrides):
    from moe.trainer.config import apply_overrides, from_dict
    from moe.trainer.loop import Trainer
    from parallel.dims import ParallelDims

    raw = copy.deepcopy(TINY_LM)
    raw["model"].update({"n_layers": 4, "moe_every": 1})  # every block MoE: two routers on each stage
    raw["train"]["out_dir"] = f"/tmp/pp_aux_{world}_{rank}"
    raw["telemetry"] = {"tensorboard": False, "plots": False, "progress_bar": False, "gpu_stats": False}
    cfg = from_dict(apply_overrides(raw, overrides))
    groups = ParallelDims.from_world(world, pp=cfg.parallel.pp).build()
    trainer = Trainer(cfg, groups=groups)
    task = trainer.task
    plain = task.output_loss
    task.output_loss = lambda outputs, batch: (plain(outputs, batch)[0] * 0.0, {})  # only the aux losses remain
    logs = trainer._forward_backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return grads, logs


@pytest.mark.parametrize("overrides", [
    ["parallel.pp=2"],
    ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.virtual_stages=2"],
], ids=["1f1b", "interleaved"])
def test_router_gradients_of_every_stage_equal_one_process_with_only_the_aux_loss(overrides):
    (single, single_logs), = run_distributed(_aux_only_grads, 1, [])
    stages = run_distributed(_aux_only_grads, 2, overrides)
    routers = [n for n in single if n.endswith("router.weight")]
    assert len(routers) == 4
    seen = set()
    for rank, (grads, logs) in enumerate(stages):
        assert [round(m["loss"], 6) for m in logs] == [round(m["loss"], 6) for m in single_logs]
        for name, g in grads.items():
            ref = single[name]
            assert relative_error(g, ref) <= 1e-5, f"rank {rank}: {name}"
            if name in routers:
                assert float(ref.norm()) > 0, name  # the aux loss really drives this router
                seen.add(name)
    assert seen == set(routers)  # every router lives on some stage and was checked
