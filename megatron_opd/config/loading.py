"""Load a config from YAML plus dotted overrides, derive checked copies, and write one back.

A YAML syntax error names the file, line and column; a missing file or a top level that is not a
mapping is a `ConfigError` too, so every mistake in a config reaches the user as one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from megatron_opd.config.job import JobConfig
from megatron_opd.config.typed import ConfigError, build, parse_override, set_path, to_dict


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML file; `ConfigError` naming file:line:column for a syntax error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise ConfigError(f"{where}: invalid YAML: {what}") from None
    tree = tree or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return tree


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = (), cls=JobConfig):
    """Load `cls` from a YAML file (or defaults when None) and apply dotted overrides."""
    tree: dict[str, Any] = read_yaml(path) if path is not None else {}
    for text in overrides:
        keys, value = parse_override(text)
        set_path(tree, cls, keys, value, [])
    return build(cls, tree)


def derive(cfg, overrides: list[str] = (), **changes: Any):
    """A checked copy of `cfg` with `changes` ({"a.b": value}) and then `overrides` applied."""
    cls = type(cfg)
    tree = to_dict(cfg)
    for key, value in changes.items():
        set_path(tree, cls, key.split("."), value)
    for text in overrides:
        keys, value = parse_override(text)
        set_path(tree, cls, keys, value)
    return build(cls, tree)


def dump_config(cfg, path: str | os.PathLike) -> None:
    """Write `cfg` as YAML. It holds no secret: API keys are config keys only by name or file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
