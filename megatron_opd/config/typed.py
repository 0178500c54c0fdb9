"""Typed dataclass trees from plain mappings: the machinery under `load_config`, with no section of its own.

`build(cls, mapping)` checks every key against the dataclass fields (an unknown or misspelled key
names the closest valid one) and every value against its field's type, so a typo never falls
back to a default silently. `set_path` applies one dotted override (`train.optim.lr=3e-4`) to a
mapping with the same checks, `to_dict` is the inverse of `build`.

A section can refuse a key outright with a class attribute `REFUSED_KEYS = {name: why}` (for
example a literal API key, which would be written back into every config snapshot).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the dotted key and how to fix it."""


# ---------------------------------------------------------------------------------------------
# Typed construction


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` checked against (and minimally converted to) type `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _unknown_key(cls, name: str, prefix: str) -> ConfigError:
    where = f"{prefix}.{name}" if prefix else name
    refused = getattr(cls, "REFUSED_KEYS", {})
    if name in refused:  # never echo the value: it may be a secret
        return ConfigError(f"{where} is not accepted: {refused[name].format(prefix=prefix + '.' if prefix else '')}")
    valid = list(_fields(cls))
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else f"valid keys: {valid}"
    return ConfigError(f"unknown config key {where!r}; {hint}")


def build(cls, values: dict[str, Any], prefix: str = ""):
    """Build dataclass `cls` from a (nested) mapping, checking keys and types."""
    kinds = _fields(cls)
    kwargs = {}
    for name, value in values.items():
        if name not in kinds:
            raise _unknown_key(cls, name, prefix)
        kwargs[name] = _coerce(value, kinds[name], f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)


def to_dict(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.optim.lr=3e-4' -> (['train', 'optim', 'lr'], 0.0003); values are YAML scalars/lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form a.b.c=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e})") from None
    # YAML reads '1e-3' as a string (it wants '1.0e-3'); accept the usual float spellings.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") and value.strip() else value
        except ValueError:
            pass
    return key.strip().split("."), value


def set_path(tree: dict, cls, path: list[str], value: Any, done: list[str] = ()) -> None:
    """Set tree[path] = value, checking each level's key against the dataclass `cls`."""
    name, rest = path[0], path[1:]
    prefix = ".".join(done)
    kinds = _fields(cls) if dataclasses.is_dataclass(cls) else None
    if kinds is not None and name not in kinds:
        raise _unknown_key(cls, name, prefix)
    done = list(done)
    if not rest:
        tree[name] = value
        return
    sub_cls = kinds[name] if kinds is not None else None
    if typing.get_origin(sub_cls) is dict:  # dict[str, Section]: the next part is a free name
        sub = tree.setdefault(name, {})
        inner = typing.get_args(sub_cls)[1]
        if len(rest) == 1:
            sub[rest[0]] = value
            return
        set_path(sub.setdefault(rest[0], {}), inner, rest[1:], value, done + [name, rest[0]])
        return
    sub = tree.setdefault(name, {})
    if not isinstance(sub, dict) or (kinds is not None and not dataclasses.is_dataclass(sub_cls)):
        raise ConfigError(f"{'.'.join(done + [name])} is a value, not a section; cannot set {'.'.join(path)}")
    set_path(sub, sub_cls, rest, value, done + [name])
