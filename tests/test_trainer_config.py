"""Training config: YAML -> dataclasses, --set overrides, clear errors; launch env parsing."""
from __future__ import annotations

import glob
import os

import pytest

from moe.trainer.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_config,
    parse_override,
    resolve_sections,
)
from parallel.launch import LaunchError, detect_launch, expand_hostlist, first_host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = {"task": "lm", "model": {"preset": "tiny_switch"}}


def cfg_with(**sections) -> TrainConfig:
    raw = {**BASE, **sections}
    return from_dict(raw)


def test_defaults_and_shorthand():
    cfg = cfg_with()
    assert cfg.task.name == "lm" and cfg.model == {"preset": "tiny_switch"} and cfg.data == {}
    assert cfg.parallel.ep == 1 and cfg.optim.schedule == "cosine" and cfg.optim.betas == (0.9, 0.95)
    assert cfg.train.resume is None and cfg.telemetry.tensorboard is True
    assert from_dict({**BASE, "task": {"name": "limoe"}}).task.name == "limoe"
    assert cfg_with(task="my.pkg:build").task.name == "my.pkg:build"
    assert from_dict(cfg.to_dict()) == cfg  # round trip through plain data


# The world size each example config is written for (its header comment).
EXAMPLE_WORLDS = {"tiny_limoe.yaml": 4, "tiny_switch_lm.yaml": 2, "gshard_lm.yaml": 8, "limoe_cluster.yaml": 32,
                  "multinode_tp_ep.yaml": 16, "multinode_tp_pp_ep.yaml": 32}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "examples/configs/*.yaml"))))
def test_example_configs_validate(path):
    from moe.trainer.layout import check_layout
    from moe.trainer.loop import StepSchedule

    cfg = load_config(path)
    assert cfg.task.name in ("limoe", "lm") and "preset" in cfg.model
    resolved = resolve_sections(cfg)  # the model and data sections validate too
    assert "preset" not in resolved["model"] and resolved["model"]["moe"]["num_experts"] >= 1
    if os.path.basename(path) == "tiny_limoe.yaml":
        assert cfg.parallel.ep == 2 and cfg.model["preset"] == "tiny_limoe"
    dims = check_layout(cfg, EXAMPLE_WORLDS[os.path.basename(path)])  # the layout fits its launch and model
    StepSchedule.from_config(cfg.train, dims.dp, 0)


def test_overrides_are_yaml_typed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("task: lm\nmodel: {preset: tiny_switch}\ntrain: {steps: 10}\n")
    cfg = load_config(p, ["train.steps=20", "optim.lr=3e-4", "optim.betas=[0.8, 0.9]", "train.resume=auto",
                          "telemetry.plots=false", "optim.grad_clip=null", "model.moe.num_experts=4",
                          "data.max_bytes=1000", "task=limoe", "parallel.ep=2"])
    assert cfg.train.steps == 20 and cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.train.resume == "auto" and cfg.telemetry.plots is False and cfg.optim.grad_clip is None
    assert cfg.model == {"preset": "tiny_switch", "moe": {"num_experts": 4}} and cfg.data == {"max_bytes": 1000}
    assert cfg.task.name == "limoe" and cfg.parallel.ep == 2
    assert load_config(p, ["task.name=lm"]).task.name == "lm"  # through the `task: lm` shorthand
    assert parse_override("a.b=") == (["a", "b"], None)
    raw = apply_overrides({}, ["x.y.z=1"])
    assert raw == {"x": {"y": {"z": 1}}}


