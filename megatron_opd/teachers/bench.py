"""Benchmark: bytes per response token and round-trip time of each teacher signal encoding.

    python -m megatron_opd.teachers.bench [--quick] [--hidden-size 4096] [--json out.json]

Runs against a real embedded teacher server (a subprocess on 127.0.0.1) with hidden size 4096
and a 256-token vocabulary. The model is deliberately narrow everywhere but the hidden size
(one layer, 4 heads of 16 channels, a 64-wide MLP), so the forward costs almost nothing and the
numbers measure the wire: encoding on the server, HTTP on loopback, decoding and validation in
our client. Each row scores the same batch (one /generate request); round-trip time is the
median over repetitions after a warm-up. Ratios are against hidden states as JSON, measured in
the same run. Hidden states come back for every position of the sequence (prompt included), as
SGLang sends them, so their bytes per response token carry the prompt too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml

from megatron_opd.serving.launch import start_teacher_server
from megatron_opd.teachers import protocol as P
from megatron_opd.teachers.config import TeacherConfig
from megatron_opd.teachers.pool import binary_supported, client_for, score_items

BASELINE = "hidden, JSON"


@dataclass(frozen=True)
class Case:
    name: str
    signal: str
    wire: str = "json"
    topk: int = 0
    topk_format: str = "nested"
    hidden_dtype: str = "float32"


CASES = (
    Case(BASELINE, "hidden"),
    Case("hidden, binary fp32", "hidden", wire="auto"),
    Case("hidden, binary fp16", "hidden", wire="auto", hidden_dtype="float16"),
    Case("top-8, nested JSON", "topk", topk=8),
    Case("top-8, flat base64", "topk", topk=8, topk_format="b64"),
    Case("top-8, binary", "topk", wire="auto", topk=8),
    Case("top-64, nested JSON", "topk", topk=64),
    Case("top-64, flat base64", "topk", topk=64, topk_format="b64"),
    Case("top-64, binary", "topk", wire="auto", topk=64),
    Case("sampled, JSON", "sampled"),
)


@dataclass
class Row:
    name: str
    bytes_per_token: float
    rtt_ms: float
    bytes_ratio: float = 0.0
    rtt_ratio: float = 0.0


def _write_model(directory: Path, hidden: int, seq_len: int) -> tuple[Path, Path]:
    from megatron_opd.data.tokenizer import CharTokenizer

    tok = CharTokenizer(alphabet="".join(chr(0x100 + i) for i in range(253)))  # 256 tokens with the specials
    tok.save(directory)
    model = {
        "vocab_size": tok.vocab_size, "hidden_size": hidden, "num_layers": 1, "num_attention_heads": 4,
        "kv_channels": 16, "ffn_hidden_size": 64, "max_seq_len": seq_len, "make_vocab_size_divisible_by": 128,
    }  # fmt: skip
    (directory / "model.yaml").write_text(yaml.safe_dump(model))
    return directory / "model.yaml", directory


async def _measure(url: str, case: Case, items: list[P.ScoreItem], reps: int) -> Row:
    cfg = TeacherConfig(
        endpoints=[url], domains=["bench"], signal=case.signal, topk=case.topk, wire=case.wire,
        topk_format=case.topk_format, hidden_dtype=case.hidden_dtype, batch_size=len(items), timeout_s=600,
    )  # fmt: skip
    async with client_for("bench", cfg) as client:
        await client.start()
        await score_items(client, cfg, items)  # warm-up: connection, server-side first use
        client.stats.requests = client.stats.bytes_received = 0
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            sigs = await score_items(client, cfg, items)
            times.append(time.perf_counter() - t0)
        assert len(sigs) == len(items)
        if case.wire == "auto" and not binary_supported(cfg, client.model_infos[url]):
            raise RuntimeError("the server did not advertise the binary form")
        tokens = sum(it.response_len for it in items) * client.stats.requests
        return Row(case.name, client.stats.bytes_received / tokens, 1000 * statistics.median(times))


def run(*, quick: bool, hidden: int) -> list[Row]:
    batch, prompt, response, reps = (2, 16, 48, 2) if quick else (4, 32, 96, 5)
    rng = np.random.default_rng(0)
    items = [P.ScoreItem(tuple(int(t) for t in rng.integers(3, 256, prompt + response)), prompt) for _ in range(batch)]
    with tempfile.TemporaryDirectory(prefix="opd-bench-") as tmp:
        model_yaml, tok_dir = _write_model(Path(tmp), hidden, prompt + response + 8)
        with start_teacher_server(random_init=True, model_config=model_yaml, tokenizer=tok_dir, threads=1) as server:
            rows = [asyncio.run(_measure(server.url, case, items, reps)) for case in CASES]
    base = next(r for r in rows if r.name == BASELINE)
    for r in rows:
        r.bytes_ratio = r.bytes_per_token / base.bytes_per_token
        r.rtt_ratio = r.rtt_ms / base.rtt_ms
    return rows


def render(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("signal, encoding", "bytes / response token", f"vs {BASELINE}", "round trip (ms)", f"vs {BASELINE}"):
        table.add_column(col, justify="left" if col.startswith("signal") else "right")
    for r in rows:
        table.add_row(r.name, f"{r.bytes_per_token:,.0f}", f"{r.bytes_ratio:.4f}x", f"{r.rtt_ms:,.1f}", f"{r.rtt_ratio:.3f}x")
    Console(width=120).print(table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a smaller batch and fewer repetitions (tests)")
    parser.add_argument("--hidden-size", type=int, default=4096)
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")


def bench_command(args: argparse.Namespace) -> int:
    rows = run(quick=args.quick, hidden=args.hidden_size)
    mode = "quick: 2 sequences of 16 + 48 tokens" if args.quick else "4 sequences of 32 prompt + 96 response tokens"
    render(rows, f"Teacher signal on the wire, hidden size {args.hidden_size}, vocabulary 256 ({mode}, 127.0.0.1)")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-opd bench-teachers", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return bench_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
