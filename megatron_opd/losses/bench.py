"""Benchmark: the reverse KL's forward+backward, naive PyTorch vs vocab-parallel vs fused.

The problem: student hidden states h [tokens, d] and output layer W [V, d] (both trained), teacher
hidden states g and output layer U (frozen); loss = mean over tokens of
KL(softmax(h W^T) || softmax(g U^T)); one rank (a vocabulary split only divides V).
- naive: logits by autograd matmul, log_softmax on both sides, kl_div, sum over the vocabulary;
  backward to h and W.
- vocab_parallel_reverse_kl (logits given): the loss alone, from logits z and u that are its
  inputs; backward to z. Its time and memory exclude the output-layer matmuls the other two rows
  include, so its ratios show what the loss itself costs next to the whole naive step.
- fused_linear_reverse_kl: from h, W, g, U in token chunks, no logits in memory; backward to h, W.
- on CUDA with Triton, both again with the row passes as PyTorch ops ("torch ops") instead of the
  Triton kernels (losses/triton_kernels.py), to show what the kernels buy.

Memory is measured per variant in a fresh process, so no variant inherits another's allocator
caches. CPU: once the inputs exist the process's peak-RSS mark is reset (/proc/self/clear_refs);
the peak extra memory is the new peak (VmHWM) minus the RSS before the step, gradients included.
CUDA: torch.cuda.max_memory_allocated minus the memory allocated before the step.

    python -m megatron_opd.losses.bench                 # tokens {1024, 4096} x vocab {32k, 128k}
    python -m megatron_opd.losses.bench --quick         # a small smoke table
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from megatron_opd.losses.fused import DEFAULT_CHUNK_SIZE, fused_linear_reverse_kl
from megatron_opd.losses.triton_kernels import use_triton
from megatron_opd.losses.vocab_parallel import vocab_parallel_reverse_kl

# Targets from the issue, checked at tokens=4096, vocab=131072 on CPU.
TARGET_MEMORY_RATIO = 1 / 8
TARGET_TIME_RATIO = 1.5
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


class Problem:
    """The inputs of one table cell, drawn directly in the benchmark dtype; logits ~ N(0, 1)."""

    def __init__(self, tokens: int, vocab: int, hidden: int, dtype: torch.dtype, device: torch.device):
        self.shape = (tokens, vocab, hidden)
        self.dtype, self.device = dtype, device
        self.gen = torch.Generator(device=device).manual_seed(0)

    def rand(self, rows: int, cols: int, scale: float, requires_grad: bool = False) -> torch.Tensor:
        x = torch.randn(rows, cols, generator=self.gen, device=self.device, dtype=self.dtype).mul_(scale)
        return x.requires_grad_(requires_grad)

    def hidden_and_weights(self):
        tokens, vocab, hidden = self.shape
        s = hidden**-0.25
        return (
            self.rand(tokens, hidden, s, True), self.rand(vocab, hidden, s, True),
            self.rand(tokens, hidden, s), self.rand(vocab, hidden, s),
        )


def _clear_grads(*leaves: torch.Tensor) -> None:
    for leaf in leaves:
        leaf.grad = None  # every repeat allocates its gradients afresh, as a training step does


def naive_step(problem: Problem, chunk_size: int) -> Callable[[], None]:
    h, w, g, u_weight = problem.hidden_and_weights()

    def step():
        _clear_grads(h, w)
        z = h @ w.t()
        with torch.no_grad():
            u = g @ u_weight.t()
        log_p = torch.log_softmax(z.float(), dim=-1)
        log_q = torch.log_softmax(u.float(), dim=-1)
        F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(dim=-1).mean().backward()

    return step


def vocab_parallel_step(problem: Problem, chunk_size: int) -> Callable[[], None]:
    tokens, vocab, _ = problem.shape
    z, u = problem.rand(tokens, vocab, 1.0, True), problem.rand(tokens, vocab, 1.0)

    def step():
        _clear_grads(z)
        vocab_parallel_reverse_kl(z, u).mean().backward()

    return step


def fused_step(problem: Problem, chunk_size: int) -> Callable[[], None]:
    h, w, g, u_weight = problem.hidden_and_weights()

    def step():
        _clear_grads(h, w)
        fused_linear_reverse_kl(h, w, g, u_weight, chunk_size=chunk_size).mean().backward()

    return step


def _torch_ops(make_step: Callable[[Problem, int], Callable[[], None]]):
    """The same variant with the row passes as PyTorch ops instead of the Triton kernels (CUDA)."""

    def build(problem: Problem, chunk_size: int) -> Callable[[], None]:
        os.environ["MEGATRON_OPD_LOSS_KERNELS"] = "torch"  # this measurement's own process only
        return make_step(problem, chunk_size)

    return build


NAIVE = "naive (log_softmax + kl_div)"
LOGITS_GIVEN = "vocab_parallel_reverse_kl (logits given)"
FUSED = "fused_linear_reverse_kl"
LOGITS_GIVEN_TORCH = "vocab_parallel_reverse_kl (logits given, torch ops)"
FUSED_TORCH = "fused_linear_reverse_kl (torch ops)"
VARIANTS: dict[str, Callable[[Problem, int], Callable[[], None]]] = {
    NAIVE: naive_step,
    LOGITS_GIVEN: vocab_parallel_step,
    FUSED: fused_step,
    LOGITS_GIVEN_TORCH: _torch_ops(vocab_parallel_step),
    FUSED_TORCH: _torch_ops(fused_step),
}
# The torch-ops rows only differ where the Triton kernels run: CUDA with Triton installed.
BASE_VARIANT = {LOGITS_GIVEN_TORCH: LOGITS_GIVEN, FUSED_TORCH: FUSED}


def variants_for(device: torch.device) -> list[str]:
    kernels = device.type == "cuda" and use_triton(torch.empty(0, device=device))
    return [v for v in VARIANTS if kernels or v not in BASE_VARIANT]


# --- one measurement, in its own process ---------------------------------------------------------


def _proc_status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset VmHWM to the current RSS
    except OSError as err:
        raise RuntimeError(f"CPU peak-memory measurement needs Linux's /proc/self/clear_refs: {err}") from err


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(variant: str, tokens: int, vocab: int, hidden: int, chunk_size: int, dtype: torch.dtype,
            device: torch.device, repeats: int) -> dict[str, float]:
    """Time one variant's forward+backward and its peak extra memory, in this process.

    Besides wall time, the process CPU time (all threads) of the same run: on a machine shared
    with other work, wall time grows with the contention while CPU time mostly does not."""
    step = VARIANTS[variant](Problem(tokens, vocab, hidden, dtype, device), chunk_size)
    times = []
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        before = _proc_status_mib("VmRSS")
        _reset_peak_rss()
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        _sync(device)
        times.append((time.perf_counter() - start, time.process_time() - cpu_start))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = _proc_status_mib("VmHWM")
    # The best run: on a shared machine, interference only ever adds time.
    seconds, cpu_seconds = min(times)
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "extra_mib": peak - before}


def copy_bandwidth_gbs(device: torch.device, mib: int = 1024) -> float:
    """Device copy bandwidth (read + write) of a large tensor copy, GB/s."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    _sync(device)
    return 5 * 2 * src.numel() / (time.perf_counter() - start) / 1e9