@pytest.mark.parametrize("sections, match", [
    ({"train": {"stepz": 3}}, r"config key 'train.stepz' is not known; allowed keys at 'train': steps, global_batch_size, micro_batch_size"),
    ({"trian": {}}, r"config key 'trian' is not known; allowed keys at the top level: task, model"),
    ({"train": {"steps": 0}}, r"'train.steps': got 0; it must be >= 1"),
    ({"train": {"steps": "ten"}}, r"'train.steps': got 'ten'; it must be an integer"),
    ({"train": {"steps": 2.5}}, r"'train.steps': got 2.5; it must be an integer"),
    ({"train": {"global_batch_size": True}}, r"'train.global_batch_size': got True; it must be an integer"),
    ({"train": {"batch_size": 8}}, r"'train.batch_size' \(got 8\) was replaced: set 'train.global_batch_size' .*"
                                   r"'train.micro_batch_size'"),
    ({"train": {"global_batch_size": 12, "micro_batch_size": 5}},
     r"'train.micro_batch_size': got 5; it must divide train.global_batch_size=12"),
    ({"optim": {"lr": -1.0}}, r"'optim.lr': got -1.0; it must be > 0"),
    ({"optim": {"lr": "fast"}}, r"'optim.lr': got 'fast'; it must be a number"),
    ({"optim": {"schedule": "step"}}, r"'optim.schedule': got 'step'; allowed values: 'cosine', 'linear'"),
    ({"optim": {"betas": [0.9]}}, r"'optim.betas': got \[0.9\]; it must be a list of 2 values"),
    ({"optim": {"betas": [0.9, 1.5]}}, r"'optim.betas\[1\]': got 1.5; it must be in \[0.0, 1.0\)"),
    ({"optim": {"min_lr_ratio": 2.0}}, r"'optim.min_lr_ratio': got 2.0; it must be in \[0, 1\]"),
    ({"parallel": {"ep": 0}}, r"'parallel.ep': got 0; it must be >= 1"),
    ({"parallel": {"pp": 0}}, r"'parallel.pp': got 0; it must be >= 1"),
    ({"parallel": {"virtual_stages": 2}}, r"'parallel.virtual_stages': got 2; virtual stages are chunks of a "
                                          r"pipeline: it needs parallel.pp > 1"),
    ({"parallel": {"pp": 2, "virtual_stages": 2}}, r"'parallel.virtual_stages': got 2; more than one chunk per pipeline "
                                          r"rank needs parallel.pp_schedule=interleaved_1f1b"),
    ({"parallel": {"pp": 2, "pp_schedule": "interleaved_1f1b"}},
     r"'parallel.virtual_stages': got 1; the interleaved_1f1b schedule needs at least 2"),
    ({"parallel": {"pp_schedule": "zb"}}, r"'parallel.pp_schedule': got 'zb'; allowed values: 'gpipe', '1f1b'"),
    ({"parallel": {"pp_blocks": [1, 1]}}, r"'parallel.pp_blocks': got \[1, 1\]; it cuts the blocks over pipeline "
                                          r"stages: it needs parallel.pp > 1"),
    ({"parallel": {"pp": 2, "pp_blocks": [1, 0]}}, r"'parallel.pp_blocks\[1\]': got 0; it must be >= 1"),
    ({"parallel": {"pp": 2, "pp_blocks": 3}}, r"'parallel.pp_blocks': got 3; it must be a list"),
    ({"parallel": {"zero_stage": 4}}, r"'parallel.zero_stage': got 4; allowed values: 0, 1, 2, 3"),
    ({"parallel": {"zero_stage": 3, "zero_engine": "deepspeed"}},
     r"'parallel.zero_engine': got 'deepspeed'; DeepSpeed's MoE refuses ZeRO stage 3; stage 3 runs on zero_engine "
     r"'fsdp2'"),
    ({"parallel": {"zero_stage": 1, "zero_engine": "fsdp2"}},
     r"'parallel.zero_engine': got 'fsdp2'; FSDP2 always shards gradients too \(stages 2 and 3\); stage 1 runs on"),
    ({"parallel": {"zero_engine": "fsdp2"}}, r"'parallel.zero_engine': got 'fsdp2'; it chooses the engine of "
                                             r"parallel.zero_stage 1-3"),
    ({"parallel": {"zero_stage": 2, "pp": 2}}, r"'parallel.zero_stage': got 2; pipeline parallelism \(pp=2\) runs "
                                               r"with the replicated optimizer: set zero_stage 0, or pp=1"),
    ({"parallel": {"zero_stage": 3, "tp": 2}}, r"'parallel.zero_engine': got 'auto'; FSDP2 here does not compose "
                                               r"with tensor parallelism \(tp=2, etp=1\): use zero_stage 1 or 2"),
    ({"parallel": {"tp": 0}}, r"'parallel.tp': got 0; it must be >= 1"),
    ({"parallel": {"backend": "mpi"}}, r"'parallel.backend': got 'mpi'; allowed values: 'auto', 'gloo'"),
    ({"telemetry": {"plots": "yes"}}, r"'telemetry.plots': got 'yes'; it must be true or false"),
    ({"train": {"device": "tpu"}}, r"'train.device': got 'tpu'; allowed values: 'auto', 'cpu', 'cuda'"),
    ({"train": {"resume": ""}}, r"'train.resume': got ''; use null"),
    ({"task": "vision"}, r"'task.name': got 'vision'; allowed values: 'lm', 'limoe', or 'package"),
    ({"model": [1, 2]}, r"'model': got \[1, 2\]; it must be a mapping with string keys"),
    ({"train": 5}, r"'train': got 5; it must be a mapping with keys"),
    ({"train": {"compile": "yes"}}, r"'train.compile': got 'yes'; it must be true or false"),
])
def test_bad_values_name_the_key(sections, match):
    with pytest.raises(ConfigError, match=match):
        cfg_with(**sections)


