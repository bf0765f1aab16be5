"""parallel.tp / etp / sequence_parallel in YAML, checked against the world size and the model
(moe.trainer.layout.check_layout) before any process group exists."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from moe.trainer.config import ConfigError, from_dict
from moe.trainer.layout import check_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM = {"task": "lm", "model": {"preset": "tiny_switch"}}        # d_model 64, 4 heads, d_ffn 256, 8 experts of 256
LIMOE = {"task": "limoe", "model": {"preset": "tiny_limoe"}}  # d_model 64, 4 heads, d_ffn 128, 8 experts


def layout(base, world, *, model=None, data=None, **parallel):
    raw = {**base, "model": {**base["model"], **(model or {})}, "data": data or {}, "parallel": parallel}
    return check_layout(from_dict(raw), world)


@pytest.mark.parametrize("base, world, model, data, parallel, match", [
    # heads, dense MLP widths, experts
    (LM, 3, {"d_model": 48, "n_heads": 4}, None, {"tp": 3},
     r"^config key 'model.n_heads': got 4; it must be divisible by parallel.tp=3 \(attention heads are split over "
     r"the tensor-parallel ranks\)$"),
    (LIMOE, 4, {"n_heads": 2}, None, {"tp": 4}, r"'model.n_heads': got 2; it must be divisible by parallel.tp=4"),
    (LM, 3, {"d_model": 48, "n_heads": 3, "d_ffn": 128, "moe": {"d_ffn": 129}}, None, {"tp": 3},
     r"^config key 'model.d_ffn': got 128; it must be divisible by parallel.tp=3 \(the hidden units of the dense "
     r"MLP blocks are split"),
    (LM, 2, {"moe": {"num_experts": 1, "d_ffn": 255, "router": {"policy": "topk", "top_k": 1}}}, None, {"tp": 2},
     r"^config key 'model.moe.d_ffn': got 255; it must be divisible by parallel.tp=2 \(with "
     r"model.moe.num_experts=1 the MoE blocks are dense MLPs"),
    (LM, 2, {"moe": {"d_ffn": 255}}, None, {"etp": 2}, "^config key 'model.moe.d_ffn': got 255; it must be "
     r"divisible by parallel.etp=2 \(each expert's hidden units are split over the expert-tensor-parallel ranks\)$"),
    (LM, 3, {"moe": {"d_ffn": 256}}, None, {"etp": 3}, r"'model.moe.d_ffn': got 256; .* parallel.etp=3"),
    (LM, 6, {"moe": {"num_experts": 8}}, None, {"ep": 3},
     r"^config key 'model.moe.num_experts': got 8; it must be divisible by parallel.ep=3"),
    (LM, 4, {"moe": {"dispatcher": "hierarchical", "node_size": 4}}, None, {"ep": 2},
     r"'model.moe.node_size': got 4; it must divide parallel.ep=2"),
    # the world size against the product of the layout
    (LM, 3, None, None, {"tp": 2},
     r"^config key 'parallel.tp': got 2; world size 3 is not equal to the product dp x tp x pp for any whole dp: "
     r"tp x pp = 2 x 1 = 2 must divide 3 \(its divisors: 1, 3\)$"),
    (LM, 4, None, None, {"tp": 2, "ep": 4, "etp": 2},
     r"^config key 'parallel.ep': got 4; world size 4 \(dp=2 x tp=2 x pp=1\) is not equal to the product "
     r"edp x ep x etp x pp for any whole edp: ep x etp = 4 x 2 = 8 must divide dp x tp = 4 \(its divisors: 1, 2, 4\)$"),
    (LM, 6, None, None, {"ep": 1, "etp": 4}, r"^config key 'parallel.etp': got 4; world size 6 \(dp=6 x tp=1"),
    (LM, 4, None, None, {"ep": 3}, r"'parallel.ep': got 3; .* ep x etp = 3 x 1 = 3 must divide dp x tp = 4"),
    # sequence parallelism
    (LIMOE, 2, None, None, {"tp": 2, "sequence_parallel": True},
     r"^config key 'parallel.sequence_parallel': got True; sequence parallelism is supported for the LM task only, "
     r"not task 'limoe'; set it to false \(parallel.tp works for this task without it\)$"),
    (LM, 2, None, {"seq_len": 99}, {"tp": 2, "sequence_parallel": True},
     r"^config key 'data.seq_len': got 99; it must be divisible by parallel.tp=2 \(sequence parallelism splits "
     r"each sequence over the tensor-parallel ranks\)$"),
    (LM, 4, {"max_seq_len": 126}, None, {"tp": 4, "sequence_parallel": True},
     r"^config key 'model.max_seq_len': got 126; it must be divisible by parallel.tp=4"),
])
def test_invalid_layouts_name_key_and_sizes(base, world, model, data, parallel, match):
    with pytest.raises(ConfigError, match=match):
        layout(base, world, model=model, data=data, **parallel)


def test_static_parallel_keys():
    """Checked when the YAML is read (no world size needed)."""
    with pytest.raises(ConfigError, match=r"^config key 'parallel.sequence_parallel': got True; it needs "
                                          r"parallel.tp > 1, got tp=1 \(sequence parallelism splits"):
        from_dict({**LM, "parallel": {"sequence_parallel": True}})
    for key in ("tp", "etp"):
        with pytest.raises(ConfigError, match=rf"^config key 'parallel.{key}': got 0; it must be >= 1$"):
            from_dict({**LM, "parallel": {key: 0}})
    with pytest.raises(ConfigError, match=r"'parallel.sequence_parallel': got 'yes'; it must be true or false"):
        from_dict({**LM, "parallel": {"tp": 2, "sequence_parallel": "yes"}})
    assert from_dict({**LM, "parallel": {"pp": 2}}).parallel.pp == 2  # pipeline parallelism (test_pp_*)
    for key in ("tp", "etp"):
        with pytest.raises(ConfigError, match=r"^config key 'train.compile': got True; torch.compile is not "
                                              r"supported with tensor parallelism yet"):
            from_dict({**LM, "parallel": {key: 2}, "train": {"compile": True}})
    cfg = from_dict(LM)
    assert (cfg.parallel.tp, cfg.parallel.etp, cfg.parallel.sequence_parallel) == (1, 1, False)
    # a config put together in Python is checked again
    cfg.parallel.sequence_parallel = True
    with pytest.raises(ConfigError, match="'parallel.sequence_parallel': got True; it needs parallel.tp > 1"):
        check_layout(cfg, 1)


@pytest.mark.parametrize("base, world, model, data, parallel, dims", [
    (LM, 2, None, None, {"tp": 2}, (1, 2, 1, 1, 2)),                                   # (dp, tp, ep, etp, edp)
    (LM, 4, None, None, {"tp": 2, "ep": 2, "sequence_parallel": True}, (2, 2, 2, 1, 2)),
    (LM, 4, None, None, {"tp": 2, "ep": 2, "etp": 2}, (2, 2, 2, 2, 1)),
    (LM, 2, None, None, {"etp": 2}, (2, 1, 1, 2, 1)),
    (LM, 8, {"moe": {"dispatcher": "hierarchical", "node_size": 2}}, None, {"ep": 4, "etp": 2}, (8, 1, 4, 2, 1)),
    (LM, 4, None, {"seq_len": 64}, {"tp": 4, "sequence_parallel": True}, (1, 4, 1, 1, 4)),
    (LM, 4, {"vocab_size": 259}, None, {"tp": 4}, (1, 4, 1, 1, 4)),                     # vocabulary is padded
    (LM, 2, {"moe_every": 0, "moe": None, "d_ffn": 100}, None, {"tp": 2}, (1, 2, 1, 1, 2)),
    (LM, 2, {"moe_every": 1, "d_ffn": 101}, None, {"tp": 2}, (1, 2, 1, 1, 2)),          # no dense block
    (LIMOE, 4, None, None, {"tp": 2, "ep": 2}, (2, 2, 2, 1, 2)),
    (LIMOE, 2, None, None, {"etp": 2}, (2, 1, 1, 2, 1)),
    ({"task": "tests.nowhere:build", "model": {}}, 2, None, None, {"tp": 2}, (1, 2, 1, 1, 2)),  # custom task
])
def test_valid_layouts_pass(base, world, model, data, parallel, dims):
    d = layout(base, world, model=model, data=data, **parallel)
    assert (d.dp, d.tp, d.ep, d.etp, d.edp) == dims and d.world_size == world


def test_custom_task_gets_no_sequence_parallelism():
    with pytest.raises(ConfigError, match="supported for the LM task only, not task 'tests.nowhere:build'"):
        layout({"task": "tests.nowhere:build", "model": {}}, 2, tp=2, sequence_parallel=True)


# ------------------------------------------------------------------ through python -m moe.train
LAUNCH = {"RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
BAD = [  # (config, world size, --set overrides, the one stderr line after "config error: ")
    ("task: lm\nmodel: {preset: tiny_switch, d_model: 63, n_heads: 3}\n", 2, ["parallel.tp=2"],
     "config key 'model.n_heads': got 3; it must be divisible by parallel.tp=2 (attention heads are split over the "
     "tensor-parallel ranks)"),
    ("task: lm\nmodel: {preset: tiny_switch}\n", 2, ["parallel.etp=2", "model.moe.d_ffn=255"],
     "config key 'model.moe.d_ffn': got 255; it must be divisible by parallel.etp=2 (each expert's hidden units "
     "are split over the expert-tensor-parallel ranks)"),
    ("task: lm\nmodel: {preset: tiny_switch}\nparallel: {tp: 2, ep: 4, etp: 2}\n", 4, [],
     "config key 'parallel.ep': got 4; world size 4 (dp=2 x tp=2 x pp=1) is not equal to the product edp x ep x "
     "etp x pp for any whole edp: ep x etp = 4 x 2 = 8 must divide dp x tp = 4 (its divisors: 1, 2, 4)"),
    ("task: lm\nmodel: {preset: tiny_switch}\nparallel: {tp: 4}\n", 6, [],
     "config key 'parallel.tp': got 4; world size 6 is not equal to the product dp x tp x pp for any whole dp: "
     "tp x pp = 4 x 1 = 4 must divide 6 (its divisors: 1, 2, 3, 6)"),
    ("task: lm\nmodel: {preset: tiny_switch}\nparallel: {sequence_parallel: true}\n", 2, [],
     "config key 'parallel.sequence_parallel': got True; it needs parallel.tp > 1, got tp=1 (sequence "
     "parallelism splits each sequence over the tensor-parallel ranks)"),
    ("task: limoe\nmodel: {preset: tiny_limoe}\nparallel: {tp: 2, sequence_parallel: true}\n", 2, [],
     "config key 'parallel.sequence_parallel': got True; sequence parallelism is supported for the LM task only, "
     "not task 'limoe'; set it to false (parallel.tp works for this task without it)"),
    ("task: lm\nmodel: {preset: tiny_switch}\ndata: {seq_len: 63}\nparallel: {tp: 2, sequence_parallel: true}\n",
     2, [], "config key 'data.seq_len': got 63; it must be divisible by parallel.tp=2 (sequence parallelism "
     "splits each sequence over the tensor-parallel ranks)"),
]


def _argv(config, overrides):
    return ["--config", str(config), "--print-config"] + [a for o in overrides for a in ("--set", o)]


@pytest.mark.parametrize("text, world, overrides, expected", BAD)
def test_main_rejects_bad_layouts_with_one_line(tmp_path, monkeypatch, capsys, text, world, overrides, expected):
    """``moe.train.main`` (what ``python -m moe.train`` runs) under a faked launch of ``world`` processes:
    exit status 2 and one line, before any process group exists."""
    from moe.train import main

    for name, value in {**LAUNCH, "WORLD_SIZE": str(world)}.items():
        monkeypatch.setenv(name, value)
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert main(_argv(config, overrides)) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"config error: {expected}\n"


def _cli(config, world: int, *overrides: str):
    env = {**os.environ, **LAUNCH, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "WORLD_SIZE": str(world)}
    return subprocess.run([sys.executable, "-m", "moe.train", *_argv(config, overrides)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_rejects_a_bad_layout(tmp_path):
    """The same through a real ``python -m moe.train`` (one case: the others go through ``main``)."""
    text, world, overrides, expected = BAD[0]
    config = tmp_path / "c.yaml"
    config.write_text(text)
    r = _cli(config, world, *overrides)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and lines == [f"config error: {expected}"] and r.stdout == "", r.stderr


def test_multinode_example_validates_at_world_16():
    """examples/configs/multinode_tp_ep.yaml: the 2 nodes x 8 GPUs job (examples/slurm/train.sbatch passes the
    config straight to ``python -m moe.train``)."""
    r = _cli(os.path.join(ROOT, "examples", "configs", "multinode_tp_ep.yaml"), 16)
    assert r.returncode == 0, r.stderr
    out = yaml.safe_load(r.stdout)
    assert out["parallel"] == {"ep": 8, "tp": 2, "pp": 1, "etp": 1, "sequence_parallel": True, "pp_schedule": "1f1b",
                               "virtual_stages": 1, "pp_blocks": None, "zero_stage": 0, "zero_engine": "auto",
                               "backend": "auto", "timeout_s": 600.0}
    assert out["task"] == {"name": "lm"} and out["model"]["moe"]["num_experts"] == 32
