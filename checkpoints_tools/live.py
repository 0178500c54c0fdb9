"""HF <-> megatron weights of a live model, in memory: the same mapping tables as the file tools.

The rollout engine's distributed weight sync sends a trainer's weights under their Hugging Face
names (what SGLang's `/update_weights_from_distributed` loads), and our embedded server maps them
back onto its own megatron parameters. Megatron tensors here are full (TP=PP=EP=1) tensors named
as in the model's `state_dict()`; the vocabulary padding of each side is its own.
"""

from __future__ import annotations

import torch

from checkpoints_tools.architectures import infer_architecture
from checkpoints_tools.errors import MissingTensors, ShapeMismatch, name_list
from checkpoints_tools.mapping import Binding, bind
from megatron_opd.models.config import ModelConfig


def bindings_for(cfg: ModelConfig, megatron_shapes: dict[str, tuple[int, ...]]) -> list[Binding]:
    architecture = infer_architecture(cfg)
    return bind(architecture.name, architecture.rules, megatron_shapes, cfg)


def hf_from_megatron(cfg: ModelConfig, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full megatron tensors -> {HF name: tensor} (padding rows dropped), in the bindings' order."""
    out: dict[str, torch.Tensor] = {}
    for b in bindings_for(cfg, {n: tuple(t.shape) for n, t in full.items()}):
        source = full[b.megatron_name]
        pieces = [source.new_empty(shape) for shape in b.hf_shapes]
        for row, block in b.row_blocks():
            pieces[block.src][block.start : block.stop] = source[row : row + block.rows]
        out.update(zip(b.hf_names, pieces))
    return out


def megatron_from_hf(
    cfg: ModelConfig, megatron_shapes: dict[str, tuple[int, ...]], hf: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """{HF name: tensor} -> full megatron tensors of the given shapes (padding rows zero).
    Every HF tensor the model needs must be there, with its expected shape."""
    bindings = bindings_for(cfg, megatron_shapes)
    missing = [n for b in bindings for n in b.hf_names if n not in hf]
    if missing:
        raise MissingTensors(f"the update lacks Hugging Face tensors {name_list(missing)}")
    out = {}
    for b in bindings:
        for name, shape in zip(b.hf_names, b.hf_shapes):
            if tuple(hf[name].shape) != tuple(shape):
                raise ShapeMismatch(f"{name}: the update has shape {tuple(hf[name].shape)}, the model needs {shape}")
        first = hf[b.hf_names[0]]
        target = torch.zeros(b.megatron_shape, dtype=first.dtype, device=first.device)
        for row, block in b.row_blocks():
            target[row : row + block.rows] = hf[b.hf_names[block.src]][block.start : block.stop]
        out[b.megatron_name] = target
    return out