def modeled_bytes(
    variant: str, tokens: int, vocab: int, hidden: int, chunk_size: int, itemsize: int
) -> float:
    """The traffic a variant cannot avoid, for its achieved-bandwidth column (CUDA only).

    A loss from logits reads z and u in the forward, reads them again and writes dz in the backward
    (5 logit-sized passes). The naive step adds its matmuls: U and W read for the logits, W read
    for dh, dW written (4 weight-sized passes). The fused step has no logits in memory but reads W
    and U per chunk in the forward, W and U again plus W for dh in the backward, and updates dW
    (7 weight-sized passes per chunk)."""
    weights = vocab * hidden * itemsize
    logits = tokens * vocab * itemsize
    if variant == FUSED:
        return -(-tokens // chunk_size) * 7 * weights
    if variant == LOGITS_GIVEN:
        return 5 * logits
    return 5 * logits + 4 * weights


def modeled_flops(variant: str, tokens: int, vocab: int, hidden: int) -> float:
    """Matmul work: 4 [tokens, hidden] x [hidden, vocab] products for both the naive and the fused
    step (student and teacher logits, dh, dW; the fused one forms its gradients in the forward),
    none for the logits-given loss, whose cost is the 5 logit-sized passes of `modeled_bytes`."""
    return 0.0 if variant == LOGITS_GIVEN else 4 * 2.0 * tokens * vocab * hidden


def _run_child(variant: str, tokens: int, vocab: int, args: argparse.Namespace) -> dict[str, float]:
    cmd = [
        sys.executable, "-m", "megatron_opd.losses.bench", "--measure", variant,
        "--tokens", str(tokens), "--vocab", str(vocab), "--hidden", str(args.hidden),
        "--chunk-size", str(args.chunk_size), "--dtype", args.dtype, "--device", args.device,
        "--repeats", str(args.repeats),
    ]
    python_path = [str(PACKAGE_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(python_path))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {variant} at {tokens}x{vocab} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the table -------------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_opd.losses.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per variant; the fastest counts")
    parser.add_argument("--quick", action="store_true", help="smoke table: tokens 256, vocab 4096, hidden 64")
    parser.add_argument("--measure", choices=list(VARIANTS), help=argparse.SUPPRESS)  # one child measurement
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.vocab, args.hidden = [256], [4096], 64
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def _table(rows: list[dict], args: argparse.Namespace, copy_gbs: float | None):
    on_cuda = copy_gbs is not None
    caption = (
        f"forward+backward, 1 rank, hidden {args.hidden}, {args.dtype}, chunk {args.chunk_size}, "
        f"best of {args.repeats} by wall time"
        + ("" if on_cuda else " (CPU time: the process's, all threads, same run)")
        + ". Peak extra memory: "
        + (
            "torch.cuda.max_memory_allocated minus memory allocated before the step."
            if on_cuda
            else "each variant in a fresh process; peak RSS (VmHWM, reset via /proc/self/clear_refs "
            "once the inputs exist) minus RSS before the step, gradients included."
        )
        + " The logits-given row's inputs are the logits: it excludes the output-layer matmuls."
        + (f" Device copy bandwidth {copy_gbs:.0f} GB/s." if on_cuda else "")
    )
    table = Table(title=f"Reverse KL on {args.device}", caption=caption)
    columns = ["tokens", "vocab", "variant", "time (ms)" if on_cuda else "time (s)", "time / naive"]
    columns += ["GB/s (modeled)", "of copy BW", "matmul TFLOP/s"] if on_cuda else ["CPU time (s)", "CPU / naive"]
    columns += ["peak extra (MiB)", "memory / naive"]
    for name in columns:
        table.add_column(name, justify="left" if name == "variant" else "right")
    for row in rows:
        cells = [str(row["tokens"]), str(row["vocab"]), row["variant"]]
        seconds = f"{row['seconds'] * 1e3:.2f}" if on_cuda else f"{row['seconds']:.3f}"
        cells += [seconds, f"{row['time_ratio']:.2f}x"]
        if on_cuda:
            tflops = f"{row['tflops']:.0f}" if row["tflops"] else "-"
            cells += [f"{row['gbs']:.0f}", f"{row['gbs'] / copy_gbs:.0%}", tflops]
        else:
            cells += [f"{row['cpu_seconds']:.1f}", f"{row['cpu_ratio']:.2f}x"]
        cells += [f"{row['extra_mib']:.0f}", f"{row['memory_ratio']:.3f}"]
        table.add_row(*cells)
    return table


def _target_verdict(rows: list[dict]) -> str | None:
    fused = [r for r in rows if r["variant"] == FUSED and (r["tokens"], r["vocab"]) == (4096, 131072)]
    if not fused:
        return None
    r = fused[0]
    memory_ok, time_ok = r["memory_ratio"] <= TARGET_MEMORY_RATIO, r["time_ratio"] <= TARGET_TIME_RATIO
    return (
        f"targets at 4096 x 131072: fused memory {r['memory_ratio']:.3f} of naive (target <= "
        f"{TARGET_MEMORY_RATIO:.3f}: {'met' if memory_ok else 'MISSED'}), time {r['time_ratio']:.2f}x naive "
        f"(target <= {TARGET_TIME_RATIO}x: {'met' if time_ok else 'MISSED'})"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    if args.measure:
        problem = (args.tokens[0], args.vocab[0], args.hidden, args.chunk_size, dtype, device, args.repeats)
        print(json.dumps(measure(args.measure, *problem)))
        return 0

    copy_gbs = copy_bandwidth_gbs(device) if device.type == "cuda" else None
    rows = []
    for tokens in args.tokens:
        for vocab in args.vocab:
            results = {v: _run_child(v, tokens, vocab, args) for v in variants_for(device)}
            naive = results[NAIVE]
            for variant, r in results.items():
                base = BASE_VARIANT.get(variant, variant)
                traffic = modeled_bytes(base, tokens, vocab, args.hidden, args.chunk_size, dtype.itemsize)
                rows.append(dict(
                    tokens=tokens, vocab=vocab, variant=variant, **r,
                    time_ratio=r["seconds"] / naive["seconds"],
                    cpu_ratio=r["cpu_seconds"] / naive["cpu_seconds"],
                    memory_ratio=r["extra_mib"] / naive["extra_mib"],
                    gbs=traffic / r["seconds"] / 1e9,
                    tflops=modeled_flops(base, tokens, vocab, args.hidden) / r["seconds"] / 1e12,
                ))
    console = Console(width=160)
    console.print(_table(rows, args, copy_gbs))
    verdict = _target_verdict(rows)
    if verdict:
        console.print(verdict)
    return 0


if __name__ == "__main__":
    sys.exit(main())
