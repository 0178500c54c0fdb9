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
import sys
from pathlib import Path

from checkpoints_tools.errors import add_output_flags, run_tool
from megatron_opd.models.hf.export import DTYPE_NAMES, torch_dtype

def resolve_naming(naming: str) -> str:
    if naming != "auto":
        return naming
    from megatron_opd.models.gpt import transformer_engine_available

    return "te" if transformer_engine_available() else "local"


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
    from checkpoints_tools.progress import bytes_on_disk, counting
    from checkpoints_tools.staging import Arena
    from megatron_opd.models.hf.hf_dir import copy_side_files
    from megatron_opd.models.hf.load import check_hf_tensors, open_hf_model
    from megatron_opd.models.hf.manifest import check_manifest, write_manifest
    from megatron_opd.models.hf.mapping import bind
    from megatron_opd.models.hf.megatron_io import (
        HF_SIDE_DIR,
        model_structure,
        sharded_pieces,
        write_checkpoint,
        write_model_yaml,
    )
    from megatron_opd.models.hf.output import claim_output
    from megatron_opd.runtime.checkpoint import step_dir
    from megatron_opd.runtime.layout import ParallelLayout

    output = claim_output(output_dir, [input_dir], overwrite)
    check_manifest(Path(input_dir))
    source = open_hf_model(input_dir, arch=arch, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    hf, architecture, cfg = source.checkpoint, source.architecture, source.cfg
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
    from megatron_opd.models.hf.errors import CheckpointError

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
    raise CheckpointError(f"--source {args.source} --target {args.target}: nothing to convert")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: _convert(args))

if __name__ == "__main__":
    sys.exit(main())
