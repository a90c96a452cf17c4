"""Strict dict <-> dataclass conversion: what recipes (YAML), exports (`config.json`) and the serve settings load
with.

`from_dict` builds a dataclass from a mapping, checking each value against its field's annotation (nested dataclasses,
unions, Literals, tuples, lists, dicts, scalars; lossless conversions only, an int for a float) and failing on unknown
keys and wrong types with a `ConfigError` whose one-line message names the key (`diffusion.multistep.order`).
`to_dict` is its inverse, JSON-ready. The dataclasses themselves live in `config.py`.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A bad setting; the message is one line naming the key and what was expected."""


T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` checked (and converted where lossless) against the annotation `tp`; a mismatch is a ConfigError
    naming `where`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, where)
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{where} must be one of {choices}, got {value!r}")
        return value
    if origin in (tuple, list, dict):
        return _coerce_container(value, tp, where)
    return _coerce_scalar(value, tp, where)


def _coerce_union(value: Any, tp: Any, where: str) -> Any:
    args = get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, where)
        except ConfigError as err:
            errors.append(str(err))
    raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {_type_name(tp)}")


def _coerce_container(value: Any, tp: Any, where: str) -> Any:
    """A tuple (fixed or `...` length), list or dict annotation, each entry coerced with its own `where`."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where} must be a list, got {type(value).__name__}")
    if origin is list:
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{where} must have {len(args)} entries, got {len(value)}")
    return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


_SCALARS = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}


def _coerce_scalar(value: Any, tp: Any, where: str) -> Any:
    """float (an int is taken), int (not a bool), bool or str; other annotations pass the value through."""
    if tp not in _SCALARS:
        return value
    ok = {
        float: not isinstance(value, bool) and isinstance(value, (int, float)),
        int: not isinstance(value, bool) and isinstance(value, int),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise ConfigError(f"{where} must be {_SCALARS[tp]}, got {value!r}")
    return float(value) if tp is float else value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown key '{key}' (allowed: {', '.join(names)})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """JSON-ready dict of a config dataclass (tuples become lists)."""

    def convert(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v

    return convert(obj)
