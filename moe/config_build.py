"""The one way a mapping (a YAML section) becomes a config dataclass, for every config of the project.

A config is a dataclass that checks its own fields in ``__post_init__`` with the
``moe.checks`` functions, under paths rooted at its class name
(``config key 'RouterConfig.top_k': got 0; it must be >= 1``): that is what a library
user building it in Python sees, and the only place its values are checked.

``from_dict(cls, d, path)`` reads a mapping into one: every key must be a field (an
unknown key is refused, naming the allowed keys), a field annotated with a config
dataclass (or ``Optional`` of one) is built the same way from its own mapping at
``path.<field>``, a required field left out is ``path.<field> is required but missing``,
and the errors of ``__post_init__`` are re-rooted from the class name at ``path``
(``model.moe.router.top_k``), mentions of other fields in the message included
(``it needs ParallelConfig.pp > 1`` reads ``it needs parallel.pp > 1``)::

    RouterConfig.from_dict({"top_k": 0}, "model.moe.router")
    # ConfigError: config key 'model.moe.router.top_k': got 0; it must be >= 1

Every config class inherits ``FromDict``, which gives it the classmethod
``from_dict(d, path=DICT_PATH)`` and two hooks for the few that read differently:
``dict_keys`` (the keys a mapping may hold; e.g. a model config whose mapping is flat,
the transformer's keys beside its own) and ``dict_kwargs`` (the constructor arguments
of a checked mapping; e.g. a transformer building its MoE section with the fields it
owns). The builder converts nothing else: a value's type and range are the class's
``__post_init__``'s business.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import typing
from types import MappingProxyType
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Type, TypeVar, Union

from parallel.checks import ConfigError, build_at, check_keys, join

__all__ = ["FromDict", "from_dict", "build_sections", "construct"]

T = TypeVar("T")
C = TypeVar("C", bound="FromDict")

# The default of from_dict's owned / defaults / forced: no values (read-only, shared).
_NONE: Mapping[str, Any] = MappingProxyType({})


class FromDict:
    """Base of every config dataclass: ``cls.from_dict(d, path)`` and its two hooks (module docstring)."""

    # Every subclass is a dataclass (annotation only, set by @dataclass on the subclass): what
    # lets the type checker accept ``dataclasses.fields(cls)`` here.
    __dataclass_fields__: ClassVar[Dict[str, dataclasses.Field[Any]]]

    # from_dict's default path; None: the class name (where __post_init__ roots its errors).
    DICT_PATH: ClassVar[Optional[str]] = None

    @classmethod
    def from_dict(cls: Type[C], d: Mapping[str, Any], path: Optional[str] = None, **options: Any) -> C:
        """Build from a mapping; errors name ``path.<key>`` (``options``: see the module's ``from_dict``)."""
        if path is None:
            path = cls.DICT_PATH if cls.DICT_PATH is not None else cls.__name__
        return from_dict(cls, d, path, **options)

    @classmethod
    def dict_keys(cls) -> List[str]:
        """The keys ``from_dict`` accepts (hook; default: every init field)."""
        return [f.name for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def dict_kwargs(cls, kw: Dict[str, Any], path: str) -> Dict[str, Any]:
        """The constructor arguments of the key-checked mapping ``kw`` (hook; default: ``build_sections``)."""
        return build_sections(cls, kw, path)


def from_dict(cls: Type[C], d: Mapping[str, Any], path: str, *, owned: Mapping[str, Any] = _NONE,
              defaults: Mapping[str, Any] = _NONE, forced: Mapping[str, Any] = _NONE) -> C:
    """The config ``cls`` (a ``FromDict`` dataclass) read from ``d``; every error names its path under ``path``.

    ``owned``: field values the caller sets, which ``d`` may not hold (a transformer's
    ``d_model`` for its MoE section). ``forced``: field values the caller sets over
    whatever ``d`` holds (a decoder's ``causal``). ``defaults``: values for the keys ``d``
    leaves out (a transformer's ``d_ffn`` for its experts).
    """
    owned = dict(owned)
    check_keys(path, d, [k for k in cls.dict_keys() if k not in owned])
    kw = {**dict(defaults), **d, **dict(forced), **owned}
    return construct(cls, cls.dict_kwargs(kw, path), path)


def build_sections(cls: type, kw: Mapping[str, Any], path: str) -> Dict[str, Any]:
    """``kw`` in field order, each config section in it built at ``path.<field>``.

    A config section is a field annotated with a ``FromDict`` dataclass (or ``Optional``
    of one) whose value is not already one (None stays None where the field is
    Optional). The sections are built before ``construct`` reports a missing required field.
    """
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name not in kw:
            continue
        value, (section, optional) = kw[f.name], _section_type(cls, f.name)
        if section is not None and not isinstance(value, section) and not (value is None and optional):
            value = section.from_dict(value, join(path, f.name))
        out[f.name] = value
    return out


def construct(cls: Type[T], kwargs: Mapping[str, Any], path: str) -> T:
    """``cls(**kwargs)`` with its ``__post_init__`` errors re-rooted from ``cls.__name__`` at ``path``.

    ``moe.checks.build_at`` re-roots the key path; the mentions of ``cls.__name__.<field>``
    in the rest of the message follow it here.
    """
    try:
        return build_at(path, cls, **kwargs)
    except ConfigError as e:
        raise _mentions_rerooted(e, cls.__name__, path) from None


def _mentions_rerooted(e: ConfigError, old_root: str, new_root: str) -> ConfigError:
    if e.path is None or not e.tail or old_root == new_root:
        return e
    mention = re.compile(rf"(?<![\w.']){re.escape(old_root)}(?=[.\[])" + ("" if new_root else r"\."))
    tail = mention.sub(new_root, e.tail)
    return e if tail == e.tail else type(e).at(e.path, tail)


@functools.lru_cache(maxsize=None)
def _section_type(cls: type, name: str):
    """(the ``FromDict`` class field ``name`` of ``cls`` is annotated with, or None; whether it is Optional)."""
    tp = typing.get_type_hints(cls)[name]
    optional = False
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else None
    if isinstance(tp, type) and issubclass(tp, FromDict) and dataclasses.is_dataclass(tp):
        return tp, optional
    return None, optional
