"""moe.config_build: the one way every config dataclass is read from a mapping, and the one place its
values are checked (``__post_init__``, errors rooted at the class name in Python, at the YAML path from YAML)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pytest

import moe
import moe.config
import moe.ops.library
import parallel.launch
from moe.checks import ConfigError, ConfigTypeError, check_int, fail
from moe.config_build import FromDict, from_dict
from moe.data.shapes import ShapesConfig
from moe.models import LIMoEConfig, LMConfig, TransformerConfig
from moe.tasks import LIMoEDataConfig, LMDataConfig
from moe.trainer import config as trainer_config
from moe.trainer.config import (OptimConfig, ParallelConfig, ProfileConfig, TaskConfig, TelemetryConfig, TrainConfig,
                                TrainLoopConfig)
from moe.trainer.yaml_io import read_config


def message(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        fn(*args, **kwargs)
    return str(err.value)


@dataclass(frozen=True)
class Inner(FromDict):
    size: int = 1
    width: int = 0

    def __post_init__(self) -> None:
        check_int("Inner.size", self.size, minimum=1)
        if self.width and self.width < self.size:
            fail("Inner.width", self.width, "it must be >= Inner.size or 0")


@dataclass(frozen=True)
class Outer(FromDict):
    name: str
    inner: Inner = field(default_factory=Inner)
    extra: Optional[Inner] = None


def test_generic_builder_keys_sections_and_paths():
    got = from_dict(Outer, {"name": "a", "inner": {"size": 3}, "extra": {"size": 2}}, "top")
    assert got == Outer("a", Inner(3), Inner(2)) and Outer.from_dict({"name": "b", "extra": None}).extra is None
    assert message(from_dict, Outer, {"name": "a", "innr": {}}, "top") == \
        "config key 'top.innr' is not known; allowed keys at 'top': name, inner, extra"
    assert message(from_dict, Outer, {"inner": {}}, "top") == "config key 'top.name' is required but missing"
    assert message(Outer.from_dict, {"name": "a", "inner": {"size": 0}}) == \
        "config key 'Outer.inner.size': got 0; it must be >= 1"
    # mentions of the class's other fields follow the key path
    assert message(from_dict, Outer, {"name": "a", "extra": {"size": 3, "width": 2}}, "m") == \
        "config key 'm.extra.width': got 2; it must be >= m.extra.size or 0"
    with pytest.raises(ConfigTypeError, match=r"'m.inner': got 5; it must be a mapping with keys size, width"):
        from_dict(Outer, {"name": "a", "inner": 5}, "m")
    # owned: set by the caller, not a key; forced: over the key; defaults: under it
    assert from_dict(Inner, {}, "i", owned={"size": 4}, defaults={"width": 5}) == Inner(4, 5)
    assert message(from_dict, Inner, {"size": 2}, "i", owned={"size": 4}) == \
        "config key 'i.size' is not known; allowed keys at 'i': width"
    assert from_dict(Inner, {"size": 2, "width": 9}, "i", forced={"size": 3}) == Inner(3, 9)


CONFIG_CLASSES = [moe.RouterConfig, moe.MoEConfig, TransformerConfig, LMConfig, LIMoEConfig, ShapesConfig, LMDataConfig,
                  LIMoEDataConfig, TaskConfig, ParallelConfig, OptimConfig, TrainLoopConfig, ProfileConfig,
                  TelemetryConfig, TrainConfig]


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_every_config_reads_through_the_one_builder(cls):
    assert issubclass(cls, FromDict) and "from_dict" not in vars(cls)  # no hand-written reader
    assert "validate" not in vars(cls) and "__post_init__" in vars(cls)  # checked on construction only


def test_train_sections_check_on_construction_rooted_at_the_class():
    assert message(OptimConfig, lr=0) == "config key 'OptimConfig.lr': got 0.0; it must be > 0.0"
    assert message(ParallelConfig, virtual_stages=2) == \
        "config key 'ParallelConfig.virtual_stages': got 2; virtual stages are chunks of a pipeline: it needs " \
        "ParallelConfig.pp > 1"
    assert message(ParallelConfig.from_dict, {"virtual_stages": 2}, "parallel").endswith("it needs parallel.pp > 1")
    assert message(TrainLoopConfig, global_batch_size=12, micro_batch_size=5) == \
        "config key 'TrainLoopConfig.micro_batch_size': got 5; it must divide TrainLoopConfig.global_batch_size=12"
    tp2 = {"task": TaskConfig("lm"), "model": {}, "parallel": ParallelConfig(tp=2), "train": TrainLoopConfig(compile=True)}
    assert message(TrainConfig, **tp2).startswith(
        "config key 'TrainConfig.train.compile': got True; torch.compile is not supported with tensor parallelism yet "
        "(TrainConfig.parallel.tp=2, TrainConfig.parallel.etp=1)")
    assert message(TrainConfig, task=TaskConfig("lm"), model={}, optim={"lr": 1.0}) == \
        "config key 'TrainConfig.optim': got {'lr': 1.0}; it must be an OptimConfig"
    assert OptimConfig(lr=1, betas=[0.8, "0.9"]).betas == (0.8, 0.9)  # the YAML forms, normalised


def test_model_and_data_sections_typed_through_the_task():
    cfg = trainer_config.from_dict({"task": "lm", "model": {"preset": "tiny_switch"}, "data": {"max_bytes": 100}})
    model, data = cfg.task_configs()
    assert isinstance(model, LMConfig) and isinstance(data, LMDataConfig) and data.max_bytes == 100
    assert cfg.model == {"preset": "tiny_switch"}  # the section as written, as trainer.json records it
    assert trainer_config.from_dict({"task": "my.pkg:build", "model": {"x": 1}}).task_configs() is None


def test_constants_are_defined_once():
    assert moe.config.SCORES is moe.ops.library.SCORES
    assert trainer_config.DIST_BACKENDS is parallel.launch.DIST_BACKENDS
    assert "cpp" in moe.config.KERNEL_BACKENDS and "nccl" in parallel.launch.DIST_BACKENDS
    assert not hasattr(moe.config, "BACKENDS") and not hasattr(trainer_config, "BACKENDS")


def test_yaml_io_reads_plain_data(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("task: lm\nmodel: {preset: tiny_switch}\n")
    raw = read_config(p, ["train.steps=3", "optim.lr=1e-3"])
    assert raw == {"task": "lm", "model": {"preset": "tiny_switch"}, "train": {"steps": 3}, "optim": {"lr": 1e-3}}
    assert trainer_config.load_config(p, ["train.steps=3"]).train.steps == 3
