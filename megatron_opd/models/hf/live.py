"""HF <-> megatron weights of a live model, in memory: the same mapping tables as the file conversions.

The rollout engine's distributed weight sync sends a trainer's weights under their Hugging Face
names (what SGLang's `/update_weights_from_distributed` loads), and our embedded server maps them
back onto its own megatron parameters; load.py builds a model's weights from an HF directory.
Megatron tensors here are full (TP=PP=EP=1) tensors named as in the model's `state_dict()`; the
vocabulary padding of each side is its own.
"""

from __future__ import annotations

import torch

from megatron_opd.models.config import ModelConfig
from megatron_opd.models.hf.architectures import infer_architecture
from megatron_opd.models.hf.errors import MissingTensors, ShapeMismatch, name_list
from megatron_opd.models.hf.mapping import Binding, bind


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
        out[b.megatron_name] = assemble(b, [hf[n] for n in b.hf_names])
    return out


def assemble(binding: Binding, hf_tensors: list[torch.Tensor]) -> torch.Tensor:
    """One full megatron tensor from its HF tensors (in binding.hf_names order; padding rows zero),
    on the device and in the dtype of the first."""
    first = hf_tensors[0]
    target = torch.zeros(binding.megatron_shape, dtype=first.dtype, device=first.device)
    for row, block in binding.row_blocks():
        target[row : row + block.rows] = hf_tensors[block.src][block.start : block.stop]
    return target
