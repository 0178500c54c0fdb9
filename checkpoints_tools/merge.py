"""Weight-merging baselines: combine several experts into one model, to compare OPD against.

    python -m checkpoints_tools.merge --method uniform --experts A B C --output MERGED
    python -m checkpoints_tools.merge --method task_arithmetic --base BASE --experts A B --weights 0.5 0.3 --output MERGED

    uniform          theta = (1/n) sum_i theta_i
    task_arithmetic  theta = theta_base + sum_i w_i (theta_i - theta_base)   (--weights, or --scale for all)

Inputs are all megatron model directories / checkpoints (same model.yaml) or all Hugging Face
directories (same tensors); the output has the same format, with the model files (model.yaml,
tokenizer, hf/ or config.json and tokenizer files) of the base, else of the first expert, and a
manifest recording method, weights and inputs. Every tensor is combined in float32 and stored
in its input dtype. Streaming: tensor by tensor (megatron: row blocks of at most ~256 MB from
each input into a file-backed arena; HF: one output shard at a time).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from typing import Callable, Sequence

from checkpoints_tools.errors import add_output_flags, run_tool
from megatron_opd.models.hf.errors import (
    CheckpointError,
    MissingTensors,
    ShapeMismatch,
    UnexpectedTensors,
    name_list,
)
from megatron_opd.models.hf.hf_dir import is_hf_model_dir

BLOCK_BYTES = 1 << 28


def coefficients(method: str, n: int, weights: Sequence[float] | None, scale: float | None) -> list[float]:
    if method == "uniform":
        if weights is not None or scale is not None:
            raise CheckpointError(
                "uniform averages the experts equally; --weights/--scale are for task_arithmetic"
            )
        return [1.0 / n] * n
    if method == "task_arithmetic":
        if weights is None and scale is None:
            raise CheckpointError(
                "task_arithmetic needs --weights (one per expert) or --scale (the same for all)"
            )
        if weights is not None and scale is not None:
            raise CheckpointError("pass --weights or --scale, not both")
        w = list(weights) if weights is not None else [scale] * n
        if len(w) != n:
            raise CheckpointError(f"--weights has {len(w)} values for {n} experts")
        return w
    raise CheckpointError(f"unknown merge method {method!r}; choose uniform or task_arithmetic")


def combine(method: str, experts, base, w: list[float]):
    """The merged tensor in float32 from the inputs' tensors (any dtype)."""
    if method == "uniform":
        out = experts[0].float() * w[0]
        for x, wi in zip(experts[1:], w[1:]):
            out += x.float() * wi
        return out
    b = base.float()
    out = b.clone()
    for x, wi in zip(experts, w):
        out += (x.float() - b) * wi
    return out


