"""Reshard a megatron checkpoint for another tensor / pipeline / expert parallel layout.

    python -m checkpoints_tools.reshard --input MODEL_DIR --output MODEL_DIR2 --tp 2 [--pp 2] [--ep 4] [--verify]

What a layout change needs, and what this does about each point:

- A torch_dist checkpoint stores *global* tensors under layout-free keys; megatron reshards TP,
  PP and EP while loading (runtime.checkpoint.load_checkpoint under the new layout). The
  weights need no rewriting for that, and this tool does not pretend otherwise.
- The vocabulary is padded to make_vocab_size_divisible_by * TP rows. megatron tolerates a
  mismatch on load (embedding and output layer allow a shape mismatch: zero-filled, overlap
  loaded); reshard stores the target TP's padding anyway, so that the checkpoint's shapes are
  the model's (rows past vocab_size are padding: kept while they fit, zero when new).
- Norm keys differ between the local and Transformer Engine layer specs in MoE and MLA layers
  (megatron_io.te_key), a real incompatibility: --naming writes the target spec's keys.
- The layout must fit the model (heads, query groups, layers and experts divisible; MoE with
  TP needs sequence parallelism): checked before anything is written.
- --verify loads the result in a local world of the target layout (tp * pp * ep ranks) with
  load_checkpoint and runs a forward pass (PP=1): the proof that the layout works.

The output is a model directory (model.yaml, tokenizer files and hf/ copied) whose checkpoint
keeps the source's step and common state (scheduler, data cursors). Model weights only: the
optimizer state is not carried over. Streaming: tensors are read region by region into a
file-backed arena and megatron writes from there.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

from checkpoints_tools.errors import add_output_flags, run_tool

from checkpoints_tools.convert import resolve_naming

READ_BATCH_BYTES = 1 << 28  # one region read covers at most ~256 MB of tensors


def copy_model_files(model_dir: Path | None, out: Path) -> None:
    """model.yaml, tokenizer.json and hf/ travel with the weights."""
    from megatron_opd.models.hf.megatron_io import HF_SIDE_DIR

    if model_dir is None:
        return
    for name in ("model.yaml", "tokenizer.json"):
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / name)
    if (model_dir / HF_SIDE_DIR).is_dir():
        shutil.copytree(model_dir / HF_SIDE_DIR, out / HF_SIDE_DIR, dirs_exist_ok=True)


def target_layout(cfg, tp: int, pp: int, ep: int):
    """The ParallelLayout for (tp, pp, ep) on the smallest world that has it, checked against the model."""
    from megatron_opd.models.hf.errors import UnsupportedConfig
    from megatron_opd.runtime.layout import LayoutError, ParallelLayout

    layout = ParallelLayout(tp=tp, pp=pp, ep=ep, sequence_parallel=cfg.is_moe and tp > 1)
    try:
        resolved = layout.resolve(tp * pp * ep)
        cfg.check(resolved)
    except (LayoutError, ValueError) as e:
        raise UnsupportedConfig(f"layout tp={tp} pp={pp} ep={ep} does not fit the model: {e}") from None
    return resolved


def reshard(
    input_path: str | Path,
    output_dir: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    naming: str = "auto",
    model_config: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a checkpoint of `input_path`'s model for the target layout; returns the new step dir."""
    from megatron.core import dist_checkpointing

    from checkpoints_tools.progress import bytes_on_disk, counting
    from checkpoints_tools.staging import Arena
    from megatron_opd.models.hf.manifest import write_manifest
    from megatron_opd.models.hf.megatron_io import (
        block_region,
        init_single_process,
        model_slots,
        model_structure,
        naming_corruption,
        open_megatron,
        read_regions,
        resolve_keys,
        row_batches,
        sharded_pieces,
        stored_tensors,
        write_checkpoint,
    )
    from megatron_opd.models.hf.output import claim_output
    from megatron_opd.runtime.checkpoint import checkpoint_step, step_dir

    model = open_megatron(input_path, model_config)
    output = claim_output(output_dir, [input_path, *model.read_paths], overwrite)
    model.check_manifest()
    cfg = model.cfg
    target_layout(cfg, tp, pp, ep)
    init_single_process()
    source = resolve_keys(cfg, model_slots(cfg), stored_tensors(model.step_dir), model.step_dir)
    naming = resolve_naming(naming)
    target = model_structure(cfg, vocab_tp=tp, naming=naming)
    target_slots = {
        name: dataclasses.replace(slot, dtype=source[name].dtype) for name, slot in target.slots.items()
    }

    with naming_corruption(model.step_dir):
        common = dict(dist_checkpointing.load_common_state_dict(str(model.step_dir)).get("common") or {})
    common.pop("layout", None)
    common.pop("step", None)
    common["resharded_from"] = str(model.step_dir.resolve())
    step = checkpoint_step(model.step_dir)
    with output.writing() as out:
        with Arena(
            out / ".staging", Arena.bytes_for((dst.shape, dst.dtype) for dst in target_slots.values())
        ) as arena:
            dests = {name: arena.zeros(dst.shape, dst.dtype) for name, dst in target_slots.items()}
            # Vocabulary rows past vocab_size are padding: kept while they fit, zero when new.
            readable = {
                name: dataclasses.replace(
                    source[name], shape=(min(source[name].shape[0], dst.shape[0]), *dst.shape[1:])
                )
                for name, dst in target_slots.items()
            }
            batches = row_batches(readable, READ_BATCH_BYTES)
            with counting(progress, "reading tensors", sum(map(len, batches))) as advance:
                for batch in batches:
                    read_regions(
                        model.step_dir,
                        [block_region(source[n], r, dests[n][r : r + rows]) for n, r, rows in batch],
                    )
                    advance(len(batch))
            sharded = [t for name, dst in target_slots.items() for t in sharded_pieces(dst, [dests[name]])]
            total = sum(dst.nbytes for dst in target_slots.values())
            root = out / "checkpoints"
            with bytes_on_disk(progress, "writing megatron checkpoint", step_dir(root, step), total):
                write_checkpoint(root, step, sharded, target.objects, common=common)
        del sharded
        copy_model_files(model.model_dir, out)
        if model.model_dir is None:
            from megatron_opd.models.hf.megatron_io import write_model_yaml

            write_model_yaml(out, cfg)
        write_manifest(
            out,
            "checkpoints_tools.reshard",
            {"input": str(model.step_dir.resolve()), "layout": {"tp": tp, "pp": pp, "ep": ep}, "naming": naming},
        )
    return step_dir(output.path / "checkpoints", step)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m checkpoints_tools.reshard",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", required=True, help="a model directory or one step_* directory")
    p.add_argument("--output", required=True, help="the model directory to write (empty unless --overwrite)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--naming", choices=("auto", "local", "te"), default="auto")
    p.add_argument("--model-config", help="model.yaml, when --input is a bare step_* directory")
    p.add_argument(
        "--verify", action="store_true", help="load the result in a local world of the target layout"
    )
    add_output_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status = run_tool(
        lambda: reshard(
            args.input,
            args.output,
            tp=args.tp,
            pp=args.pp,
            ep=args.ep,
            naming=args.naming,
            model_config=args.model_config,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    )
    if status == 0 and args.verify:
        from checkpoints_tools.verify import verify_in_world

        from megatron_opd.models.hf.megatron_io import open_megatron

        layout = target_layout(open_megatron(args.output).cfg, args.tp, args.pp, args.ep)
        world = args.tp * args.pp * args.ep
        fields = {
            "tp": layout.tp,
            "pp": layout.pp,
            "ep": layout.ep,
            "sequence_parallel": layout.sequence_parallel,
        }
        logits = verify_in_world(args.output, fields, [[0, 1, 2, 3]], world)
        print(
            f"verified: loaded under tp={args.tp} pp={args.pp} ep={args.ep} on {world} ranks"
            + (
                f", logits {tuple(logits.shape)} finite={bool(logits.isfinite().all())}"
                if logits is not None
                else ""
            )
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
