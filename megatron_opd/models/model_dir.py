"""The model directory: what a stage leaves behind so that anyone can load the model again.

Two formats are model directories:

    megatron (what a stage writes)
    <dir>/model.yaml        the ModelConfig
    <dir>/tokenizer.json    the character tokenizer (data/tokenizer.py: `load_tokenizer` reads it
                            back; its fingerprint proves compatibility)
    <dir>/hf/               the Hugging Face files of the model it started from (config.json,
                            generation config) and a Hugging Face tokenizer's files instead of
                            tokenizer.json (tokenizer.json, tokenizer_config.json, chat template,
                            generation_config.json: data/hf_tokenizer.py TOKENIZER_FILES): a release
                            (train.export_hf) puts them back beside the exported weights
    <dir>/checkpoints/step_NNNNNNNN/   megatron dist checkpoints (runtime.checkpoint)

    Hugging Face (what a hub download or an export is)
    <dir>/config.json       the ModelConfig is translated from it (models/hf/config_json.py)
    <dir>/*.safetensors     the weights, converted in memory when loaded (models/hf/load.py)
    <dir>/tokenizer files   the tokenizer

Teacher servers, rollout servers, in-job teachers, `train.init_from`, conversion tools and later
stages all load models this way: `read_model_dir` for the config and tokenizer,
`load_model_dir_weights` for the weights under the current parallel layout, `ModelDir.weights_id`
for the identity of what was loaded (a teacher server reports it, the teacher pool compares it).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import yaml

from megatron_opd.config import load_config, to_dict
from megatron_opd.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_home
from megatron_opd.models.config import ModelConfig
from megatron_opd.models.hf.config_json import (
    HF_SIDE_DIR,
    check_model_agrees,
    hf_model_config,
    is_hf_model_dir,
    side_files,
)
from megatron_opd.runtime.checkpoint import latest_complete


# Where a model directory keeps a Hugging Face tokenizer (models/hf/megatron_io.py HF_SIDE_DIR).
HF_TOKENIZER_DIR = HF_SIDE_DIR


@dataclass(frozen=True)
class ModelDir:
    path: Path
    model: ModelConfig
    tokenizer: Tokenizer | None  # None: no tokenizer files (an imported model keeps them in hf/)
    format: Literal["megatron", "hf"] = "megatron"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def latest_checkpoint(self) -> Path:
        """What holds the weights: the newest complete checkpoint, or an HF directory itself."""
        if self.format == "hf":
            return self.path
        ckpt = latest_complete(self.checkpoints)
        if ckpt is None:
            raise FileNotFoundError(
                f"{self.path} holds no complete checkpoint under checkpoints/; train the model first "
                f"or point at the run directory that holds it"
            )
        return ckpt

    def weights_id(self, checkpoint: str | os.PathLike | None = None) -> str | None:
        """The id of the weights `load_model_dir_weights` loads (`weights_id_of` the newest
        checkpoint, or of `checkpoint`)."""
        return weights_id_of(checkpoint or self.latest_checkpoint())


def weights_id_of(weights: str | os.PathLike) -> str | None:
    """The id of what holds a model's weights (ModelDir.latest_checkpoint()): a dist checkpoint's
    unique id (None for checkpoints saved before ids), or an HF directory's `hf_weights_id`."""
    if is_hf_model_dir(weights):
        from megatron_opd.models.hf.load import hf_weights_id, open_hf_model

        return hf_weights_id(open_hf_model(weights))
    from megatron_opd.runtime.checkpoint import checkpoint_id

    return checkpoint_id(weights)


