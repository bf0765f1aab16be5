"""Value checks shared by every config of the project, and the one error they raise.

Every check takes the *key path* of the value first and raises ``ConfigError``
(a ``ValueError``) whose message names that path, the value it got and what is
allowed::

    config key 'model.moe.router.top_k': got 0; it must be >= 1

A dataclass checks its fields in ``__post_init__`` under paths rooted at its class
name (``RouterConfig.top_k``, ``MoEConfig.router.top_k``), which is what a library
user building it in Python sees. A ``from_dict(d, path)`` builds it through
``build_at(path, cls, **kw)``, which re-roots those paths at the YAML key path
(``model.moe.router.top_k``): the same check, the path the reader typed.

Checks return the value (ints as ``int``, numbers as ``float``) so a caller may
normalise with them; ``None`` passes only with ``allow_none=True``.

They sit in ``parallel/``, the floor under both packages (``parallel/`` imports nothing from
``moe/``); ``moe.checks`` re-exports them for library users.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Literal, Mapping, NoReturn, Optional, Tuple, Type, TypeVar, overload

__all__ = [
    "ConfigError", "ConfigTypeError", "fail", "join", "build_at", "check_int", "check_number", "check_bool", "check_str",
    "check_choice", "check_mapping", "check_keys",
]


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range.

    ``path`` is the key path the message is about (None for errors about a whole
    file or an override string); ``tail`` is the message after ``config key '<path>'``.
    """

    def __init__(self, message: str, *, path: Optional[str] = None, tail: Optional[str] = None):
        super().__init__(message)
        self.path, self.tail = path, tail

    @classmethod
    def at(cls, path: str, tail: str) -> "ConfigError":
        return cls(f"config key '{path}'{tail}", path=path, tail=tail)

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:  # picklable across processes, keeping path and tail
        return (_rebuild, (type(self), str(self), self.path, self.tail))

    def rebased(self, old_root: str, new_root: str) -> "ConfigError":
        """The same error with a leading ``old_root`` of its path replaced by ``new_root``."""
        p = self.path
        if p is None or not (p == old_root or p.startswith(old_root + ".") or p.startswith(old_root + "[")):
            return self
        tail = (self.tail or "").replace(f"'{old_root}", f"'{new_root}")  # "allowed keys at '<path>'"
        return type(self).at(new_root + p[len(old_root):] if new_root else p[len(old_root) + 1:], tail)


def _rebuild(cls: Type[ConfigError], message: str, path: Optional[str], tail: Optional[str]) -> ConfigError:
    return cls(message, path=path, tail=tail)


class ConfigTypeError(ConfigError, TypeError):
    """A ``ConfigError`` about a value of the wrong type (also a ``TypeError``)."""


def fail(path: str, value: Any, allowed: str, *, wrong_type: bool = False) -> NoReturn:
    """Raise ``config key '<path>': got <value>; <allowed>`` (a ``ConfigTypeError`` if ``wrong_type``)."""
    raise (ConfigTypeError if wrong_type else ConfigError).at(path, f": got {value!r}; {allowed}")


def join(path: str, key: Any) -> str:
    """``path.key`` (just ``key`` at the top level)."""
    return f"{path}.{key}" if path else str(key)


T = TypeVar("T")


