"""One typed config tree for every job: dataclasses, loaded from YAML, with `a.b.c=value` overrides.

Every section is a dataclass with defaults; `load_config(path, overrides)` builds a `JobConfig`
from a YAML file and command-line overrides. An unknown or misspelled key is an error that names
the closest valid key, and every value is checked against its field's type, so a typo in a
config never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_opd.models.config import ModelConfig
from megatron_opd.rollout.config import RolloutConfig
from megatron_opd.runtime.cluster import ClusterConfig
from megatron_opd.runtime.layout import ParallelLayout
from megatron_opd.teachers.config import TeacherConfig


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the dotted key and how to fix it."""


# ---------------------------------------------------------------------------------------------
# Sections


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 1234
    # Ranks to start on this machine when not launched by torchrun/SLURM (1: this process only).
    nproc: int = 1
    log_every: int = 10
    # Progress display: "bar" (rich, on a terminal), "lines" (periodic log lines), "none".
    progress: Literal["auto", "bar", "lines", "none"] = "auto"


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 8
    # Sequences per optimizer step over all data-parallel replicas.
    global_batch_size: int = 32
    precision: Literal["fp32", "bf16"] = "fp32"
    use_distributed_optimizer: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    # Checkpoint every N steps (0: only at the end); resume from the newest complete one.
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    # Continue from the newest complete checkpoint of the run. false refuses a run directory that
    # holds checkpoints; restart=true moves the old run aside and starts at step 0, on every
    # attempt it is given to (megatron_opd/stages/run_dir.py, docs/architecture.md "Resume").
    resume: bool = True
    restart: bool = False
    # Initialise the model from this checkpoint directory (a step_* dir or a root holding them).
    init_from: str = ""
    eval_every: int = 0
    # Evaluate before the first step too (the "before" of a distillation report).
    eval_at_start: bool = True


@dataclass
class DataConfig:
    # Tiny verifiable domains used for training (see megatron_opd.data.domains).
    domains: list[str] = field(default_factory=lambda: ["add", "reverse", "sort"])
    eval_size: int = 200
    seed: int = 0


@dataclass
class OPDConfig:
    # Compute the full-vocabulary KL of hidden-signal teachers from hidden states and both
    # output layers in token chunks (O(chunk x V/TP) memory) instead of from materialised logits.
    fused_output_layer: bool = False
    fused_chunk_size: int = 1024
    # Keep every step's teacher signals in a zarr TeacherStore at this path ("" = off).
    signal_store: str = ""


@dataclass
class PipelineConfig:
    """How `megatron-opd run` prepares what the OPD stage needs (launchers/local.py)."""

    # Overrides for the SFT job that trains each expert whose model directory has no checkpoint,
    # then per teacher name (a harder domain may need more steps).
    expert_overrides: list[str] = field(default_factory=list)
    expert_overrides_by_teacher: dict[str, list[str]] = field(default_factory=dict)
    # Overrides for a mixed SFT warm start of the student ([]: none).
    student_overrides: list[str] = field(default_factory=list)
    parallel_jobs: int = 1  # SFT jobs (experts, student warm start) run at once
    replicas: int = 1  # embedded teacher servers per expert
    router: bool = True  # put the real sglang-router in front of replicas > 1


@dataclass
class JobConfig:
    stage: Literal["sft", "opd", "grpo"] = "sft"
    run: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelLayout = field(default_factory=ParallelLayout)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    opd: OPDConfig = field(default_factory=OPDConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # SLURM jobs (launchers/slurm.py)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


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
    valid = list(_fields(cls))
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    where = f"{prefix}.{name}" if prefix else name
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


# ---------------------------------------------------------------------------------------------
# Loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.optim.lr=3e-4' -> (['train', 'optim', 'lr'], 0.0003); values are YAML scalars/lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form a.b.c=value")
    value = yaml.safe_load(raw) if raw.strip() else ""
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


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = (), cls=JobConfig):
    """Load `cls` from a YAML file (or defaults when None) and apply dotted overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
