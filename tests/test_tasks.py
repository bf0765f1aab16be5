"""Tasks: YAML-dict validation, deterministic per-rank batch streams, loss logs, eval, learning."""
from __future__ import annotations

import math

import pytest
import torch

from moe.tasks import Task, build_task
from tests.helpers.distributed import run_distributed
from tests.helpers.fit import fit_batch

torch.set_num_threads(1)

LIMOE_MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ffn": 32, "moe_every": 2,
               "moe": {"num_experts": 4, "router": {"policy": "topk", "top_k": 1, "capacity_factor": 1.0,
                                                    "drop_policy": "bpr", "normalize_weights": False},
                       "aux_losses": {"load_balancing": 0.01, "limoe_local": 0.01, "limoe_global": 0.01},
                       "limoe_min_experts": 2.0},
               "image_size": 16, "patch_size": 8, "text_length": 48, "embed_dim": 16}
LIMOE_DATA = {"shapes": {"image_size": 16}, "zeroshot_size": 20, "val_size": 16, "eval_batch_size": 8}
LM_MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ffn": 32, "max_seq_len": 32, "moe_every": 2,
            "moe": {"num_experts": 4, "router": {"policy": "switch", "top_k": 1, "capacity_factor": 1.25}}}
LM_DATA = {"max_bytes": 60_000, "block_size": 4096, "eval_batch_size": 4, "eval_batches": 2}


@pytest.fixture(scope="module")
def limoe_task():
    torch.manual_seed(0)
    return build_task("limoe", LIMOE_MODEL, LIMOE_DATA)


@pytest.fixture(scope="module")
def lm_task():
    torch.manual_seed(0)
    return build_task("lm", LM_MODEL, LM_DATA)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ validation

def test_tasks_registry_is_the_one_table_and_base_imports_no_task():
    import ast
    import inspect

    import moe.tasks.base as base
    from moe.tasks import TASK_NAMES, TASKS, LIMoETask, LMTask, task_class

    assert TASKS == {"lm": LMTask, "limoe": LIMoETask} and TASK_NAMES == ("lm", "limoe")
    assert all(TASKS[name].name == name for name in TASKS)
    assert task_class("lm") is LMTask
    imported = {n.module for n in ast.walk(ast.parse(inspect.getsource(base)))
                if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"lm", "limoe", "moe.tasks.lm", "moe.tasks.limoe"}, imported


def test_configs_from_dicts_validates_without_building():
    from moe.models import LMConfig
    from moe.tasks import TASKS
    from moe.tasks.lm import LMDataConfig

    model, data = TASKS["lm"].configs_from_dicts({"preset": "tiny_switch", "n_layers": 2}, {"seq_len": 64})
    assert isinstance(model, LMConfig) and model.transformer.n_layers == 2
    assert model.transformer.moe.router.policy == "switch" and isinstance(data, LMDataConfig) and data.seq_len == 64
    with pytest.raises(ValueError, match="config key 'model.moe.router.top_k': got 0; it must be >= 1"):
        TASKS["lm"].configs_from_dicts({"preset": "tiny_gshard", "moe": {"router": {"policy": "topk", "top_k": 0}}},
                                       {})
    with pytest.raises(ValueError, match="config key 'data.eval_batch_size': got 0; it must be >= 1"):
        TASKS["limoe"].configs_from_dicts({"preset": "tiny_limoe"}, {"eval_batch_size": 0})
    with pytest.raises(ValueError, match="config key 'data.prompts': got 'a red circle'"):
        TASKS["limoe"].configs_from_dicts({"preset": "tiny_limoe"}, {"source": "x.jsonl", "prompts": "a red circle"})



def test_build_task_rejects_bad_names_and_keys():
    with pytest.raises(ValueError, match="config key 'task.name': got 'vit'; allowed values: 'lm', 'limoe'"):
        build_task("vit", {}, {})
    with pytest.raises(ValueError, match=r"config key 'data.sorce' is not known; allowed keys at 'data': source"):
        build_task("lm", LM_MODEL, {"sorce": "stdlib"})
    with pytest.raises(ValueError, match=r"config key 'model.layers' is not known; allowed keys at 'model': .*n_layers"):
        build_task("lm", {**LM_MODEL, "layers": 3}, LM_DATA)
    with pytest.raises(ValueError, match=r"config key 'data.shapes.colors' is not known; allowed keys at 'data.shapes'"):
        build_task("limoe", LIMOE_MODEL, {"shapes": {"colors": ["red"]}})
    with pytest.raises(ValueError, match="config key 'data.shapes.image_size': got 32; it must equal model.image_size=16"):
        build_task("limoe", LIMOE_MODEL, {"shapes": {"image_size": 32}})
    with pytest.raises(ValueError, match="'model.preset': got 'tiny_limoe'; it is a 'limoe' preset, not allowed for task 'lm'"):
        build_task("lm", {"preset": "tiny_limoe"}, LM_DATA)
    with pytest.raises(ValueError, match=r"config key 'data.val_fraction': got 0; it must be in \(0, 1\)"):
        build_task("lm", LM_MODEL, {**LM_DATA, "val_fraction": 0})
    with pytest.raises(ValueError, match="config key 'data.seq_len': got 64; it must be <= model.max_seq_len=32"):
        build_task("lm", LM_MODEL, {**LM_DATA, "seq_len": 64})
    with pytest.raises(TypeError, match="ep_group and dp_group"):
        build_task("lm", LM_MODEL, LM_DATA, groups=object())


