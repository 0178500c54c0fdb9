"""Benchmark: embedded rollout tokens/s with and without the KV cache (rollout/embedded.py).

The model is the default job's student (configs/tiny/opd.yaml's `model:`, freshly initialised;
`model.max_seq_len` raised to fit the longest prompt plus the longest response), one rank. For
each G (samples per prompt: the same prompts repeated G times, as a GRPO group) and each
response length L, the same batch is generated with the cache and without, from the same seed,
with the config's sampling parameters and EOS ignored so that every row runs exactly L tokens.
Each cell reports generated tokens per second (best of --repeats by wall time, the two paths
alternating), the ratio cache / no-cache measured in the same run (by wall time, and by the
process's CPU time, which other processes on shared cores disturb less), the forward tokens each path fed the model (counted by
a forward pre-hook: O(L) per row with the cache, O(L^2) without), and whether both paths
sampled the same tokens (they must).

    megatron-opd bench rollout                       # L in {8, 32, 128} x G in {1, 4, 8}
    megatron-opd bench rollout --quick               # a small smoke table
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from megatron_opd.runtime.spawn import spawn_world

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = PACKAGE_ROOT / "configs" / "tiny" / "opd.yaml"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron-opd bench rollout", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the job whose model and sampling are used")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8, 32, 128], help="response lengths")
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4, 8], help="samples per prompt (G)")
    parser.add_argument("--prompts", type=int, default=8, help="distinct prompts per batch (rows = prompts x G)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell and path; the fastest counts")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="smoke table: lengths 2 4, G 1 2, 2 prompts, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.groups, args.prompts, args.repeats = [2, 4], [1, 2], 2, 1
    for name in ("lengths", "groups"):
        if min(getattr(args, name)) < 1:
            parser.error(f"--{name} must all be >= 1")
    if args.prompts < 1 or args.repeats < 1 or args.threads < 0:
        parser.error("--prompts and --repeats must be >= 1, --threads >= 0")
    return args


def _measure(config: str, lengths: list[int], groups: list[int], n_prompts: int, repeats: int, threads: int) -> dict:
    """One rank: build the model, time every cell. Runs inside a world of one (spawn_world)."""
    import torch

    from megatron_opd.config import load_config
    from megatron_opd.data.domains import TinyDomains
    from megatron_opd.data.prompts import encode_prompts
    from megatron_opd.data.tokenizer import CharTokenizer
    from megatron_opd.models.gpt import build_gpt_model
    from megatron_opd.rollout.config import SamplingParams
    from megatron_opd.rollout.embedded import generate
    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.runtime.layout import ParallelLayout

    if threads:
        torch.set_num_threads(threads)
    cfg = load_config(config)
    tokenizer = CharTokenizer()
    prompts = TinyDomains(cfg.data.domains, seed=cfg.run.seed, eval_size=0).prompts(0, n_prompts)
    longest = max(len(e) for e in encode_prompts(prompts, tokenizer))
    max_len = -(-(longest + max(lengths)) // 8) * 8
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, max_len)
    layout = init_runtime(ParallelLayout(), cfg.run.seed)
    model = build_gpt_model(cfg.model, layout).eval()
    for kv in (False, True):  # warm-up: first calls pay for allocator and kernel set-up
        generate(model, prompts, tokenizer, cfg.rollout.sampling, max_len=cfg.model.max_seq_len, kv_cache=kv)
    fed: list[int] = []
    model.register_forward_pre_hook(lambda module, args: fed.append(args[0].numel()))
    rows = []
    for g in groups:
        batch_prompts = [p for p in prompts for _ in range(g)]
        for length in lengths:
            params = SamplingParams(**{**cfg.rollout.sampling.__dict__, "max_new_tokens": length})
            cell = dict(groups=g, rows=len(batch_prompts), length=length)
            best = {kv: [float("inf"), float("inf")] for kv in (False, True)}  # wall, CPU seconds
            outputs, fed_by_path = {}, {}
            # Repeats alternate the two paths, so a burst of load on the shared cores hits both.
            for _ in range(repeats):
                for kv in (False, True):
                    fed.clear()
                    wall, cpu = time.perf_counter(), time.process_time()
                    batch = generate(
                        model, batch_prompts, tokenizer, params, max_len=cfg.model.max_seq_len,
                        generator=torch.Generator().manual_seed(cfg.run.seed), kv_cache=kv, ignore_eos=True,
                    )  # fmt: skip
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                    best[kv] = [min(best[kv][0], wall), min(best[kv][1], cpu)]
                    outputs[kv], fed_by_path[kv] = batch.tokens, sum(fed)
            generated = int(batch.response_lens.sum())
            for kv, name in ((False, "no_cache"), (True, "cache")):
                cell[f"{name}_tokens_per_s"] = generated / best[kv][0]
                cell[f"{name}_cpu_seconds"] = best[kv][1]
                cell[f"{name}_forward_tokens"] = fed_by_path[kv]
            cell["generated"] = generated
            cell["ratio"] = cell["cache_tokens_per_s"] / cell["no_cache_tokens_per_s"]
            cell["cpu_ratio"] = best[False][1] / best[True][1]
            cell["same_tokens"] = bool(torch.equal(outputs[True], outputs[False]))
            rows.append(cell)
    return dict(rows=rows, model=cfg.model.__dict__, threads=torch.get_num_threads(), sampling=cfg.rollout.sampling.__dict__)


def _table(result: dict, args: argparse.Namespace) -> Table:
    m, s = result["model"], result["sampling"]
    caption = (
        f"model: {Path(args.config).name}'s (hidden {m['hidden_size']}, {m['num_layers']} layers, vocab "
        f"{m['vocab_size']}), max_seq_len {m['max_seq_len']}, 1 rank, {result['threads']} torch threads; "
        f"{args.prompts} prompts x G rows, temperature {s['temperature']}, top_p {s['top_p']}, top_k {s['top_k']}, "
        f"EOS ignored; best of {args.repeats} by wall time. Forward tokens: tokens fed to the model "
        "(prefill included). ratio = cache / no-cache tokens/s by wall time, CPU ratio = no-cache / cache "
        "CPU seconds (less sensitive to other processes on shared cores); same run, repeats alternating."
    )
    table = Table(title="Embedded rollout: KV cache vs no cache", caption=caption)
    columns = ["G", "rows", "length", "no-cache tok/s", "cache tok/s", "ratio", "CPU ratio"]
    columns += ["no-cache fwd tokens", "cache fwd tokens", "same tokens"]
    for name in columns:
        table.add_column(name, justify="right")
    for r in result["rows"]:
        table.add_row(
            str(r["groups"]), str(r["rows"]), str(r["length"]),
            f"{r['no_cache_tokens_per_s']:.0f}", f"{r['cache_tokens_per_s']:.0f}", f"{r['ratio']:.2f}x", f"{r['cpu_ratio']:.2f}x",
            str(r["no_cache_forward_tokens"]), str(r["cache_forward_tokens"]), "yes" if r["same_tokens"] else "NO",
        )  # fmt: skip
    return table


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    result = spawn_world(
        _measure, 1, (args.config, args.lengths, args.groups, args.prompts, args.repeats, args.threads), timeout_s=3600
    )[0]
    Console(width=160).print(_table(result, args))
    if not all(r["same_tokens"] for r in result["rows"]):
        print("error: the cached and uncached rollouts sampled different tokens", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
