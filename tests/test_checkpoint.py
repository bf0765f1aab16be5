"""DCP checkpoints: global expert keys, resume == uninterrupted, resharded load, atomic saves."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

from moe.tasks import build_task
from moe.trainer import checkpoint as ckpt
from moe.trainer.loop import run
from tests.helpers.distributed import run_distributed
from tests.helpers.toy import ToyTask, toy_config, trainer_in_group


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _stored_keys(path):
    return set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)


# --------------------------------------------------------------------------------------
def test_state_dict_splits_experts_by_global_index():
    task = ToyTask({"num_experts": 4}, {})
    sd = ckpt.model_state_dict(task.model)
    assert {f"moe.experts.w1.expert_{e}" for e in range(4)} <= set(sd)
    assert "moe.experts.w1" not in sd and {"inp.weight", "moe.router.weight", "out.bias"} <= set(sd)
    assert torch.equal(sd["moe.experts.w2.expert_3"], task.model.moe.experts.w2[3])
    # views: writing into the state dict writes the parameter (in-place load)
    sd["moe.experts.w1.expert_1"].fill_(7.0)
    assert bool((task.model.moe.experts.w1[1] == 7.0).all())


def test_resume_equals_uninterrupted_single_process(tmp_path):
    full = run(toy_config(tmp_path / "full", train={"steps": 6, "checkpoint_every": 0, "eval_every": 0}),
               log=lambda m: None)
    half = run(toy_config(tmp_path / "split", train={"steps": 3, "checkpoint_every": 0, "eval_every": 0}),
               log=lambda m: None)
    rest = run(toy_config(tmp_path / "split", train={"steps": 6, "checkpoint_every": 0, "eval_every": 0,
                                                     "resume": "auto"}), log=lambda m: None)
    assert half.losses + rest.losses == full.losses
    assert rest.final_metrics == full.final_metrics
    a = ckpt.resolve_checkpoint(str(tmp_path / "full" / "checkpoints"))
    b = ckpt.resolve_checkpoint(str(tmp_path / "split" / "checkpoints"))
    assert a.endswith("step_00000006") and b.endswith("step_00000006")
    # parameters and optimizer state are identical too
    ta, tb = ToyTask({"num_experts": 4}, {}), ToyTask({"num_experts": 4}, {})
    from moe.trainer.optim import build_optimizer
    cfg = toy_config("unused").optim
    oa, ob = build_optimizer(ta.model, cfg), build_optimizer(tb.model, cfg)
    assert ckpt.load_checkpoint(a, ta.model, oa) == 6 and ckpt.load_checkpoint(b, tb.model, ob) == 6
    for (n, p), q in zip(ta.model.named_parameters(), tb.model.parameters()):
        assert torch.equal(p, q), n
        assert torch.equal(oa.state[p]["exp_avg_sq"], ob.state[q]["exp_avg_sq"]), n
        assert float(oa.state[p]["step"]) == 6.0


def _resume_ep2(rank, world, out_dir):
    def fit(name, steps, resume):
        cfg = toy_config(os.path.join(out_dir, name), parallel={"ep": 2},
                         train={"steps": steps, "checkpoint_every": 0, "eval_every": 0, "resume": resume})
        trainer = trainer_in_group(cfg)
        return trainer.fit().losses, _params(trainer.model)

    full, full_params = fit("full", 4, None)
    half, _ = fit("split", 2, None)
    rest, rest_params = fit("split", 4, "auto")
    return full, half, rest, full_params, rest_params


@pytest.mark.distributed
def test_resume_equals_uninterrupted_expert_parallel(tmp_path):
    for full, half, rest, full_params, rest_params in run_distributed(_resume_ep2, 2, str(tmp_path), timeout=120):
        assert len(full) == 4 and half + rest == full
        for n, p in full_params.items():
            assert torch.equal(p, rest_params[n]), n


def _train_ep2_and_eval(rank, world, out_dir):
    cfg = toy_config(out_dir, parallel={"ep": 2}, train={"steps": 3, "checkpoint_every": 0, "eval_every": 0})
    trainer = trainer_in_group(cfg)
    result = trainer.fit()
    keys = set(ckpt.model_state_dict(trainer.model))
    return {"metrics": result.final_metrics, "ckpt": result.checkpoint, "keys": keys}


@pytest.mark.distributed
def test_resharded_load_ep2_to_ep1_gives_same_eval(tmp_path):
    out = run_distributed(_train_ep2_and_eval, 2, str(tmp_path / "ep2"), timeout=120)
    # each EP rank declares only its own experts' keys; the checkpoint holds all of them
    assert "moe.experts.w1.expert_0" in out[0]["keys"] and "moe.experts.w1.expert_2" not in out[0]["keys"]
    assert "moe.experts.w1.expert_2" in out[1]["keys"] and "moe.experts.w1.expert_1" not in out[1]["keys"]
    path = out[0]["ckpt"]
    assert {f"model.moe.experts.w2.expert_{e}" for e in range(4)} <= _stored_keys(path)
    assert "optim.moe.experts.w1.expert_3.exp_avg" in _stored_keys(path)
    # load in this single process at ep=1: all four experts in one stack
    task = ToyTask({"num_experts": 4}, {})
    assert ckpt.load_checkpoint(path, task.model) == 3
    task.model.eval()
    with torch.no_grad():
        metrics = task.evaluate()
    assert metrics["val_loss"] == pytest.approx(out[0]["metrics"]["val_loss"], rel=1e-5, abs=1e-7)


def _load_ep1_into_ep2(rank, world, path):
    cfg = toy_config(os.path.dirname(os.path.dirname(path)) + f"/ep2_{rank}", parallel={"ep": 2})
    trainer = trainer_in_group(cfg)
    assert ckpt.load_checkpoint(path, trainer.model, trainer.optimizer) == 3
    trainer.model.eval()
    with torch.no_grad():
        return trainer.task.evaluate()["val_loss"], trainer.model.moe.experts.w1.detach().clone()


@pytest.mark.distributed
def test_resharded_load_ep1_to_ep2(tmp_path):
    result = run(toy_config(tmp_path / "ep1", train={"steps": 3, "checkpoint_every": 0, "eval_every": 0}),
                 log=lambda m: None)
    task = ToyTask({"num_experts": 4}, {})
    ckpt.load_checkpoint(result.checkpoint, task.model)
    out = run_distributed(_load_ep1_into_ep2, 2, result.checkpoint, timeout=120)
    for rank, (val, w1) in enumerate(out):
        assert val == pytest.approx(result.final_metrics["val_loss"], rel=1e-5, abs=1e-7)
        assert torch.equal(w1, task.model.moe.experts.w1[2 * rank: 2 * rank + 2])


def test_atomic_save_latest_pointer_and_keep(tmp_path):
    task = ToyTask({"num_experts": 4}, {})
    root = str(tmp_path / "ck")
    # a half-written save from a crash: ignored, and cleaned up by the next save of that step
    os.makedirs(os.path.join(root, "step_00000002.tmp"))
    assert ckpt.latest_checkpoint(root) is None and ckpt.list_checkpoints(root) == []
    for step in (1, 2, 3):
        path = ckpt.save_checkpoint(root, step, task.model, keep=2, meta={"note": "x"})
    assert path.endswith("step_00000003") and ckpt.latest_checkpoint(root) == path
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(root)] == ["step_00000002", "step_00000003"]
    assert not os.path.exists(os.path.join(root, "step_00000002.tmp"))
    assert os.path.isfile(os.path.join(path, "trainer.json"))
    # saving the same step again replaces it
    assert ckpt.save_checkpoint(root, 3, task.model) == path and ckpt.latest_checkpoint(root) == path


def test_mismatched_model_gives_clear_error(tmp_path):
    small = ToyTask({"num_experts": 4}, {})
    path = ckpt.save_checkpoint(str(tmp_path / "ck"), 1, small.model)
    big = ToyTask({"num_experts": 8}, {})
    with pytest.raises(ckpt.CheckpointError, match=r"lacks .* key\(s\).*expert_4.*fewer experts"):
        ckpt.load_checkpoint(path, big.model)
    with pytest.raises(ckpt.CheckpointError, match="neither a checkpoint directory"):
        ckpt.load_checkpoint(str(tmp_path / "nothing"), small.model)


def test_checkpoint_of_an_older_tensor_layout_is_refused(tmp_path):
    """Before layout version 2 qkv was (q, k, v) blocks: such a checkpoint would load silently wrong."""
    task = ToyTask({"num_experts": 4}, {})
    path = ckpt.save_checkpoint(str(tmp_path / "ck"), 1, task.model)
    info_path = os.path.join(path, "trainer.json")
    with open(info_path) as f:
        info = json.load(f)
    assert info["layout_version"] == ckpt.LAYOUT_VERSION == 2
    assert ckpt.load_checkpoint(path, task.model) == 1
    del info["layout_version"]  # what older code wrote
    with open(info_path, "w") as f:
        json.dump(info, f)
    with pytest.raises(ckpt.CheckpointError, match="layout version 1, this code reads version 2"):
        ckpt.load_checkpoint(path, task.model)


# --------------------------------------------------------------------------------------
# The same with a real task (the byte-level Switch LM), where moe.tasks is present.
def _lm_config(out_dir, ep, steps):
    from moe.trainer.config import from_dict

    return from_dict({
        "task": "lm", "model": {"preset": "tiny_switch", "n_layers": 2, "max_seq_len": 64},
        "data": {"max_bytes": 100_000, "eval_batches": 2, "eval_batch_size": 4},
        "parallel": {"ep": ep}, "optim": {"lr": 3e-3, "warmup_steps": 0},
        "train": {"steps": steps, "global_batch_size": 8, "micro_batch_size": 4, "log_every": 1, "out_dir": str(out_dir)},
        "telemetry": {"tensorboard": False, "plots": False},
    })


def _lm_ep2(rank, world, out_dir):
    trainer = trainer_in_group(_lm_config(out_dir, 2, 2))
    result = trainer.fit()
    return result.final_metrics, result.checkpoint


@pytest.mark.distributed
def test_real_lm_task_reshards_ep2_to_ep1(tmp_path):
    out = run_distributed(_lm_ep2, 2, str(tmp_path / "ep2"), timeout=180)
    (metrics, path), (metrics1, _) = out
    assert metrics == metrics1

    cfg = _lm_config(tmp_path / "ep1", 1, 2)
    task = build_task("lm", cfg.model, cfg.data)
    assert ckpt.load_checkpoint(path, task.model) == 2
    task.model.eval()
    with torch.no_grad():
        again = task.evaluate()
    assert again["val_loss"] == pytest.approx(metrics["val_loss"], rel=1e-5)