def test_tasks_follow_the_protocol(limoe_task, lm_task):
    for task in (limoe_task, lm_task):
        assert isinstance(task, Task)
        assert [m.name for m in task.moe_layers()] == ["blocks.1.moe"]


# ------------------------------------------------------------------ batch streams

@pytest.mark.parametrize("which", ["limoe", "lm"])
def test_sample_j_of_step_s_depends_on_seed_step_and_j_only(which, limoe_task, lm_task):
    task = limoe_task if which == "limoe" else lm_task
    whole = task.micro_batch(3, 0, 8, seed=1)
    # any cut of the global batch into slices gives the same samples (layout invariance)
    for cut in ((0, 4), (4, 4), (2, 3), (7, 1)):
        part = task.micro_batch(3, cut[0], cut[1], seed=1)
        assert _equal(part, {k: v[cut[0]:cut[0] + cut[1]] for k, v in whole.items()}), cut
    assert _equal(task.micro_batch(3, 0, 8, seed=1), whole)                    # deterministic
    assert not _equal(task.micro_batch(4, 0, 8, seed=1), whole)                # steps differ
    assert not _equal(task.micro_batch(3, 0, 8, seed=2), whole)                # seeds differ
    assert not _equal(task.micro_batch(3, 0, 4, seed=1), task.micro_batch(3, 4, 4, seed=1))  # samples differ
    with pytest.raises(TypeError, match="config key 'seed': got 1.0; it must be an integer"):
        task.micro_batch(3, 0, 4, seed=1.0)
    with pytest.raises(ValueError, match="config key 'max_batches': got 0; it must be >= 1"):
        task.evaluate(max_batches=0)
    with pytest.raises(TypeError, match="config key 'max_batches': got True; it must be an integer or null"):
        task.evaluate(max_batches=True)
    for bad, match in (((3, -1, 4), "config key 'start': got -1; it must be >= 0"),
                       ((3, 0, 0), "config key 'count': got 0; it must be >= 1"),
                       ((-1, 0, 4), "config key 'step': got -1; it must be >= 0")):
        with pytest.raises(ValueError, match=match):
            task.micro_batch(*bad, seed=1)


def test_batch_contents(limoe_task, lm_task):
    b = limoe_task.micro_batch(0, 0, 4, seed=0)
    assert b["image"].shape == (4, 3, 16, 16) and b["tokens"].shape == b["mask"].shape == (4, 48)
    assert b["mask"].dtype == torch.bool and bool(b["mask"].any(1).all())
    b = lm_task.micro_batch(0, 0, 4, seed=0)
    assert b["tokens"].shape == b["targets"].shape == (4, 32)
    assert torch.equal(b["tokens"][:, 1:], b["targets"][:, :-1])


# ------------------------------------------------------------------ loss and eval

@pytest.mark.parametrize("which", ["limoe", "lm"])
def test_loss_is_task_plus_aux_and_logs_floats(which, limoe_task, lm_task):
    task = limoe_task if which == "limoe" else lm_task
    batch = task.micro_batch(0, 0, 4, seed=0)
    total, logs = task.loss(batch)
    assert total.dim() == 0 and total.requires_grad
    assert all(isinstance(v, float) for v in logs.values())
    aux = set(task.moe_layers()[0].config.aux_losses)
    assert aux <= set(logs)
    assert math.isclose(logs["loss"], logs["task_loss"] + sum(logs[k] for k in aux), rel_tol=1e-5)


def test_evaluate_keys_and_determinism(limoe_task, lm_task):
    ev = limoe_task.evaluate()
    assert {"zero_shot_accuracy", "val_contrastive_loss", "zero_shot_accuracy_all"} <= set(ev)
    assert ev["zero_shot_classes"] == 5.0 and 0.0 <= ev["zero_shot_accuracy"] <= 1.0
    assert limoe_task.evaluate() == ev
    assert limoe_task.model.training
    ev = lm_task.evaluate(max_batches=1)
    assert set(ev) >= {"val_loss", "perplexity"}
    assert math.isclose(ev["perplexity"], math.exp(ev["val_loss"]), rel_tol=1e-9)
    assert lm_task.evaluate(max_batches=1) == ev


