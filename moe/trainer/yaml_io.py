"""Reading a training config's YAML and applying ``--set`` overrides: text to a plain mapping.

``read_config(path, overrides, base)`` reads the file (or starts from ``base``) with
``YAMLLoader`` and applies the ``--set a.b=value`` overrides; ``moe.trainer.config.load_config``
validates the result into a ``TrainConfig``. This module knows nothing of the sections.

``YAMLLoader`` is ``yaml.SafeLoader`` that refuses a key repeated in one mapping (naming it
and its lines) and reads ``1e-3`` (no dot) as the float it means, as YAML 1.2 does. An
override's value is parsed by it too, so ``3``, ``0.5``, ``true``, ``null`` and
``[0.9, 0.99]`` have their YAML types. Every problem raises ``moe.checks.ConfigError``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

from parallel.checks import ConfigError

__all__ = ["YAMLLoader", "parse_override", "apply_overrides", "read_config"]


class YAMLLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key repeated in one mapping (naming it and its lines)
    and reads ``1e-3`` (no dot) as the float it means, as YAML 1.2 does."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: Dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                    seen.setdefault(key, line)
                except TypeError:  # unhashable key: the base class reports it
                    continue
                if first is not None:
                    raise ConfigError(f"config key {key!r} appears twice in one mapping "
                                      f"(line {first} and line {line} of {key_node.start_mark.name}); "
                                      "keep one of them")
        return super().construct_mapping(node, deep=deep)


YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def parse_override(text: str) -> Tuple[List[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value (e.g. train.steps=20)")
    key, raw_value = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(re.match(r"^[\w-]+$", p) for p in parts):
        raise ConfigError(f"override {text!r}: key path {key!r} must be dot-separated names")
    try:
        value = yaml.load(raw_value, Loader=YAMLLoader) if raw_value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value {raw_value!r} is not valid YAML ({e})") from None
    return parts, value


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``--set`` overrides to raw config data (in place; also returned).

    Missing intermediate mappings are created (handy for the free-form ``model``
    and ``data`` sections); unknown keys are then reported by validation.
    """
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for i, part in enumerate(parts[:-1]):
            if part == "task" and isinstance(node.get(part), str) and node is raw:
                node[part] = {"name": node[part]}
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"override {text!r}: '{where}' is {child!r}, not a section, "
                                  f"so it has no key '{parts[i + 1]}'")
            node = child
        node[parts[-1]] = value
    return raw


def read_config(path: Union[str, Path, None] = None, overrides: Sequence[str] = (),
                base: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The raw config: the YAML file ``path`` over ``base`` (top-level sections replaced), then ``overrides``."""
    raw: Dict[str, Any] = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.load(p.read_text(), Loader=YAMLLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections, "
                              f"got {type(loaded).__name__}")
        raw.update(loaded)
    return apply_overrides(_deep_copy(raw), overrides)


def _deep_copy(v):
    if isinstance(v, dict):
        return {k: _deep_copy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_deep_copy(x) for x in v]
    return v
