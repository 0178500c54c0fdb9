"""Weight-merging baselines: combine several experts into one model, to compare OPD against.

    python -m checkpoints_tools.merge --method uniform --experts A B C --output MERGED
    python -m checkpoints_tools.merge --method task_arithmetic --base BASE --experts A B --weights 0.5 0.3 --output MERGED
    python -m checkpoints_tools.merge --method ties --base BASE --experts A B C --density 0.2 --lambda 1 --output MERGED

    uniform          theta = (1/n) sum_i theta_i
    task_arithmetic  theta = theta_base + sum_i w_i (theta_i - theta_base)   (--weights, or --scale for all)
    ties             TIES-Merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging
                     Models", NeurIPS 2023, arXiv 2306.01708), its three steps on the task vectors
                     tau_i = theta_i - theta_base:
                     1. trim: keep the top --density fraction of each tau_i's entries by magnitude
                        (|tau_i| >= its k-th largest magnitude, k = ceil(density * N), ties at the
                        threshold kept), zero the rest;
                     2. elect sign: gamma = sign(sum_i trimmed tau_i), per parameter entry;
                     3. disjoint merge: tau = mean of the trimmed tau_i whose entry is nonzero and
                        has sign gamma (0 where none does);
                     theta = theta_base + lambda * tau   (--lambda, default 1; --density default 0.2).

TIES trims each task vector over all of its floating-point entries at once, as the paper's
reference implementation does (it flattens each task vector into one row and takes the k-th
value of the row): a global magnitude budget per expert, so a tensor that an expert changed
little loses more of its entries than one it changed much. (mergekit trims each tensor
separately instead; that is a variant, not the paper's rule.) N counts the model's real entries:
the vocabulary padding rows of a megatron embedding and output layer are left out and stay at
the base's values, so a megatron checkpoint and its Hugging Face export merge alike. Two
departures from the reference code, both on measure-zero cases: where the trimmed entries sum to
exactly 0 no sign is elected and the entry stays at the base (the reference falls back to the
sign of the majority over the model, which costs another pass); and k is ceil(density * N) where
the reference keeps int(density * N) + 1. The threshold is exact and the merge streams: two
passes over the inputs count magnitudes (a radix select on the float bits, memory independent
of model size), a third merges.

Inputs are all megatron model directories / checkpoints (same model.yaml) or all Hugging Face
directories (same tensors); the output has the same format, with the model files (model.yaml,
tokenizer, hf/ or config.json and tokenizer files) of the base, else of the first expert, and a
manifest recording method, weights (TIES: density, lambda and each expert's trim threshold) and
inputs. Every tensor is combined in float32 and stored in its input dtype. Streaming: tensor by
tensor (megatron: row blocks of at most ~256 MB from each input into a file-backed arena; HF: one
output shard at a time).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from typing import Callable, Iterator, Sequence

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
METHODS = ("uniform", "task_arithmetic", "ties")


@dataclass(frozen=True)
class Ties:
    """The TIES settings: the fraction of each task vector kept, and the merged vector's scale."""

    density: float = 0.2
    lam: float = 1.0

    def check(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise CheckpointError(f"--density {self.density} must lie in (0, 1]: the fraction of entries kept")
        if not math.isfinite(self.lam):
            raise CheckpointError(f"--lambda {self.lam} must be a finite number")


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
    if method == "ties":
        if weights is not None or scale is not None:
            raise CheckpointError("ties weighs experts by sign agreement; --weights/--scale are for task_arithmetic")
        return []
    raise CheckpointError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")


def combine(method: str, experts, base, w: list[float]):
    """The merged tensor in float32 from the inputs' tensors (any dtype): uniform, task_arithmetic."""
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


def ties_combine(experts, base, thresholds: Sequence[float], lam: float):
    """TIES on one block (see the module docstring): float32 theta_base + lam * disjoint mean of the
    trimmed task vectors that agree with the elected sign. `thresholds`: each expert's trim
    threshold (`ties_thresholds`)."""
    import torch

    b = base.float()

    def trimmed(i: int):
        tau = experts[i].float() - b
        return torch.where(tau.abs() >= thresholds[i], tau, torch.zeros_like(tau))

    total = torch.zeros_like(b)
    for i in range(len(experts)):
        total += trimmed(i)
    elected = torch.sign(total)  # 0 where the trimmed entries cancel or are all zero: nobody agrees
    agreeing_sum, agreeing = torch.zeros_like(b), torch.zeros_like(b)
    for i in range(len(experts)):
        t = trimmed(i)
        agree = (torch.sign(t) == elected) & (t != 0)
        agreeing_sum += torch.where(agree, t, torch.zeros_like(t))
        agreeing += agree
    return b + lam * (agreeing_sum / agreeing.clamp(min=1))


class MagnitudeSelect:
    """The k-th largest magnitude of a stream of float32 blocks, exactly, in two passes.

    A radix select on the float bits: non-negative float32s order like their bit patterns as
    integers, so pass 1 counts the top 16 bits and finds the bucket the k-th largest falls in,
    pass 2 counts the low 16 bits inside that bucket. Memory: two histograms, whatever the size."""

    HIGH, LOW = 1 << 15, 1 << 16  # magnitudes have sign bit 0: 15 high bits, 16 low bits

    def __init__(self, owner: str):
        import torch

        self.owner = owner  # named in errors
        self.count = 0  # entries seen in pass 1
        self.k = 0
        self.high = torch.zeros(self.HIGH, dtype=torch.int64)
        self.low = torch.zeros(self.LOW, dtype=torch.int64)
        self.bucket: int | None = None
        self.rank_in_bucket = 0

    @staticmethod
    def _bits(block):
        import torch

        return block.detach().reshape(-1).to(torch.float32).abs().view(torch.int32)

    def count_high(self, block, name: str) -> None:
        import torch

        bits = self._bits(block)
        if bits.numel() and int(bits.max()) >= 0x7F800000:  # inf and NaN sort above every number
            raise CheckpointError(
                f"{self.owner}: tensor {name} differs from the base by a non-finite value; TIES "
                f"needs finite task vectors (is this checkpoint corrupt?)"
            )
        self.high += torch.bincount(bits >> 16, minlength=self.HIGH)
        self.count += bits.numel()

    def choose_bucket(self, density: float) -> None:
        import torch

        if not self.count:
            raise CheckpointError(f"{self.owner}: no floating-point entries to trim")
        self.k = max(1, math.ceil(density * self.count))
        at_least = self.high.flip(0).cumsum(0)  # [j]: how many lie in buckets >= HIGH - 1 - j
        j = int(torch.searchsorted(at_least, torch.tensor(self.k)))
        self.bucket = self.HIGH - 1 - j
        self.rank_in_bucket = self.k - int(at_least[j] - self.high[self.bucket])

    def count_low(self, block) -> None:
        import torch

        bits = self._bits(block)
        inside = bits[(bits >> 16) == self.bucket]
        self.low += torch.bincount(inside & 0xFFFF, minlength=self.LOW)

    def value(self) -> float:
        import torch

        at_least = self.low.flip(0).cumsum(0)
        j = int(torch.searchsorted(at_least, torch.tensor(self.rank_in_bucket)))
        bits = (self.bucket << 16) | (self.LOW - 1 - j)
        return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])