@pytest.mark.parametrize("which", ["limoe", "lm"])
def test_a_few_optimizer_steps_reduce_the_loss(which):
    torch.manual_seed(0)
    task = build_task(which, LIMOE_MODEL if which == "limoe" else LM_MODEL,
                      LIMOE_DATA if which == "limoe" else LM_DATA)
    first, last = fit_batch(task, task.micro_batch(0, 0, 8, seed=0), 12)
    assert last < 0.8 * first


# ------------------------------------------------------------------ expert + data parallel

DROPLESS_MODEL = {**LIMOE_MODEL, "moe": {**LIMOE_MODEL["moe"], "router": {"policy": "topk", "top_k": 2,
                                                                          "capacity_factor": None}}}


def _ep_limoe(rank, world):
    from parallel.dims import ParallelDims

    groups = ParallelDims.from_world(world, ep=world).build()
    task = build_task("limoe", DROPLESS_MODEL, LIMOE_DATA, groups=groups)
    batch = task.micro_batch(0, 4 * rank, 4, seed=3)
    _, logs = task.loss(batch)
    u, v, _ = task.model(batch["image"], batch["tokens"], batch["mask"])
    task.model.contrastive_loss(u, v).backward()
    ev = task.evaluate(max_batches=1)
    return logs["task_loss"], ev, task.model.logit_scale.grad.clone(), task.model.image_proj.weight.grad.clone()


@pytest.mark.distributed
def test_expert_parallel_task_matches_single_process_on_the_global_batch():
    results = run_distributed(_ep_limoe, 2, timeout=120)
    single = build_task("limoe", DROPLESS_MODEL, LIMOE_DATA)
    batches = [single.micro_batch(0, 4 * r, 4, seed=3) for r in range(2)]
    glob = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    _, logs = single.loss(glob)
    # gathered negatives: the mean of the ranks' losses is the global-batch loss ...
    assert math.isclose((results[0][0] + results[1][0]) / 2, logs["task_loss"], rel_tol=1e-4)
    # ... and the data-parallel mean of their gradients is the global-batch gradient
    u, v, _ = single.model(glob["image"], glob["tokens"], glob["mask"])
    single.model.contrastive_loss(u, v).backward()
    torch.testing.assert_close((results[0][2] + results[1][2]) / 2, single.model.logit_scale.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close((results[0][3] + results[1][3]) / 2, single.model.image_proj.weight.grad,
                               rtol=1e-4, atol=1e-6)
    ev = single.evaluate(max_batches=1)
    for _, ev_rank, _, _ in results:
        assert ev_rank.keys() == ev.keys()
        for k in ev:
            assert math.isclose(ev_rank[k], ev[k], rel_tol=1e-4, abs_tol=1e-6), k


# ------------------------------------------------------------------ user data

def _write_jsonl(folder, n=6):
    import json

    import numpy as np
    from PIL import Image

    colours = {"red": (230, 20, 20), "blue": (20, 40, 230)}
    lines = []
    for i in range(n):
        colour = "red" if i % 2 == 0 else "blue"
        Image.fromarray(np.full((20, 20, 3), colours[colour], dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": f"a {colour} square", "shape": "square",
                                 "colour": colour}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"


def test_user_jsonl_source_trains_and_evaluates(tmp_path):
    path = str(_write_jsonl(tmp_path))
    task = build_task("limoe", LIMOE_MODEL, {"source": path, "val_jsonl": path, "eval_batch_size": 4})
    batch = task.micro_batch(0, 0, 3, seed=0)
    assert batch["image"].shape == (3, 3, 16, 16)  # resized to the model's image size
    total, _ = task.loss(batch)
    assert torch.isfinite(total)
    ev = task.evaluate()
    assert ev["zero_shot_classes"] == 2.0 and 0.0 <= ev["zero_shot_accuracy"] <= 1.0
    assert math.isfinite(ev["val_contrastive_loss"])
    with pytest.raises(ValueError, match="only allowed with data.source='shapes'"):
        build_task("limoe", LIMOE_MODEL, {"source": path, "shapes": {"image_size": 16}})
    with pytest.raises(FileNotFoundError):
        build_task("lm", LM_MODEL, {"source": str(tmp_path / "missing.txt")})


def test_lm_on_user_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world, " * 800)
    task = build_task("lm", LM_MODEL, {"source": str(tmp_path), "block_size": 1024, "eval_batches": 1})
    assert math.isfinite(task.evaluate()["val_loss"])