def write_model_dir(
    directory: str | os.PathLike, model: ModelConfig, tokenizer: Tokenizer, *, origin: str | os.PathLike = ""
) -> ModelDir:
    """model.yaml and the tokenizer; with `origin` (the model it started from: an HF directory, or
    a megatron model directory that has hf/), its Hugging Face files (config.json, generation
    config, tokenizer files, chat template) under hf/, where a release (stages/release.py) finds
    them. Once: while hf/config.json is there (a resumed run), hf/ is the model it started from;
    files a tokenizer saved into hf/ itself are not replaced. Each file lands whole (os.replace)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.yaml").write_text(yaml.safe_dump(to_dict(model), sort_keys=False))
    tokenizer.save(path / HF_TOKENIZER_DIR if tokenizer.describe().kind == "hf" else path)
    side = path / HF_SIDE_DIR
    files = hf_side_files(origin) if origin and not (side / "config.json").is_file() else []
    if files:
        side.mkdir(exist_ok=True)
        # config.json last: its presence says the copy is complete.
        for f in sorted(files, key=lambda f: f.name == "config.json"):
            if not (side / f.name).exists() or f.name == "config.json":
                partial = side / f".{f.name}.partial"
                shutil.copy2(f, partial)
                os.replace(partial, side / f.name)
    return ModelDir(path, model, tokenizer)


def model_dir_of(path: str | os.PathLike) -> Path:
    """The model directory a `train.init_from` names: itself, or the one holding a `checkpoints/`
    root or one `checkpoints/step_N` given instead."""
    path = Path(path)
    if path.name.startswith("step_") and path.parent.name == "checkpoints":
        return path.parent.parent
    return path.parent if path.name == "checkpoints" else path


def hf_side_files(origin: str | os.PathLike) -> list[Path]:
    """The Hugging Face files (no weights) of `origin`: an HF directory's own, or the hf/ of a
    megatron model directory (and [] for a model of ours without one)."""
    origin = model_dir_of(origin)
    source = origin if is_hf_model_dir(origin) else origin / HF_SIDE_DIR
    return side_files(source) if source.is_dir() else []


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def read_model_dir(directory: str | os.PathLike) -> ModelDir:
    """A megatron model directory (model.yaml) or a Hugging Face one (config.json + safetensors)."""
    path = Path(directory)
    if is_hf_model_dir(path):
        tokenizer = load_tokenizer(path) if _has_tokenizer(path) else None
        return ModelDir(path, hf_model_config(path), tokenizer, format="hf")
    if not (path / "model.yaml").is_file():
        raise FileNotFoundError(
            f"{path} is not a model directory: neither model.yaml (megatron) nor config.json (Hugging Face) is there"
        )
    model = load_config(path / "model.yaml", cls=ModelConfig)
    tokenizer = load_tokenizer(path) if tokenizer_home(path) is not None else None
    return ModelDir(path, model, tokenizer)


def load_model_dir_weights(
    model_dir: str | os.PathLike | ModelDir,
    chunks: Sequence,
    *,
    checkpoint: str | os.PathLike | None = None,
    model_config: ModelConfig | None = None,
) -> str | None:
    """Load a model directory's weights into `chunks` (this rank's model chunks, bare GPTModels or
    wrapped in megatron DDP) under the current megatron parallel state; returns `weights_id`.

    megatron: `checkpoint` (default the newest complete one), resharded to this layout by
    megatron's dist checkpointing (model only: no optimizer, no RNG). Hugging Face: converted in
    memory through the name tables (models/hf/load.py), any TP/PP/EP. `model_config`: the config
    the chunks were built from; for an HF directory it must describe config.json's architecture.
    Collective: every rank of the world calls it.
    """
    mdir = model_dir if isinstance(model_dir, ModelDir) else read_model_dir(model_dir)
    bare = [getattr(c, "module", c) for c in chunks]
    if mdir.format == "hf":
        from megatron_opd.models.hf.load import hf_weights_id, open_hf_model, rank_state_dict

        if model_config is not None:
            check_model_agrees(model_config, mdir.path, "the model directory")
        hf = open_hf_model(mdir.path, make_vocab_size_divisible_by=(model_config or mdir.model).make_vocab_size_divisible_by)
        for chunk in bare:
            missing, unexpected = chunk.load_state_dict(rank_state_dict(hf, chunk), strict=False)
            missing = [k for k in missing if not k.endswith("_extra_state")]
            if missing or unexpected:  # rank_state_dict covers every parameter: this is a bug
                raise RuntimeError(f"loading {mdir.path}: parameters not loaded {missing}, unknown {unexpected}")
        return hf_weights_id(hf)
    from megatron_opd.runtime.checkpoint import load_checkpoint

    ckpt = Path(checkpoint) if checkpoint else mdir.latest_checkpoint()
    load_checkpoint(ckpt, bare, None, load_rng=False)
    return mdir.weights_id(ckpt)