def test_missing_required_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config key 'model' is required but missing"):
        from_dict({"task": "lm"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections, got list"):
        load_config(bad)


def test_bad_overrides():
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        load_config(None, ["train.steps"], base=BASE)
    with pytest.raises(ConfigError, match=r"'train.steps' is 10, not a section, so it has no key 'x'"):
        load_config(None, ["train.steps=10", "train.steps.x=1"], base=BASE)
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(None, ["train.steps=[1"], base=BASE)
    with pytest.raises(ConfigError, match="'train.steps': got -3"):
        load_config(None, ["train.steps=-3"], base=BASE)


def test_float_strings_without_dot_are_numbers():
    # YAML 1.1 reads 3e-4 as a string; the trainer takes it as the number it means
    assert cfg_with(optim={"lr": "3e-4"}).optim.lr == pytest.approx(3e-4)


# --------------------------------------------------------------------------------------
def test_hostlist_parser():
    assert expand_hostlist("localhost") == ["localhost"]
    assert expand_hostlist("node[01-03,07],gpu5") == ["node01", "node02", "node03", "node07", "gpu5"]
    assert expand_hostlist("rack[1-2]-n[8-9]") == ["rack1-n8", "rack1-n9", "rack2-n8", "rack2-n9"]
    assert first_host("cn[0099-0101]") == "cn0099"
    with pytest.raises(LaunchError, match="unbalanced brackets"):
        expand_hostlist("node[1-2")


def test_detect_launch_sources():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "29500"}
    got = detect_launch(env)
    assert (got.rank, got.world_size, got.local_rank, got.master_addr, got.master_port, got.source) == \
        (3, 4, 1, "h0", 29500, "torchrun")
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
             "SLURM_JOB_NODELIST": "zz-node[3-6]"}
    got = detect_launch(slurm)
    assert (got.rank, got.world_size, got.local_rank, got.master_addr, got.source) == (5, 8, 1, "zz-node3", "slurm")
    assert got.master_port == detect_launch(slurm).master_port == 20000 + 1234
    assert detect_launch({}).source == "single" and detect_launch({}).world_size == 1
    with pytest.raises(LaunchError, match="missing MASTER_ADDR, MASTER_PORT"):
        detect_launch({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="RANK=4 is outside"):
        detect_launch({**env, "RANK": "4"})
    with pytest.raises(LaunchError, match="SLURM_NTASKS='x' must be an integer"):
        detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "x"})