def merge(
    method: str,
    experts: Sequence[str | Path],
    output_dir: str | Path,
    *,
    base: str | Path | None = None,
    weights: Sequence[float] | None = None,
    scale: float | None = None,
    max_shard_bytes: int = 5 * 10**9,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    experts = [Path(e) for e in experts]
    if not experts:
        raise CheckpointError("no experts to merge")
    if method == "task_arithmetic" and base is None:
        raise CheckpointError("task_arithmetic needs --base (the model the experts were fine-tuned from)")
    if method == "uniform" and base is not None:
        raise CheckpointError("uniform does not use --base")
    w = coefficients(method, len(experts), weights, scale)
    inputs = ([Path(base)] if base else []) + experts
    kinds = {is_hf_model_dir(p) for p in inputs}
    if len(kinds) > 1:
        raise CheckpointError(
            "inputs mix Hugging Face and megatron directories; convert them to one format first"
        )
    from megatron_opd.models.hf.manifest import write_manifest
    from megatron_opd.models.hf.output import claim_output

    if kinds.pop():
        read, write = _merge_hf(method, experts, Path(base) if base else None, w, progress, max_shard_bytes)
    else:
        read, write = _merge_megatron(method, experts, Path(base) if base else None, w, progress)
    output = claim_output(output_dir, [*inputs, *read], overwrite)
    with output.writing() as out:
        write(out)
        write_manifest(
            out,
            "checkpoints_tools.merge",
            {
                "method": method,
                "weights": w,
                "base": str(Path(base).resolve()) if base else None,
                "experts": [str(e.resolve()) for e in experts],
            },
        )
    return output.path


def _merge_megatron(method, experts, base, w, progress: bool) -> tuple[list[Path], Callable[[Path], None]]:
    """Check the inputs; returns the paths it reads and write(out), which merges into `out`."""
    import torch

    from checkpoints_tools.progress import bytes_on_disk, counting
    from checkpoints_tools.reshard import copy_model_files
    from checkpoints_tools.staging import Arena
    from megatron_opd.models.hf.megatron_io import (
        block_region,
        init_single_process,
        model_structure,
        open_megatron,
        read_regions,
        resolve_keys,
        row_batches,
        sharded_pieces,
        stored_tensors,
        write_checkpoint,
    )
    from megatron_opd.runtime.checkpoint import step_dir

    models = [open_megatron(p) for p in ([base] if base else []) + experts]
    cfg = models[0].cfg
    for m in models[1:]:
        if m.cfg != cfg:
            diff = [f for f in vars(cfg) if getattr(cfg, f) != getattr(m.cfg, f)]
            raise CheckpointError(
                f"{m.step_dir} has another model config than {models[0].step_dir}: {', '.join(diff)}"
            )
    init_single_process()
    structure = model_structure(cfg)
    slots = [resolve_keys(cfg, structure.slots, stored_tensors(m.step_dir), m.step_dir) for m in models]
    first = slots[0]
    for m, s in zip(models[1:], slots[1:]):
        for name, slot in first.items():
            if s[name].shape != slot.shape:
                raise ShapeMismatch(
                    f"tensor {slot.key}: {list(slot.shape)} in {models[0].step_dir} "
                    f"but {list(s[name].shape)} in {m.step_dir}"
                )

    def write(out: Path) -> None:
        for m in models:
            m.check_manifest()
        batches = row_batches(first, BLOCK_BYTES)
        with Arena(out / ".staging", Arena.bytes_for((s.shape, s.dtype) for s in first.values())) as arena:
            dests = {name: arena.empty(slot.shape, slot.dtype) for name, slot in first.items()}
            with counting(progress, f"merging ({method})", sum(map(len, batches))) as advance:
                for batch in batches:
                    read = []  # per input: {(name, row): tensor}
                    for m, s in zip(models, slots):
                        got = {
                            (n, r): torch.empty((rows, *s[n].shape[1:]), dtype=s[n].dtype) for n, r, rows in batch
                        }
                        read_regions(m.step_dir, [block_region(s[n], r, got[(n, r)]) for n, r, _ in batch])
                        read.append(got)
                    for name, r, rows in batch:
                        tensors = [got[(name, r)] for got in read]
                        b, ex = (tensors[0], tensors[1:]) if base else (None, tensors)
                        dests[name][r : r + rows].copy_(combine(method, ex, b, w))
                    advance(len(batch))
            sharded = [t for name, slot in first.items() for t in sharded_pieces(slot, [dests[name]])]
            total = sum(slot.nbytes for slot in first.values())
            root = out / "checkpoints"
            with bytes_on_disk(progress, "writing megatron checkpoint", step_dir(root, 0), total):
                write_checkpoint(root, 0, sharded, structure.objects, common={"merged": method, "weights": w})
        del sharded
        copy_model_files(models[0].model_dir, out)

    return [p for m in models for p in m.read_paths], write


def _merge_hf(method, experts, base, w, progress: bool, max_shard_bytes: int) -> tuple[list[Path], Callable[[Path], None]]:
    """Check the inputs; returns the paths it reads and write(out), which merges into `out`."""
    from checkpoints_tools.progress import counting
    from megatron_opd.models.hf.hf_dir import HFCheckpoint, copy_side_files, plan_shards, write_shards
    from megatron_opd.models.hf.manifest import check_manifest

    hfs = [HFCheckpoint(p) for p in ([base] if base else []) + experts]
    ref = hfs[0]
    for h in hfs[1:]:
        missing, extra = set(ref.names()) - set(h.names()), set(h.names()) - set(ref.names())
        if missing:
            raise MissingTensors(f"{h.path} lacks tensors that {ref.path} has: {name_list(missing)}")
        if extra:
            raise UnexpectedTensors(f"{h.path} has tensors that {ref.path} does not: {name_list(extra)}")
        wrong = [n for n in ref.names() if ref.info(n).shape != h.info(n).shape]
        if wrong:
            n = wrong[0]
            raise ShapeMismatch(
                f"tensor {n}: {list(ref.info(n).shape)} in {ref.path} but {list(h.info(n).shape)} in {h.path}"
            )
    shards = plan_shards([(n, ref.info(n).nbytes) for n in ref.names()], max_shard_bytes)

    def load_shard(names):
        merged = {}
        for n in names:
            tensors = [h.tensor(n) for h in hfs]
            b, ex = (tensors[0], tensors[1:]) if base else (None, tensors)
            merged[n] = (
                combine(method, ex, b, w).to(ref.info(n).dtype)
                if ref.info(n).dtype.is_floating_point
                else tensors[0]
            )
        return merged

    def write(out: Path) -> None:
        for h in hfs:
            check_manifest(h.path)
        with counting(progress, f"merging ({method})", len(ref.names())) as advance:
            write_shards(out, shards, load_shard, on_shard=advance)
        copy_side_files(ref.side_files(), out)

    return [h.path for h in hfs], write


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m checkpoints_tools.merge",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", choices=("uniform", "task_arithmetic"), required=True)
    p.add_argument("--experts", nargs="+", required=True, help="expert model directories (megatron or HF)")
    p.add_argument("--base", help="task_arithmetic: the model the experts were fine-tuned from")
    p.add_argument("--weights", nargs="+", type=float, help="task_arithmetic: one weight per expert")
    p.add_argument("--scale", type=float, help="task_arithmetic: one weight for every expert")
    p.add_argument("--output", required=True)
    p.add_argument("--max-shard-size", default="5GB", help="HF inputs: safetensors shard size of the output")
    add_output_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from megatron_opd.models.hf.hf_dir import parse_size

    args = build_parser().parse_args(argv)
    return run_tool(
        lambda: merge(
            args.method,
            args.experts,
            args.output,
            base=args.base,
            weights=args.weights,
            scale=args.scale,
            max_shard_bytes=parse_size(args.max_shard_size),
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    )

if __name__ == "__main__":
    sys.exit(main())