def build_at(path: str, cls: Type[T], /, **kwargs: Any) -> T:
    """``cls(**kwargs)`` with the errors of its ``__post_init__`` re-rooted from ``cls.__name__`` at ``path``.

    A required field (no default) missing from ``kwargs`` is reported as ``path.<field>``.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"build_at: {cls!r} is not a dataclass")
    for f in dataclasses.fields(cls):
        if (f.init and f.name not in kwargs and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING):
            raise ConfigError.at(join(path, f.name), " is required but missing")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.rebased(cls.__name__, path) from None


Bound = Optional[float]  # an int bound is a float bound too (PEP 484's numeric tower)


def _bounds(minimum: Bound, maximum: Bound, min_open: bool, max_open: bool) -> str:
    if minimum is not None and maximum is not None:
        return f"it must be in {'(' if min_open else '['}{minimum}, {maximum}{')' if max_open else ']'}"
    if minimum is not None:
        return f"it must be {'>' if min_open else '>='} {minimum}"
    return f"it must be {'<' if max_open else '<='} {maximum}"


def _in_bounds(v: float, minimum: Bound, maximum: Bound, min_open: bool, max_open: bool) -> bool:
    if minimum is not None and (v < minimum or (min_open and v == minimum)):
        return False
    return not (maximum is not None and (v > maximum or (max_open and v == maximum)))


@overload
def check_int(path: str, value: Any, *, minimum: Optional[int] = ..., maximum: Optional[int] = ...,
              allow_none: Literal[False] = ...) -> int: ...
@overload
def check_int(path: str, value: Any, *, minimum: Optional[int] = ..., maximum: Optional[int] = ...,
              allow_none: bool) -> Optional[int]: ...
def check_int(path: str, value: Any, *, minimum: Optional[int] = None, maximum: Optional[int] = None,
              allow_none: bool = False) -> Optional[int]:
    """An int (not a bool) in ``[minimum, maximum]`` (either bound optional); ``int`` unless ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        fail(path, value, "it must be an integer" + (" or null" if allow_none else ""), wrong_type=True)
    if not _in_bounds(value, minimum, maximum, False, False):
        fail(path, value, _bounds(minimum, maximum, False, False))
    return int(value)


@overload
def check_number(path: str, value: Any, *, minimum: Optional[float] = ..., maximum: Optional[float] = ...,
                 min_open: bool = ..., max_open: bool = ..., allow_none: Literal[False] = ...) -> float: ...
@overload
def check_number(path: str, value: Any, *, minimum: Optional[float] = ..., maximum: Optional[float] = ...,
                 min_open: bool = ..., max_open: bool = ..., allow_none: bool) -> Optional[float]: ...
def check_number(path: str, value: Any, *, minimum: Optional[float] = None, maximum: Optional[float] = None,
                 min_open: bool = False, max_open: bool = False, allow_none: bool = False) -> Optional[float]:
    """A finite int or float (not a bool) within the bounds; ``min_open`` / ``max_open`` exclude them."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(path, value, "it must be a number" + (" or null" if allow_none else ""), wrong_type=True)
    if not math.isfinite(value):
        fail(path, value, "it must be a finite number")
    if not _in_bounds(value, minimum, maximum, min_open, max_open):
        fail(path, value, _bounds(minimum, maximum, min_open, max_open))
    return float(value)


def check_bool(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        fail(path, value, "it must be true or false", wrong_type=True)
    return value


@overload
def check_str(path: str, value: Any, *, allow_none: Literal[False] = ..., what: str = ...) -> str: ...
@overload
def check_str(path: str, value: Any, *, allow_none: bool, what: str = ...) -> Optional[str]: ...
def check_str(path: str, value: Any, *, allow_none: bool = False, what: str = "a non-empty string") -> Optional[str]:
    """A non-empty string; ``what`` describes it in the error."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or not value:
        fail(path, value, f"it must be {what}" + (" or null" if allow_none else ""), wrong_type=not isinstance(value, str))
    return value


def check_choice(path: str, value: Any, allowed: Iterable[Any]) -> Any:
    allowed = tuple(allowed)
    if isinstance(value, bool) or value not in allowed:
        fail(path, value, f"allowed values: {', '.join(map(repr, allowed))}")
    return value


def check_mapping(path: str, value: Any, allowed: Optional[Iterable[str]] = None) -> Mapping:
    """A mapping with string keys (a YAML section)."""
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        keys = f" with keys {', '.join(allowed)}" if allowed is not None else " with string keys"
        fail(path or "<root>", value, "it must be a mapping" + keys, wrong_type=True)
    return value


def check_keys(path: str, d: Any, allowed: Iterable[str]) -> Mapping:
    """``d`` is a mapping whose keys are all in ``allowed``; the first unknown one is named with its path."""
    allowed = list(allowed)
    check_mapping(path, d, allowed)
    unknown = sorted(k for k in d if k not in allowed)
    if unknown:
        where = f"'{path}'" if path else "the top level"
        raise ConfigError.at(join(path, unknown[0]), f" is not known; allowed keys at {where}: {', '.join(allowed)}")
    return d
