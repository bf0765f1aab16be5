"""The value checks and ``ConfigError``, re-exported from ``parallel.checks`` for library users.

The checks live in ``parallel.checks``, the floor both packages build on (``parallel/``
imports nothing from ``moe/``). ``from moe.checks import ConfigError, check_int`` keeps
working and gives the very same objects; the project's own modules import ``parallel.checks``.
"""
from __future__ import annotations

from parallel.checks import (
    ConfigError,
    ConfigTypeError,
    build_at,
    check_bool,
    check_choice,
    check_int,
    check_keys,
    check_mapping,
    check_number,
    check_str,
    fail,
    join,
)

__all__ = [
    "ConfigError", "ConfigTypeError", "fail", "join", "build_at", "check_int", "check_number", "check_bool",
    "check_str", "check_choice", "check_mapping", "check_keys",
]
