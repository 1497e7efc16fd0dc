"""Config as data: dataclasses with defaults, built strictly from dicts (unknown keys are errors).

Every stage's configuration is a ``@dataclass`` with a comment per field. ``from_dict`` builds one
from a (possibly nested) dict and rejects unknown keys with the dotted path of the key;
``to_dict`` gives the JSON-ready resolved config that is saved with every run;
``apply_overrides`` takes ``key.sub=value`` strings from the command line.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from landmarks.errors import ConfigError

C = TypeVar("C")


def to_dict(conf: Any) -> dict[str, Any]:
    """The dataclass as a plain JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(conf)))


def from_dict(cls: type[C], data: dict[str, Any] | None, _path: str = "") -> C:
    """Build dataclass ``cls`` from ``data``; nested dataclasses recurse; unknown keys raise ConfigError."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(_path + k for k in unknown)
        raise ConfigError(f"unknown config key(s): {names} (known: {', '.join(sorted(fields))})")
    hints = get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, _path + name)
    return cls(**kwargs)


def merge(conf: C, data: dict[str, Any]) -> C:
    """A copy of ``conf`` with the (nested) values in ``data`` replaced; unknown keys raise."""
    base = to_dict(conf)
    _deep_update(base, data, "")
    return from_dict(type(conf), base)


def apply_overrides(conf: C, overrides: list[str]) -> C:
    """Apply ``key.sub=value`` strings; values are parsed as JSON when they parse, else as strings."""
    data: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return merge(conf, data)


def _deep_update(base: dict[str, Any], new: dict[str, Any], path: str) -> None:
    for k, v in new.items():
        if k not in base:
            raise ConfigError(f"unknown config key: {path + k} (known: {', '.join(sorted(base))})")
        if isinstance(base[k], dict) and isinstance(v, dict):
            _deep_update(base[k], v, path + k + ".")
        else:
            base[k] = v


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return from_dict(tp, value, path + ".")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: {value!r} does not fit {tp}")
    if origin is typing.Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(a, v, path) for a, v in zip(args, value))
        inner = args[0] if args else Any
        seq = [_coerce(inner, v, path) for v in value]
        return tuple(seq) if origin is tuple else seq
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value