# ------------------------------------------------------------------ duplicate keys, --print-config

def test_duplicate_yaml_key_is_an_error_naming_key_and_lines(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("task: lm\nmodel:\n  preset: tiny_switch\n  n_layers: 2\n  n_layers: 4\n")
    with pytest.raises(ConfigError, match=r"config key 'n_layers' appears twice in one mapping \(line 4 and line 5"):
        load_config(p)
    p.write_text("task: lm\nmodel: {preset: tiny_switch}\noptim: {lr: 1e-3}\n")
    assert load_config(p).optim.lr == 1e-3  # YAML 1.2 floats without a dot read as numbers


def _cli(tmp_path, text: str, *overrides: str, env_extra=None):
    import subprocess
    import sys

    p = tmp_path / "c.yaml"
    p.write_text(text)
    args = [sys.executable, "-m", "moe.train", "--config", str(p), "--print-config"]
    for o in overrides:
        args += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **(env_extra or {})}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("override, expected", [
    ("model.moe.router.top_k=0", "config key 'model.moe.router.top_k': got 0; it must be >= 1"),
    ("model.moe.num_experts=abc", "config key 'model.moe.num_experts': got 'abc'; it must be an integer"),
    ("model.n_layer=3", "config key 'model.n_layer' is not known; allowed keys at 'model': "),
    ("data.max_byte=10", "config key 'data.max_byte' is not known; allowed keys at 'data': source"),
    ("optim.lr=-1", "config key 'optim.lr': got -1.0; it must be > 0"),
    ("parallel.ep=0", "config key 'parallel.ep': got 0; it must be >= 1"),
])
def test_print_config_rejects_every_section_with_one_line(tmp_path, override, expected):
    r = _cli(tmp_path, "task: lm\nmodel: {preset: tiny_gshard}\n", override)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("config error: " + expected), lines
    assert r.stdout == ""


def test_print_config_prints_the_resolved_model(tmp_path):
    import yaml

    r = _cli(tmp_path, "task: lm\nmodel: {preset: tiny_switch, n_layers: 2}\n", "train.compile=true")
    assert r.returncode == 0, r.stderr
    out = yaml.safe_load(r.stdout)
    assert "preset" not in out["model"] and out["model"]["n_layers"] == 2 and out["model"]["d_model"] == 64
    assert out["model"]["moe"]["router"]["policy"] == "switch" and out["model"]["moe"]["num_experts"] == 8
    assert out["data"]["source"] == "stdlib" and out["train"]["compile"] is True
    # what it prints is itself a valid config that resolves to the same model
    again = _cli(tmp_path, r.stdout)
    assert again.returncode == 0 and yaml.safe_load(again.stdout)["model"] == out["model"]


@pytest.mark.parametrize("world, global_batch, micro, ok", [
    (4, 64, 16, True), (4, 64, 8, True), (1, 64, 16, True),
    (4, 60, 10, False), (3, 64, None, False), (4, 8, 4, False),
])
def test_global_batch_must_split_on_the_launch_dp_size(tmp_path, world, global_batch, micro, ok):
    """Checked from the launcher's WORLD_SIZE before any process group exists: one line, exit 2."""
    env = {"WORLD_SIZE": str(world), "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29999"}
    sets = [f"train.global_batch_size={global_batch}"] + ([f"train.micro_batch_size={micro}"] if micro else [])
    r = _cli(tmp_path, "task: lm\nmodel: {preset: tiny_switch}\n", *sets, env_extra=env)
    if ok:
        assert r.returncode == 0, r.stderr
        return
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"config error: config key 'train.global_batch_size': got {global_batch}; "
                               "it must be a multiple of"), lines
