"""Convert checkpoints between Hugging Face format and megatron dist checkpoints.

    python -m checkpoints_tools.convert --source hf --target megatron --input HF_DIR --output MODEL_DIR [--tp N]
    python -m checkpoints_tools.convert --source megatron --target hf --input MODEL_DIR --output HF_DIR

HF -> megatron writes a model directory (megatron_opd.models.model_dir):

    MODEL_DIR/model.yaml                      ModelConfig translated from config.json
    MODEL_DIR/checkpoints/step_00000000/      torch_dist checkpoint (COMPLETE), loads under any TP/PP/EP
    MODEL_DIR/hf/                             the original config.json, tokenizer and generation files,
                                              which export puts back beside the weights
    MODEL_DIR/manifest.json                   sha256 of every file

Streaming: HF tensors are memory-mapped from the safetensors files and handed to megatron's
writer as they are (QKV heads, gate/up halves and experts are separate pieces of the global
tensor, no concatenation); only tensors that must be computed (vocabulary padding, --dtype
casts) go through a file-backed scratch arena. Resident memory therefore stays far below the
model size; the cost is page cache and, for computed tensors, scratch disk.

`--tp` only sets the vocabulary padding (megatron pads to make_vocab_size_divisible_by * TP);
everything else in a dist checkpoint is layout independent. megatron -> HF is the export
(see export.py, which this delegates to).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import warnings
from pathlib import Path

from checkpoints_tools.errors import add_output_flags, run_tool

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, DTYPE_NAMES[name])


def resolve_naming(naming: str) -> str:
    if naming != "auto":
        return naming
    from megatron_opd.models.gpt import transformer_engine_available

    return "te" if transformer_engine_available() else "local"


def check_hf_tensors(hf, bindings, arch, cfg) -> None:
    """Every HF tensor the model needs is there with the right shape, and nothing else is."""
    from checkpoints_tools.errors import MissingTensors, ShapeMismatch, UnexpectedTensors, name_list

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


def hf_to_megatron(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    tp: int = 1,
    arch: str | None = None,
    dtype: str | None = None,
    naming: str = "auto",
    make_vocab_size_divisible_by: int = 128,
    step: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a Hugging Face model directory into a megatron model directory; returns the step dir."""
    from checkpoints_tools.architectures import (
        architecture_of_hf_config,
        get_architecture,
        model_config_from_hf,
    )
    from checkpoints_tools.hf_io import HFCheckpoint, copy_side_files
    from checkpoints_tools.manifest import check_manifest, write_manifest
    from checkpoints_tools.mapping import bind
    from checkpoints_tools.megatron_io import (
        HF_SIDE_DIR,
        model_structure,
        sharded_pieces,
        write_checkpoint,
        write_model_yaml,
    )
    from checkpoints_tools.output import claim_output
    from checkpoints_tools.progress import bytes_on_disk, counting
    from checkpoints_tools.staging import Arena
    from megatron_opd.runtime.checkpoint import step_dir
    from megatron_opd.runtime.layout import ParallelLayout

    output = claim_output(output_dir, [input_dir], overwrite)
    check_manifest(Path(input_dir))
    hf = HFCheckpoint(input_dir)
    architecture = get_architecture(arch) if arch else architecture_of_hf_config(hf.config)
    cfg = model_config_from_hf(architecture, hf.config)
    cfg = dataclasses.replace(cfg, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    ParallelLayout(tp=tp, sequence_parallel=cfg.is_moe).check_model(
        num_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.query_groups,
        num_experts=cfg.num_experts or None,
    )
    naming = resolve_naming(naming)
    structure = model_structure(cfg, vocab_tp=tp, naming=naming)
    slots = structure.slots
    bindings = bind(architecture.name, architecture.rules, {n: s.shape for n, s in slots.items()}, cfg)
    check_hf_tensors(hf, bindings, architecture, cfg)

    want = torch_dtype(dtype)
    staged = [
        (slots[b.megatron_name].shape, want or hf.info(b.hf_names[0]).dtype)
        for b in bindings
        if not _direct(hf, b, want)
    ]
    sharded, total = [], 0
    with output.writing() as out:
        with Arena(out / ".staging", Arena.bytes_for(staged)) as arena:
            with counting(progress, "mapping tensors", len(bindings)) as advance:
                for b in bindings:
                    pieces = _pieces(hf, b, slots[b.megatron_name], want, arena)
                    sharded += sharded_pieces(
                        dataclasses.replace(slots[b.megatron_name], dtype=pieces[0].dtype), pieces
                    )
                    total += sum(p.numel() * p.element_size() for p in pieces)
                    advance()
            root = out / "checkpoints"
            with bytes_on_disk(progress, "writing megatron checkpoint", step_dir(root, step), total):
                write_checkpoint(
                    root,
                    step,
                    sharded,
                    structure.objects,
                    common={
                        "converted_from": str(Path(input_dir).resolve()),
                        "hf_architecture": architecture.name,
                    },
                )
        del sharded
        write_model_yaml(out, cfg)
        copy_side_files(hf.side_files(), out / HF_SIDE_DIR)
        _keep_char_tokenizer(hf.path, out)
        write_manifest(
            out,
            "checkpoints_tools.convert",
            {
                "source": "hf",
                "target": "megatron",
                "input": str(Path(input_dir).resolve()),
                "architecture": architecture.name,
                "vocab_padding_tp": tp,
                "naming": naming,
                "dtype": dtype or "as stored",
            },
        )
    return step_dir(output.path / "checkpoints", step)


def _direct(hf, binding, want) -> bool:
    dtype = want or hf.info(binding.hf_names[0]).dtype
    return binding.uniform and all(hf.info(n).dtype == dtype for n in binding.hf_names)


def _pieces(hf, binding, slot, want, arena):
    """The megatron tensor as equal row pieces: the HF files' own bytes when the layout allows,
    else one tensor assembled (padded, cast) in the file-backed arena."""
    dtype = want or hf.info(binding.hf_names[0]).dtype
    if _direct(hf, binding, want):
        return [hf.rows(binding.hf_names[blk.src], blk.start, blk.stop) for blk in binding.blocks]
    full = arena.zeros(slot.shape, dtype)
    for row, blk in binding.row_blocks():
        full[row : row + blk.rows].copy_(hf.rows(binding.hf_names[blk.src], blk.start, blk.stop))
    return [full]


def _keep_char_tokenizer(hf_dir: Path, out: Path) -> None:
    """A model of ours round-tripped through HF keeps its character tokenizer where model_dir reads it."""
    import shutil

    src = hf_dir / "tokenizer.json"
    if src.is_file():
        try:
            if json.loads(src.read_text()).get("type") == "char":
                shutil.copy2(src, out / "tokenizer.json")
        except (json.JSONDecodeError, AttributeError):
            pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m checkpoints_tools.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--source", choices=("hf", "megatron"), required=True)
    p.add_argument("--target", choices=("hf", "megatron"), required=True)
    p.add_argument(
        "--input", required=True, help="HF model directory, or a megatron model/checkpoint directory"
    )
    p.add_argument("--output", required=True, help="output directory (must be empty unless --overwrite)")
    p.add_argument("--arch", help="architecture (default: from config.json / the model config)")
    p.add_argument(
        "--tp", type=int, default=1, help="hf->megatron: TP size whose vocabulary padding to write"
    )
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument(
        "--dtype", choices=sorted(DTYPE_NAMES), help="cast weights (default: keep the stored dtype)"
    )
    p.add_argument(
        "--naming",
        choices=("auto", "local", "te"),
        default="auto",
        help="hf->megatron: checkpoint key names of the target layer spec (auto: te where Transformer Engine imports)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="megatron->hf: safetensors shard size")
    p.add_argument("--model-config", help="megatron->hf: model.yaml, when --input is a bare step_* directory")
    add_output_flags(p)
    return p


def _convert(args: argparse.Namespace) -> Path:
    from checkpoints_tools.errors import CheckpointToolError

    if (args.source, args.target) == ("hf", "megatron"):
        return hf_to_megatron(
            args.input,
            args.output,
            tp=args.tp,
            arch=args.arch,
            dtype=args.dtype,
            naming=args.naming,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    if (args.source, args.target) == ("megatron", "hf"):
        from checkpoints_tools.export import export_from_args

        return export_from_args(args)
    raise CheckpointToolError(f"--source {args.source} --target {args.target}: nothing to convert")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: _convert(args))

if __name__ == "__main__":
    sys.exit(main())