def ties_thresholds(
    task_vectors: Callable[[str], Iterator[tuple[str, list]]], owners: Sequence[str], density: float
) -> list[float]:
    """Each expert's trim threshold: the k-th largest |tau_i| over all of its entries.

    `task_vectors(label)` yields (tensor name, [tau_i block of each expert]) over the whole model;
    it is called twice (label "1/2", "2/2": for a progress bar). `owners` name the experts in errors."""
    selects = [MagnitudeSelect(o) for o in owners]
    for name, taus in task_vectors("1/2"):
        for sel, tau in zip(selects, taus):
            sel.count_high(tau, name)
    for sel in selects:
        sel.choose_bucket(density)
    for _, taus in task_vectors("2/2"):
        for sel, tau in zip(selects, taus):
            sel.count_low(tau)
    return [sel.value() for sel in selects]


@dataclass
class MergeSpec:
    """What to compute: the method with its weights (uniform, task_arithmetic) or TIES settings,
    and the manifest arguments (TIES adds its thresholds once they are known)."""

    method: str
    weights: list[float]
    ties: Ties | None
    args: dict
    thresholds: list[float] | None = None

    def find_thresholds(self, task_vectors: Callable[[str], Iterator[tuple[str, list]]], owners: Sequence[str]) -> None:
        self.thresholds = ties_thresholds(task_vectors, owners, self.ties.density)
        self.args.update(density=self.ties.density, thresholds=self.thresholds, **{"lambda": self.ties.lam})

    def combine(self, experts, base):
        if self.ties is not None:
            return ties_combine(experts, base, self.thresholds, self.ties.lam)
        return combine(self.method, experts, base, self.weights)


