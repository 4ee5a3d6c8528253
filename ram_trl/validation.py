"""Strict types for configuration dataclasses, read from their annotations.

YAML and Python are both generous: ``overwrite: "no"`` is a truthy string, ``epsilon: true`` is
the number 1, ``base: [x]`` is a list. Passed on, such values do the opposite of what was meant
(the string "no" deleted a folder) or fail far away with a traceback. :func:`check_fields`
checks every value against its field's annotation when a config is built, so a wrong type is
one error naming the key, as TRL's configs fail in ``__post_init__``:

* a ``bool`` must be a bool; an ``int`` an int but not a bool; a ``float`` an int or a float but
  not a bool; a ``str`` a string or an ``os.PathLike``;
* ``dict[K, V]`` and ``list[T]`` are checked per key and per item (``agents.a``);
* any member of a union will do; ``Any`` and other classes (dataclasses built later from their
  mappings, like ``EvalTask``) take anything of that class or a mapping.

Layer 0: imports only :mod:`ram_trl.errors`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from collections.abc import Mapping
from typing import Any

from ram_trl.errors import InputError

_NAMES = {bool: "a bool (true/false)", int: "an integer", float: "a number", str: "a string"}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_fields(cls: type, values: Mapping[str, Any], source: str) -> None:
    """Raise an InputError, ``{source}: {key} must be ..., got ...``, for the first value of
    ``values`` (field name -> value; names that are not fields are left to the caller) whose
    type does not match ``cls``'s annotation."""
    hints = _hints(cls)
    for name, value in values.items():
        if name in hints:
            problem = _mismatch(hints[name], value, name)
            if problem is not None:
                raise InputError(f"{source}: {problem}")


def check_keys(cls: type, data: Any, source: str) -> dict[str, Any]:
    """``data`` as keyword arguments of the dataclass ``cls``: a mapping whose keys are all its
    fields, else an InputError naming ``source`` and the unknown keys."""
    if not isinstance(data, Mapping):
        raise InputError(
            f"{source}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}"
        )
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"{source}: unknown field(s) {unknown}; known: {sorted(known)}")
    return dict(data)


def check_dataclass(obj: Any, source: str | None = None) -> None:
    """:func:`check_fields` over every field of a dataclass instance."""
    cls = type(obj)
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    check_fields(cls, values, source or cls.__name__)


def _mismatch(kind: Any, value: Any, key: str) -> str | None:
    """None if ``value`` fits the annotation ``kind``, else what is wrong with it."""
    origin = typing.get_origin(kind)
    if kind is Any:
        return None
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(kind)
        if value is None and type(None) in members:
            return None
        problems = [_mismatch(m, value, key) for m in members if m is not type(None)]
        if any(p is None for p in problems):
            return None
        wanted = " or ".join(_describe(m) for m in members)
        return f"{key} must be {wanted}, got {value!r}"
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            return f"{key} must be {_describe(kind)}, got {value!r}"
        key_kind, value_kind = typing.get_args(kind) or (Any, Any)
        for k, v in value.items():
            problem = _mismatch(key_kind, k, f"{key} key") or _mismatch(value_kind, v, f"{key}.{k}")
            if problem is not None:
                return problem
        return None
    if origin is list:
        if not isinstance(value, list):
            return f"{key} must be {_describe(kind)}, got {value!r}"
        (item_kind,) = typing.get_args(kind) or (Any,)
        for i, item in enumerate(value):
            problem = _mismatch(item_kind, item, f"{key}[{i}]")
            if problem is not None:
                return problem
        return None
    if kind is type(None):
        return None if value is None else f"{key} must be null, got {value!r}"
    if _fits(kind, value):
        return None
    return f"{key} must be {_describe(kind)}, got {value!r}"


def _fits(kind: Any, value: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, (str, os.PathLike))
    if isinstance(kind, type):
        return isinstance(value, (kind, Mapping))
    return True


def _describe(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin in (dict, Mapping):
        return "a mapping"
    if origin is list:
        return "a list"
    if kind is type(None):
        return "null"
    return _NAMES.get(kind, getattr(kind, "__name__", str(kind)))
