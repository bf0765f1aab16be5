"""parallel.checks (re-exported as moe.checks): the shared value checks, their messages (key path, value, what
is allowed) and re-rooting."""
from __future__ import annotations

import pytest

import moe
from parallel.checks import (
    ConfigError,
    ConfigTypeError,
    build_at,
    check_bool,
    check_choice,
    check_int,
    check_keys,
    check_number,
    check_str,
)


def message(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        fn(*args, **kwargs)
    return str(err.value)


def test_int_checks():
    assert check_int("a.b", 3, minimum=1) == 3 and check_int("a.b", None, allow_none=True) is None
    assert message(check_int, "a.b", 0, minimum=1) == "config key 'a.b': got 0; it must be >= 1"
    assert message(check_int, "a.b", 9, minimum=1, maximum=8) == "config key 'a.b': got 9; it must be in [1, 8]"
    assert message(check_int, "a.b", True) == "config key 'a.b': got True; it must be an integer"
    assert message(check_int, "a.b", "3") == "config key 'a.b': got '3'; it must be an integer"
    with pytest.raises(TypeError):  # a wrong type is also a TypeError
        check_int("a.b", 2.0)


def test_number_checks_open_and_closed_bounds():
    assert check_number("x", 1) == 1.0 and isinstance(check_number("x", 1), float)
    assert message(check_number, "x", 0.0, minimum=0, min_open=True) == "config key 'x': got 0.0; it must be > 0"
    assert message(check_number, "x", 1.0, minimum=0, maximum=1, max_open=True) == \
        "config key 'x': got 1.0; it must be in [0, 1)"
    assert message(check_number, "x", float("nan")) == "config key 'x': got nan; it must be a finite number"
    assert message(check_number, "x", "fast", allow_none=True) == "config key 'x': got 'fast'; it must be a number or null"
    assert check_number("x", 1.0, minimum=0, maximum=1) == 1.0


def test_bool_choice_str_keys():
    assert check_bool("t", False) is False
    assert message(check_bool, "t", 1) == "config key 't': got 1; it must be true or false"
    assert message(check_choice, "p", "hash", ("topk", "switch")) == \
        "config key 'p': got 'hash'; allowed values: 'topk', 'switch'"
    assert message(check_str, "s", "") == "config key 's': got ''; it must be a non-empty string"
    assert message(check_keys, "model", {"d_model": 1, "zz": 2}, ["d_model", "n_layers"]) == \
        "config key 'model.zz' is not known; allowed keys at 'model': d_model, n_layers"
    assert message(check_keys, "", {"x": 1}, ["a"]) == "config key 'x' is not known; allowed keys at the top level: a"
    assert message(check_keys, "data", [1], ["a"]) == "config key 'data': got [1]; it must be a mapping with keys a"


def test_build_at_reroots_dataclass_errors_and_reports_missing_fields():
    # built in Python: the class-rooted path; through build_at: the YAML path
    assert message(moe.RouterConfig, top_k=0).startswith("config key 'RouterConfig.top_k': got 0")
    assert message(build_at, "model.moe.router", moe.RouterConfig, top_k=0) == \
        "config key 'model.moe.router.top_k': got 0; it must be >= 1"
    assert message(moe.MoEConfig, d_model=8, d_ffn=8, num_experts=2, router=moe.RouterConfig(top_k=3)) == \
        "config key 'MoEConfig.router.top_k': got 3; it must be in [1, num_experts=2]"
    assert message(build_at, "m", moe.MoEConfig, d_model=8, d_ffn=8) == "config key 'm.num_experts' is required but missing"
    with pytest.raises(ConfigTypeError):
        build_at("m", moe.MoEConfig, d_model=8, d_ffn=8, num_experts="4")


def test_one_config_error_class_everywhere():
    import pickle

    from moe.trainer.config import ConfigError as TrainerConfigError

    assert TrainerConfigError is ConfigError and issubclass(ConfigError, ValueError)
    e = pickle.loads(pickle.dumps(ConfigError.at("a.b", ": got 1; no")))
    assert str(e) == "config key 'a.b': got 1; no" and e.path == "a.b"


def test_moe_checks_re_exports_the_same_objects():
    """Library users' ``moe.checks`` names the very objects of ``parallel.checks`` (one ConfigError class)."""
    import moe.checks
    import parallel.checks

    assert sorted(moe.checks.__all__) == sorted(parallel.checks.__all__)
    assert all(getattr(moe.checks, name) is getattr(parallel.checks, name) for name in parallel.checks.__all__)
