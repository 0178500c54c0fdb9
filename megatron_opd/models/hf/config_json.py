"""A Hugging Face model directory's config.json as a `ModelConfig`, and how a job's `model:` must agree with it.

Torch-free: `JobConfig.check()` (config/job.py) runs this on a login node before anything
launches, and so does every rank before it builds its model.

The rule for a job that starts from a Hugging Face directory (`train.init_from=HF_DIR`): its
`model:` section must describe the same architecture as config.json. Every architecture key that
differs is refused by name with the value to set, and the error prints the whole `model:` section
that matches (to paste). The model is never silently re-derived from the files: the job's YAML
(and the config.yaml of the run) says what is trained, and a resumed run compares it key by key.
Training-side keys are the job's own choice (`TRAINING_FIELDS`): the context length it trains
at (up to config.json's max_position_embeddings), the vocabulary padding, the init scale (unused
when weights are loaded) and the MoE auxiliary-loss weight.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from megatron_opd.models.config import ModelConfig

# ModelConfig fields that describe how a job trains the model, not the weights it loads.
TRAINING_FIELDS = ("max_seq_len", "make_vocab_size_divisible_by", "init_std", "moe_aux_loss_coeff")
INDEX = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
# A megatron model directory's copy of the HF files (no weights) of the model it came from.
HF_SIDE_DIR = "hf"


def is_hf_model_dir(path: str | Path) -> bool:
    """A Hugging Face model directory (config.json), as opposed to a megatron one (model.yaml)."""
    path = Path(path)
    return (path / "config.json").is_file() and not (path / "model.yaml").is_file()


def side_files(directory: str | Path) -> list[Path]:
    """The files of an HF directory that travel with its weights: config, generation config,
    tokenizer files, chat template (not the weights, their index or a manifest)."""
    return sorted(
        p
        for p in Path(directory).iterdir()
        if p.is_file() and p.suffix not in WEIGHT_SUFFIXES and p.name not in (INDEX, "manifest.json")
    )


def read_config_json(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return config


def hf_model_config(directory: str | Path, *, make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """The ModelConfig of an HF directory's config.json (an error names an unsupported field)."""
    from megatron_opd.models.hf.architectures import architecture_of_hf_config, model_config_from_hf

    config = read_config_json(directory)
    cfg = model_config_from_hf(architecture_of_hf_config(config), config)
    return dataclasses.replace(cfg, make_vocab_size_divisible_by=make_vocab_size_divisible_by)


def architecture_differences(job: ModelConfig, hf: ModelConfig) -> list[str]:
    """The names of the architecture keys (all but TRAINING_FIELDS) where `job` and `hf` differ."""
    return [
        f.name
        for f in dataclasses.fields(ModelConfig)
        if f.name not in TRAINING_FIELDS and getattr(job, f.name) != getattr(hf, f.name)
    ]


def model_section(cfg: ModelConfig, *, keep_from: ModelConfig | None = None) -> str:
    """`cfg` as a `model:` YAML section (only the keys that differ from the defaults), with the
    training-side keys of `keep_from` (the job's own choice)."""
    if keep_from is not None:
        cfg = dataclasses.replace(cfg, **{k: getattr(keep_from, k) for k in TRAINING_FIELDS})
    default = ModelConfig()
    keys = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig) if getattr(cfg, f.name) != getattr(default, f.name)}
    return yaml.safe_dump({"model": keys}, sort_keys=False).rstrip()


def check_model_agrees(job: ModelConfig, directory: str | Path, key: str) -> None:
    """Raise ValueError when `job` (a job's `model:`) does not describe the HF model at
    `directory` (named by config key `key`, e.g. train.init_from), naming every differing key."""
    directory = Path(directory)
    from megatron_opd.models.hf.errors import CheckpointError

    try:
        hf = hf_model_config(directory, make_vocab_size_divisible_by=job.make_vocab_size_divisible_by)
    except (CheckpointError, ValueError, KeyError) as e:  # unknown architecture, unsupported field
        detail = f"config.json lacks {e}" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"{key}={directory}: {detail}") from None
    differ = architecture_differences(job, hf)
    if differ:
        listed = "; ".join(f"model.{k}={getattr(job, k)!r} but config.json gives {getattr(hf, k)!r}" for k in differ)
        raise ValueError(
            f"model: does not describe {key}={directory} ({directory / 'config.json'}): {listed}. "
            f"Set these keys; the model: section that matches is:\n{model_section(hf, keep_from=job)}"
        )
    if job.max_seq_len > hf.max_seq_len:
        raise ValueError(
            f"model.max_seq_len={job.max_seq_len} is beyond {key}={directory}'s max_position_embeddings="
            f"{hf.max_seq_len}; set model.max_seq_len <= {hf.max_seq_len}"
        )
