"""Export a megatron model (a trained student or teacher) to Hugging Face format: SGLang, transformers, release.

    python -m checkpoints_tools.export --input MODEL_DIR_OR_STEP_DIR --output HF_DIR [--arch qwen3] [--dtype bf16]

Writes HF_DIR/config.json, model-0000i-of-0000N.safetensors, model.safetensors.index.json, the
tokenizer files and manifest.json (sha256 per file). The architecture is --arch, else the
original HF one of an imported model, else the one that expresses model.yaml exactly; the
config.json is the original one while model.yaml still matches it. This is the command line of
megatron_opd.models.hf.export.megatron_to_hf (the rollout engine's disk sync calls it too),
whose docstring has the details; see docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from checkpoints_tools.errors import add_output_flags, run_tool
from megatron_opd.models.hf.export import DTYPE_NAMES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m checkpoints_tools.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--input", required=True, help="a model directory (model.yaml + checkpoints/) or one step_* directory"
    )
    p.add_argument(
        "--output", required=True, help="the Hugging Face directory to write (empty unless --overwrite)"
    )
    p.add_argument("--arch", help="llama, qwen2, qwen3, qwen3_moe or deepseek_v3 (default: see above)")
    p.add_argument(
        "--dtype", choices=sorted(DTYPE_NAMES), help="cast weights (default: keep the stored dtype)"
    )
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--model-config", help="model.yaml, when --input is a bare step_* directory")
    add_output_flags(p)
    return p


def export_from_args(args: argparse.Namespace) -> Path:
    from checkpoints_tools.progress import reporting
    from megatron_opd.models.hf.export import megatron_to_hf
    from megatron_opd.models.hf.hf_dir import parse_size

    with reporting(not args.no_progress, "writing safetensors") as update:
        return megatron_to_hf(
            args.input,
            args.output,
            arch=args.arch,
            dtype=args.dtype,
            max_shard_bytes=parse_size(args.max_shard_size),
            model_config=args.model_config,
            overwrite=args.overwrite,
            on_progress=update,
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: export_from_args(args))


if __name__ == "__main__":
    sys.exit(main())
