"""A Hugging Face model directory (config.json + safetensors) as megatron weights, in memory.

    hf = open_hf_model(HF_DIR)                      # config.json -> ModelConfig; tensors mapped, not read
    model = build_gpt_model(hf.cfg, layout)         # under the job's layout (TP only: PP = EP = 1)
    missing, unexpected = model.load_state_dict(
        rank_state_dict(hf, model, tp_rank=r, tp_size=t), strict=False)   # missing: _extra_state only

`rank_state_dict` goes through the same tables as the file conversion (architectures.py,
mapping.py): for each parameter of `model` it assembles the full TP=1 megatron tensor from the
memory-mapped HF tensors (live.assemble) and keeps rank r's part (full_weights.tp_shard, the
inverse of the gather the weight sync uses). One full tensor is alive at a time, so memory is
the rank's shard plus the largest parameter. `check_hf_tensors` is the check both paths make:
every tensor the model needs is there with its shape, and nothing unexplained is left over.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_opd.models.config import ModelConfig
from megatron_opd.models.hf.architectures import (
    Architecture,
    architecture_of_hf_config,
    get_architecture,
    model_config_from_hf,
)
from megatron_opd.models.hf.errors import MissingTensors, ShapeMismatch, UnexpectedTensors, name_list
from megatron_opd.models.hf.hf_dir import HFCheckpoint
from megatron_opd.models.hf.mapping import Binding, bind


@dataclass(frozen=True)
class HFModel:
    checkpoint: HFCheckpoint  # the directory, its config.json and its (mapped) tensors
    architecture: Architecture
    cfg: ModelConfig  # translated from config.json

    @property
    def path(self) -> Path:
        return self.checkpoint.path


def open_hf_model(
    directory: str | Path, *, arch: str | None = None, make_vocab_size_divisible_by: int = 128
) -> HFModel:
    """Read config.json and the safetensors headers. `arch` overrides config.json's model_type."""
    checkpoint = HFCheckpoint(directory)
    architecture = get_architecture(arch) if arch else architecture_of_hf_config(checkpoint.config)
    cfg = model_config_from_hf(architecture, checkpoint.config)
    cfg = dataclasses.replace(cfg, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    return HFModel(checkpoint, architecture, cfg)


def check_hf_tensors(hf: HFCheckpoint, bindings: list[Binding], arch: Architecture, cfg: ModelConfig) -> None:
    """Every HF tensor the model needs is there with the right shape, and nothing else is."""
    required = {n: s for b in bindings for n, s in zip(b.hf_names, b.hf_shapes)}
    present = set(hf.names())
    missing = sorted(set(required) - present)
    if missing:
        raise MissingTensors(
            f"{hf.path} lacks tensors that a {arch.name} model with this config.json has: {name_list(missing)}"
        )
    skipped = {n for n in present - set(required) if any(re.fullmatch(p, n) for p in arch.ignore)}
    if cfg.tie_embeddings and "lm_head.weight" in present:
        skipped.add("lm_head.weight")  # tied: the embedding is the output layer
    extra_layers = {
        n
        for n in present - set(required)
        if (m := re.match(r"model\.layers\.(\d+)\.", n)) and int(m.group(1)) >= cfg.num_layers
    }
    if extra_layers and hf.config.get("num_nextn_predict_layers"):
        warnings.warn(
            f"skipping {len(extra_layers)} tensors of the multi-token-prediction layers "
            f"(model.layers.{cfg.num_layers}+): the megatron model is built without MTP"
        )
        skipped |= extra_layers
    unexpected = sorted(present - set(required) - skipped)
    if unexpected:
        hint = ""
        if any(n.endswith("weight_scale_inv") for n in unexpected):
            hint = " (FP8 block-quantized weights: dequantize the checkpoint to bf16 first)"
        raise UnexpectedTensors(
            f"{hf.path} has tensors a {arch.name} model with this config.json does not: {name_list(unexpected)}{hint}"
        )
    wrong = [
        f"{n}: file has {list(hf.info(n).shape)}, the megatron model needs {list(s)}"
        for n, s in required.items()
        if tuple(hf.info(n).shape) != tuple(s)
    ]
    if wrong:
        raise ShapeMismatch(f"{hf.path}: shape mismatch for " + "; ".join(wrong[:12]))


def _full_shape(param: torch.nn.Parameter, tp_size: int) -> tuple[int, ...]:
    shape = list(param.shape)
    if tp_size > 1 and getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return tuple(shape)


def rank_state_dict(hf: HFModel, model: torch.nn.Module, *, tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    """{parameter name: tensor of this rank's shape} for `model`, built from `hf.cfg` on TP rank
    `tp_rank` of `tp_size` (PP = EP = 1), in the HF files' dtype (load_state_dict casts).

    Errors name what does not fit: HF tensors missing, unexpected or of another shape, and
    megatron parameters the architecture has no rule for.
    """
    from megatron.core import parallel_state

    from megatron_opd.models.full_weights import tp_shard
    from megatron_opd.models.hf.live import assemble

    if parallel_state.model_parallel_is_initialized() and (
        parallel_state.get_pipeline_model_parallel_world_size() > 1
        or parallel_state.get_expert_model_parallel_world_size() > 1
    ):
        raise NotImplementedError(
            "loading Hugging Face weights in memory needs parallel.pp=1 and parallel.ep=1 "
            "(convert the directory with checkpoints_tools.convert for other layouts)"
        )
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} is not a rank of tp_size {tp_size}")
    params = dict(model.named_parameters())
    arch, files = hf.architecture, hf.checkpoint
    bindings = bind(arch.name, arch.rules, {n: _full_shape(p, tp_size) for n, p in params.items()}, hf.cfg)
    check_hf_tensors(files, bindings, arch, hf.cfg)
    out = {}
    for b in bindings:
        full = assemble(b, [files.tensor(n) for n in b.hf_names])
        part = tp_shard(b.megatron_name, params[b.megatron_name], full, tp_rank, tp_size)
        out[b.megatron_name] = part if part is full else part.clone()  # a view would keep `full` alive
    return out
