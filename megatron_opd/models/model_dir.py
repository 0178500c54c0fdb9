"""The model directory: what a stage leaves behind so that anyone can load the model again.

    <dir>/model.yaml        the ModelConfig
    <dir>/tokenizer.json    the character tokenizer (data/tokenizer.py: `load_tokenizer` reads it
                            back; its fingerprint proves compatibility)
    <dir>/hf/               a Hugging Face tokenizer's files instead (tokenizer.json,
                            tokenizer_config.json, chat template, generation_config.json: the
                            files data/hf_tokenizer.py TOKENIZER_FILES names), where a converted
                            model keeps them beside its original config.json, and from where an
                            export copies them beside the weights
    <dir>/checkpoints/step_NNNNNNNN/   megatron dist checkpoints (runtime.checkpoint)

Teacher servers, rollout servers, conversion tools and later stages all load models this way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from megatron_opd.config import load_config, to_dict
from megatron_opd.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_home
from megatron_opd.models.config import ModelConfig
from megatron_opd.runtime.checkpoint import latest_complete


# Where a model directory keeps a Hugging Face tokenizer (models/hf/megatron_io.py HF_SIDE_DIR).
HF_TOKENIZER_DIR = "hf"


@dataclass(frozen=True)
class ModelDir:
    path: Path
    model: ModelConfig
    tokenizer: Tokenizer | None  # None: the directory holds no tokenizer

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def latest_checkpoint(self) -> Path:
        ckpt = latest_complete(self.checkpoints)
        if ckpt is None:
            raise FileNotFoundError(
                f"{self.path} holds no complete checkpoint under checkpoints/; train the model first "
                f"or point at the run directory that holds it"
            )
        return ckpt


def write_model_dir(directory: str | os.PathLike, model: ModelConfig, tokenizer: Tokenizer) -> ModelDir:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.yaml").write_text(yaml.safe_dump(to_dict(model), sort_keys=False))
    tokenizer.save(path / HF_TOKENIZER_DIR if tokenizer.describe().kind == "hf" else path)
    return ModelDir(path, model, tokenizer)


def read_model_dir(directory: str | os.PathLike) -> ModelDir:
    path = Path(directory)
    if not (path / "model.yaml").is_file():
        raise FileNotFoundError(f"{path} is not a model directory: model.yaml is missing")
    model = load_config(path / "model.yaml", cls=ModelConfig)
    tokenizer = load_tokenizer(path) if tokenizer_home(path) is not None else None
    return ModelDir(path, model, tokenizer)