def merge(
    method: str,
    experts: Sequence[str | Path],
    output_dir: str | Path,
    *,
    base: str | Path | None = None,
    weights: Sequence[float] | None = None,
    scale: float | None = None,
    density: float | None = None,
    lam: float | None = None,
    max_shard_bytes: int = 5 * 10**9,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    experts = [Path(e) for e in experts]
    if not experts:
        raise CheckpointError("no experts to merge")
    if method in ("task_arithmetic", "ties") and base is None:
        raise CheckpointError(f"{method} needs --base (the model the experts were fine-tuned from)")
    if method == "uniform" and base is not None:
        raise CheckpointError("uniform does not use --base")
    if method != "ties" and (density is not None or lam is not None):
        raise CheckpointError(f"--density/--lambda are for ties, not {method}")
    w = coefficients(method, len(experts), weights, scale)
    ties = None
    if method == "ties":
        ties = Ties(density=Ties.density if density is None else density, lam=Ties.lam if lam is None else lam)
        ties.check()
    inputs = ([Path(base)] if base else []) + experts
    kinds = {is_hf_model_dir(p) for p in inputs}
    if len(kinds) > 1:
        raise CheckpointError(
            "inputs mix Hugging Face and megatron directories; convert them to one format first"
        )
    from megatron_opd.models.hf.manifest import write_manifest
    from megatron_opd.models.hf.output import claim_output

    args = {
        "method": method,
        "weights": w if method != "ties" else None,
        "base": str(Path(base).resolve()) if base else None,
        "experts": [str(e.resolve()) for e in experts],
    }
    spec = MergeSpec(method, w, ties, args)
    if kinds.pop():
        read, write = _merge_hf(spec, experts, Path(base) if base else None, progress, max_shard_bytes)
    else:
        read, write = _merge_megatron(spec, experts, Path(base) if base else None, progress)
    output = claim_output(output_dir, [*inputs, *read], overwrite)
    with output.writing() as out:
        write(out)
        write_manifest(out, "checkpoints_tools.merge", args)
    return output.path


def _merge_megatron(spec: MergeSpec, experts, base, progress: bool) -> tuple[list[Path], Callable[[Path], None]]:
    """Check the inputs; returns the paths it reads and write(out), which merges into `out`."""
    import torch

    from checkpoints_tools.progress import bytes_on_disk, counting
    from checkpoints_tools.reshard import copy_model_files
    from checkpoints_tools.staging import Arena
    from megatron_opd.models.hf.megatron_io import (
        VOCAB_PARAMS,
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

    def read_batch(batch) -> list[dict]:
        """Per input: {(name, first row): its rows of the block}."""
        read = []
        for m, s in zip(models, slots):
            got = {(n, r): torch.empty((rows, *s[n].shape[1:]), dtype=s[n].dtype) for n, r, rows in batch}
            read_regions(m.step_dir, [block_region(s[n], r, got[(n, r)]) for n, r, _ in batch])
            read.append(got)
        return read

    def model_rows(name: str, r: int, rows: int) -> int:
        """How many rows of the block hold model entries: the vocabulary padding is not one (TIES
        leaves it out of the trim and at the base's values)."""
        return max(0, min(rows, cfg.vocab_size - r)) if name in VOCAB_PARAMS else rows

    def write(out: Path) -> None:
        for m in models:
            m.check_manifest()
        batches = row_batches(first, BLOCK_BYTES)
        blocks = sum(map(len, batches))
        if spec.ties is not None:

            def task_vectors(label: str):
                with counting(progress, f"ties: task-vector magnitudes ({label})", blocks) as advance:
                    for batch in batches:
                        read = read_batch(batch)
                        for name, r, rows in batch:
                            n = model_rows(name, r, rows)
                            b = read[0][(name, r)][:n].float()
                            yield name, [got[(name, r)][:n].float() - b for got in read[1:]]
                        advance(len(batch))

            spec.find_thresholds(task_vectors, [str(e) for e in experts])
        with Arena(out / ".staging", Arena.bytes_for((s.shape, s.dtype) for s in first.values())) as arena:
            dests = {name: arena.empty(slot.shape, slot.dtype) for name, slot in first.items()}
            with counting(progress, f"merging ({spec.method})", blocks) as advance:
                for batch in batches:
                    read = read_batch(batch)
                    for name, r, rows in batch:
                        tensors = [got[(name, r)] for got in read]
                        b, ex = (tensors[0], tensors[1:]) if base else (None, tensors)
                        dest = dests[name][r : r + rows]
                        if spec.ties is not None:
                            n = model_rows(name, r, rows)
                            dest.copy_(b)
                            dest[:n].copy_(spec.combine([x[:n] for x in ex], b[:n]))
                        else:
                            dest.copy_(spec.combine(ex, b))
                    advance(len(batch))
            sharded = [t for name, slot in first.items() for t in sharded_pieces(slot, [dests[name]])]
            total = sum(slot.nbytes for slot in first.values())
            root = out / "checkpoints"
            with bytes_on_disk(progress, "writing megatron checkpoint", step_dir(root, 0), total):
                write_checkpoint(
                    root, 0, sharded, structure.objects, common={"merged": spec.method, "weights": spec.weights}
                )
        del sharded
        copy_model_files(models[0].model_dir, out)

    return [p for m in models for p in m.read_paths], write


def _merge_hf(spec: MergeSpec, experts, base, progress: bool, max_shard_bytes: int) -> tuple[list[Path], Callable[[Path], None]]:
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
    floating = [n for n in ref.names() if ref.info(n).dtype.is_floating_point]

    def load_shard(names):
        merged = {}
        for n in names:
            tensors = [h.tensor(n) for h in hfs]
            b, ex = (tensors[0], tensors[1:]) if base else (None, tensors)
            merged[n] = spec.combine(ex, b).to(ref.info(n).dtype) if ref.info(n).dtype.is_floating_point else tensors[0]
        return merged

    def task_vectors(label: str):
        with counting(progress, f"ties: task-vector magnitudes ({label})", len(floating)) as advance:
            for n in floating:
                b = hfs[0].tensor(n).float()
                yield n, [h.tensor(n).float() - b for h in hfs[1:]]
                advance()

    def write(out: Path) -> None:
        for h in hfs:
            check_manifest(h.path)
        if spec.ties is not None:
            spec.find_thresholds(task_vectors, [str(e) for e in experts])
        with counting(progress, f"merging ({spec.method})", len(ref.names())) as advance:
            write_shards(out, shards, load_shard, on_shard=advance)
        copy_side_files(ref.side_files(), out)

    return [h.path for h in hfs], write


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m checkpoints_tools.merge",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--experts", nargs="+", required=True, help="expert model directories (megatron or HF)")
    p.add_argument("--base", help="task_arithmetic, ties: the model the experts were fine-tuned from")
    p.add_argument("--weights", nargs="+", type=float, help="task_arithmetic: one weight per expert")
    p.add_argument("--scale", type=float, help="task_arithmetic: one weight for every expert")
    p.add_argument(
        "--density", type=float, help=f"ties: fraction of each task vector's entries kept (default {Ties.density})"
    )
    p.add_argument(
        "--lambda", dest="lam", type=float, help=f"ties: scale of the merged task vector (default {Ties.lam})"
    )
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
            density=args.density,
            lam=args.lam,
            max_shard_bytes=parse_size(args.max_shard_size),
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    )

if __name__ == "__main__":
    sys.exit(main())
