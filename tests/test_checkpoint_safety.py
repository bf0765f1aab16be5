"""Checkpoint safety: manifest checksums, damaged and truncated files named, a missing ``latest``,
``resume: auto`` past a damaged checkpoint, shape mismatches named by config key, a fresh run
refused in a used out_dir, pruning only this run's checkpoints, a resume past ``train.steps``.

The oracles: sha256 computed here with hashlib, the bytes this test changed, and the losses of
an uninterrupted run of the same config (training is a function of (config, step)).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from moe.trainer import checkpoint as ckpt
from moe.trainer.config import from_dict
from moe.trainer.loop import run
from tests.helpers.distributed import run_distributed
from tests.helpers.layout import TINY_LM
from tests.helpers.toy import ToyTask, toy_config, trainer_in_group

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD = "__0_0.distcp"  # DCP's data file of rank 0


def _train(out_dir, lines=None, **train):
    """The toy task, 1 process: steps 4 with a checkpoint every 2 unless ``train`` says otherwise.
    A constant learning rate, so that a step does not depend on ``train.steps``."""
    cfg = toy_config(out_dir, optim={"schedule": "constant"},
                     train={"steps": 4, "checkpoint_every": 2, "eval_every": 0, **train})
    return run(cfg, log=(lines.append if lines is not None else lambda m: None))


def _damage(path, offset=200, count=16):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * count)


def _files(directory):
    """Every file under ``directory`` with its bytes."""
    out = {}
    for where, _, names in os.walk(directory):
        for n in names:
            p = os.path.join(where, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, directory)] = f.read()
    return out


@pytest.fixture(scope="module")
def full_losses(tmp_path_factory):
    """The oracle: losses of the uninterrupted 6-step toy run."""
    return _train(tmp_path_factory.mktemp("full"), steps=6, checkpoint_every=0).losses


# --------------------------------------------------------------------------------------
def test_manifest_holds_every_files_sha256_and_a_changed_shard_is_named(tmp_path):
    task = ToyTask({"num_experts": 4}, {})
    path = ckpt.save_checkpoint(str(tmp_path / "ck"), 1, task.model)
    with open(os.path.join(path, ckpt.MANIFEST)) as f:
        files = json.load(f)["files"]
    on_disk = _files(path)
    assert set(files) == set(on_disk) - {ckpt.MANIFEST} == {".metadata", SHARD, "trainer.json"}
    for name, data in on_disk.items():
        if name != ckpt.MANIFEST:
            assert files[name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert ckpt.verify_checkpoint(path) is True

    _damage(os.path.join(path, SHARD))
    other = ToyTask({"num_experts": 4}, {})
    before = {n: p.detach().clone() for n, p in other.model.named_parameters()}
    with pytest.raises(ckpt.CorruptCheckpointError,
                       match=rf"checkpoint file {path}/{SHARD} is damaged: its sha256 .* changed after the save"):
        ckpt.load_checkpoint(path, other.model)
    for n, p in other.model.named_parameters():  # refused before anything was loaded
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("name", [SHARD, ".metadata"])
def test_a_truncated_file_is_named_with_its_sizes(tmp_path, name):
    task = ToyTask({"num_experts": 4}, {})
    path = ckpt.save_checkpoint(str(tmp_path / "ck"), 1, task.model)
    target = os.path.join(path, name)
    size = os.path.getsize(target)
    with open(target, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ckpt.CorruptCheckpointError,
                       match=rf"checkpoint file {target} is truncated: {size // 2} bytes, the manifest says {size}"):
        ckpt.load_checkpoint(path, task.model)


def test_missing_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path, full_losses):
    first = _train(tmp_path / "run")
    root = str(tmp_path / "run" / "checkpoints")
    os.remove(os.path.join(root, ckpt.LATEST))
    assert ckpt.latest_checkpoint(root) == first.checkpoint
    with open(os.path.join(root, ckpt.LATEST), "w") as f:  # names a checkpoint that is gone
        f.write("step_00000009\n")
    assert ckpt.latest_checkpoint(root) == first.checkpoint
    # a crash while replacing step 4 by a save of the same step: step 4 renamed aside, no step 4
    os.rename(first.checkpoint, first.checkpoint + ".old")
    assert ckpt.latest_checkpoint(root) == os.path.join(root, "step_00000002")
    os.rename(first.checkpoint + ".old", first.checkpoint)
    os.remove(os.path.join(root, ckpt.LATEST))

    lines = []
    rest = _train(tmp_path / "run", lines, steps=6, resume="auto")
    assert f"resume=auto: {root} has no 'latest' pointer; using the newest complete checkpoint" in lines
    assert f"resumed from {first.checkpoint} at step 4" in lines
    assert first.losses + rest.losses == full_losses
    # the resumed run continues the same run: same run id
    ids = {ckpt.checkpoint_info(p)["run_id"] for p in ckpt.list_checkpoints(root)}
    assert len(ids) == 1 and None not in ids


def test_resume_auto_skips_a_damaged_checkpoint_for_the_previous_one(tmp_path, full_losses):
    first = _train(tmp_path / "run")
    root = str(tmp_path / "run" / "checkpoints")
    _damage(os.path.join(first.checkpoint, SHARD))
    lines = []
    rest = _train(tmp_path / "run", lines, steps=6, resume="auto")
    skipped = [line for line in lines if line.startswith("resume=auto: skipping damaged checkpoint")]
    assert len(skipped) == 1 and first.checkpoint in skipped[0] and f"{first.checkpoint}/{SHARD} is damaged" \
        in skipped[0], lines
    previous = os.path.join(root, "step_00000002")
    assert f"resumed from {previous} at step 2" in lines
    assert first.losses[:2] + rest.losses == full_losses
    assert ckpt.verify_checkpoint(first.checkpoint) is True  # this run saved step 4 again, intact

    # nothing intact left: an error naming each damaged checkpoint, not a silent fresh start
    for step in (2, 4, 6):
        _damage(os.path.join(root, f"step_{step:08d}", SHARD))
    with pytest.raises(ckpt.CheckpointError, match=r"every checkpoint under .* is damaged \(step_00000006: "):
        _train(tmp_path / "run", steps=8, resume="auto")


def test_a_fresh_run_in_a_used_out_dir_is_refused_until_overwrite(tmp_path):
    out = tmp_path / "run"
    first = _train(out)
    first_run = ckpt.checkpoint_info(first.checkpoint)["run_id"]
    before = _files(out)
    with pytest.raises(ckpt.CheckpointError) as e:
        _train(out, steps=2)
    msg = str(e.value)
    assert f"train.out_dir {out} already holds checkpoints of an earlier run (step_00000002, step_00000004" in msg
    for way in ("train.resume: auto", "a fresh train.out_dir", "train.overwrite: true"):
        assert way in msg
    assert _files(out) == before  # nothing written, nothing deleted

    # the command line: one line and exit status 3
    cfg_path = tmp_path / "toy.yaml"
    cfg_path.write_text(toy_config(out, train={"steps": 2}).to_yaml())
    proc = subprocess.run([sys.executable, "-m", "moe.train", "--config", str(cfg_path)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("checkpoint error: train.out_dir ")
    assert _files(out) == before

    lines = []
    again = _train(out, lines, steps=2, overwrite=True)
    assert any(line.startswith("train.overwrite: deleted 4 path(s) this run does not continue: ") for line in lines), lines
    root = str(out / "checkpoints")
    assert ckpt.list_checkpoints(root) == [again.checkpoint] and again.checkpoint.endswith("step_00000002")
    assert ckpt.checkpoint_info(again.checkpoint)["run_id"] != first_run
    with open(out / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f if line.strip()]
    assert steps and max(steps) == 2  # only this run's rows


def test_resume_from_an_older_checkpoint_of_the_out_dir_is_refused(tmp_path):
    _train(tmp_path / "run")
    older = str(tmp_path / "run" / "checkpoints" / "step_00000002")
    with pytest.raises(ckpt.CheckpointError, match=r"continues from step 2, but .* also holds later checkpoints "
                                                   r"\(step_00000004\).*train.overwrite: true"):
        _train(tmp_path / "run", resume=older)


def test_keep_prunes_only_this_runs_checkpoints_and_never_replaces_anothers(tmp_path):
    root = str(tmp_path / "ck")
    task = ToyTask({"num_experts": 4}, {})
    theirs = ckpt.save_checkpoint(root, 1, task.model, run_id="theirs")
    for step in (2, 3, 4):
        ckpt.save_checkpoint(root, step, task.model, keep=2, run_id="mine")
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(root)] == [
        "step_00000001", "step_00000003", "step_00000004"]
    assert ckpt.verify_checkpoint(theirs) is True
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000001 already holds a checkpoint of step 1 written by "
                                                   r"another run \(run id 'theirs'"):
        ckpt.save_checkpoint(root, 1, task.model, run_id="mine")
    assert ckpt.checkpoint_info(theirs)["run_id"] == "theirs" and ckpt.verify_checkpoint(theirs) is True


def _lm(out_dir, n_layers, **train):
    raw = copy.deepcopy(TINY_LM)
    raw["model"]["n_layers"] = n_layers
    raw["train"].update({"steps": 1, "global_batch_size": 2, "micro_batch_size": 2, "out_dir": str(out_dir),
                         **train})
    raw["telemetry"] = {"tensorboard": False, "plots": False, "progress_bar": False, "gpu_stats": False}
    return from_dict(raw)


def test_a_checkpoint_of_another_shape_is_refused_naming_the_config_keys(tmp_path):
    deep = run(_lm(tmp_path / "deep", 4), log=lambda m: None)
    with pytest.raises(ckpt.CheckpointError) as e:
        run(_lm(tmp_path / "shallow", 2, resume=deep.checkpoint), log=lambda m: None)
    msg = str(e.value)
    assert "holds 30 key(s) this model lacks, e.g. ['model.transformer.blocks.2." in msg
    assert "Its saved config differs in model.n_layers (saved 4, now 2)" in msg and "experts" not in msg

    # experts are what differs: then (only then) the hint about experts
    four = _train(tmp_path / "e4", steps=2, checkpoint_every=0)
    with pytest.raises(ckpt.CheckpointError) as e:
        run(toy_config(tmp_path / "e8", model={"num_experts": 8}, train={"resume": four.checkpoint}),
            log=lambda m: None)
    msg = str(e.value)
    # experts 4..7 of w1 and w2, each with the model's tensor and AdamW's exp_avg, exp_avg_sq, step
    assert f"lacks {4 * 2 * 4} key(s) this model needs" in msg and "model.num_experts (saved 4, now 8)" in msg
    assert "the number of experts differs" in msg

    # the same tensors under another config value: loaded, with a note naming the key
    lines = []
    run(toy_config(tmp_path / "cf", model={"capacity_factor": 2.0}, train={"resume": four.checkpoint, "steps": 3,
                                                                           "checkpoint_every": 0}),
        log=lines.append)
    assert f"resumed from {four.checkpoint} at step 2" in lines
    assert any(line.startswith("note: the checkpoint's model config differs in model.capacity_factor "
                               "(saved '<absent>', now 2.0)") for line in lines), lines


def test_steps_below_the_checkpoints_step_warns(tmp_path):
    first = _train(tmp_path / "run")
    lines = []
    again = _train(tmp_path / "run", lines, steps=2, resume="auto")
    assert "warning: train.steps=2 is below the checkpoint's step 4: nothing is trained, the run only evaluates " \
           "the model as saved at step 4" in lines
    assert again.step == 4 and again.losses == [] and again.checkpoint == first.checkpoint


# --------------------------------------------------------------------------------------
def _two_ranks(rank, world, root):
    """ep=2: the manifest holds both ranks' files; a damaged file of rank 1 and keys only rank 1
    lacks stop both ranks with the same error (none waits in a collective)."""
    import torch.distributed as dist

    trainer = trainer_in_group(toy_config(root, parallel={"ep": 2}))
    path = ckpt.save_checkpoint(os.path.join(root, "ck"), 1, trainer.model, trainer.optimizer)
    with open(os.path.join(path, ckpt.MANIFEST)) as f:
        listed = sorted(json.load(f)["files"])
    errors = []
    big = trainer_in_group(toy_config(root, model={"num_experts": 8}, parallel={"ep": 2}))
    try:  # rank 0 holds experts 0-3 (stored), rank 1 experts 4-7 (not stored)
        ckpt.load_checkpoint(path, big.model)
    except ckpt.CheckpointError as e:
        errors.append(str(e))
    dist.barrier()
    if rank == 0:
        _damage(os.path.join(path, "__1_0.distcp"))
    dist.barrier()
    try:
        ckpt.load_checkpoint(path, trainer.model, trainer.optimizer)
    except ckpt.CorruptCheckpointError as e:
        errors.append(str(e))
    return listed, sorted(os.listdir(path)), errors


@pytest.mark.distributed
def test_two_ranks_share_one_manifest_and_stop_together(tmp_path):
    out = run_distributed(_two_ranks, 2, str(tmp_path), timeout=120)
    (listed, on_disk, errors0), (_, _, errors1) = out
    assert listed == sorted(set(on_disk) - {ckpt.MANIFEST}) == [".metadata", "__0_0.distcp", "__1_0.distcp",
                                                                "trainer.json"]
    assert errors0 == errors1 and len(errors0) == 2
    # rank 1's experts 4..7 of w1 and w2 (a model-only load); rank 0's are all stored
    assert f"lacks {4 * 2} key(s) this model needs, e.g. ['model.moe.experts.w1.expert_4'" in errors0[0]
    assert "'model.moe.router.weight' has shape (4, 16), the model has (8, 16)" in errors0[0]
    assert "__1_0.distcp is damaged" in errors0[1]
