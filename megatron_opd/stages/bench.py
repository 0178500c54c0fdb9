"""Benchmark: one SFT, one GRPO and one OPD step on the same model and batch shape, side by side.

Each stage runs as a real `megatron-opd train` job (the shared Trainer's loop in a spawned world,
metrics.jsonl written every step) in a temporary directory, on the model and rollout settings of
--config (the default job's student), with the same rows per step and the same max_seq_len:

    SFT   demonstrations of the config's domains (its job is also the warm start below)
    GRPO  from the SFT run: rows = prompts x --group samples, rewards by the domains' verifiers,
          the frozen reference's log-probs when --kl-coef > 0 (part of its scoring)
    OPD   from the SFT run, distilled from one embedded teacher server (the SFT run's model
          directory, on 127.0.0.1) covering every domain, full-vocabulary hidden-state signal

Per stage, averaged over the steps after --warmup: train tokens/s (the tokens of the step's
micro-batches, padding included, over the optimizer step's forward, backward and update), the
step's train time, its rollout time (generation and verification) and scoring time (GRPO:
advantages and reference log-probs; OPD: the teacher's HTTP round trip), and the tokens/s of the
whole step (train + rollout + scoring), so the cost of each stage's extra work is visible.

    megatron-opd bench steps                  # 64 rows, 4 timed steps each
    megatron-opd bench steps --quick          # a small smoke table
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = PACKAGE_ROOT / "configs" / "tiny" / "opd.yaml"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron-opd bench steps", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the job whose model, domains and rollout are used")
    parser.add_argument("--rows", type=int, default=64, help="sequences per optimizer step (every stage)")
    parser.add_argument("--group", type=int, default=8, help="GRPO samples per prompt (divides --rows)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per stage")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocator, first calls)")
    parser.add_argument("--kl-coef", type=float, default=0.05, help="GRPO's KL weight (> 0: a reference forward)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks of every stage")
    parser.add_argument("--quick", action="store_true", help="smoke table: 8 rows, group 4, 1 timed step")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.group, args.steps = 8, 4, 1
    if min(args.rows, args.steps, args.tp) < 1 or args.warmup < 0 or args.group < 2 or args.rows % args.group:
        parser.error("--rows, --steps, --tp must be >= 1, --warmup >= 0, --group >= 2 and divide --rows")
    return args


def _jobs(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """The three job configs (OPD's teacher endpoint is filled in once its server is up)."""
    from megatron_opd.config import derive, load_config

    base = load_config(args.config)
    steps = args.warmup + args.steps
    common = [
        f"run.output_dir={root}", "run.progress=none", "run.log_every=1", f"run.nproc={args.tp}", f"parallel.tp={args.tp}",
        f"train.steps={steps}", f"train.global_batch_size={args.rows}", f"train.micro_batch_size={args.rows}",
        "train.eval_every=0", "train.checkpoint_every=0", "train.optim.warmup_steps=0", "train.optim.decay=constant",
    ]  # fmt: skip
    sft = derive(base, common + ["stage=sft", "run.name=sft", "train.init_from="], teachers={})
    grpo = derive(
        base,
        common + ["stage=grpo", "run.name=grpo", f"train.init_from={sft.run_dir}", f"grpo.group_size={args.group}",
                  f"grpo.kl_coef={args.kl_coef}"],
        teachers={},
    )  # fmt: skip
    opd = derive(
        base,
        common + ["stage=opd", "run.name=opd", f"train.init_from={sft.run_dir}"],
        teachers={"experts": {"domains": list(base.data.domains), "signal": "hidden", "model_dir": str(sft.run_dir)}},
    )
    return {"SFT": sft, "GRPO": grpo, "OPD": opd}


def _timed(run_dir: Path, warmup: int) -> dict[str, float]:
    """Means over the timed steps of metrics.jsonl's train rows."""
    from megatron_opd.stages.reporting import read_metrics

    rows = [r for r in read_metrics(run_dir) if "train/step_time_s" in r and r["step"] > warmup]
    if not rows:
        raise RuntimeError(f"{run_dir} logged no timed step")

    def mean(key: str) -> float:
        return sum(r.get(key, 0.0) for r in rows) / len(rows)

    step_s = mean("train/step_time_s")
    # Each row's tokens from its own rate and time (the mean of the products, not their product).
    tokens = sum(r["train/train_tokens_per_s"] * r["train/step_time_s"] for r in rows) / len(rows)
    rollout_s, score_s = mean("train/rollout_time_s"), mean("train/score_time_s")
    return {
        "tokens": tokens,
        "train_tokens_per_s": tokens / step_s,
        "step_s": step_s,
        "rollout_s": rollout_s,
        "score_s": score_s,
        "total_tokens_per_s": tokens / (step_s + rollout_s + score_s),
    }


def measure(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from megatron_opd.config import derive, to_dict
    from megatron_opd.runtime.spawn import spawn_world
    from megatron_opd.serving.launch import start_teacher_server
    from megatron_opd.stages.launch import _rank_entry

    with tempfile.TemporaryDirectory(prefix="bench-steps-") as tmp:
        jobs = _jobs(args, Path(tmp))
        out = {}
        for name in ("SFT", "GRPO", "OPD"):
            job = jobs[name]
            if name == "OPD":  # the SFT run's model directory, served over HTTP
                with start_teacher_server(model_dir=str(jobs["SFT"].run_dir), log_path=Path(tmp) / "teacher.log") as server:
                    job = derive(job, **{"teachers.experts.endpoints": [server.url]})
                    spawn_world(_rank_entry, job.run.nproc, (to_dict(job),), timeout_s=3600)
            else:
                spawn_world(_rank_entry, job.run.nproc, (to_dict(job),), timeout_s=3600)
            out[name] = _timed(job.run_dir, args.warmup)
        return out


def table(result: dict[str, dict[str, float]], args: argparse.Namespace) -> Table:
    from megatron_opd.config import load_config

    cfg = load_config(args.config)
    m = cfg.model
    caption = (
        f"model: {Path(args.config).name}'s (hidden {m.hidden_size}, {m.num_layers} layers, vocab {m.vocab_size}), "
        f"max_seq_len {m.max_seq_len}, {args.rows} rows per step, TP={args.tp}, domains {', '.join(cfg.data.domains)}; "
        f"rollout: {cfg.rollout.engine}, max_new_tokens {cfg.rollout.max_new_tokens}; GRPO group {args.group}, "
        f"kl_coef {args.kl_coef}; OPD: one embedded teacher server (hidden signal). Means of {args.steps} steps "
        f"after {args.warmup} warm-up. train tok/s: the step's tokens (padding included) over forward + backward + "
        f"update; step tok/s: the same tokens over train + rollout + scoring."
    )
    t = Table(title="One optimizer step: SFT vs GRPO vs OPD", caption=caption)
    for col in ("stage", "tokens/step", "train tok/s", "train s", "rollout s", "scoring s", "step tok/s", "train share"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for name, r in result.items():
        total = r["step_s"] + r["rollout_s"] + r["score_s"]
        t.add_row(
            name, f"{r['tokens']:.0f}", f"{r['train_tokens_per_s']:.0f}", f"{r['step_s']:.3f}",
            f"{r['rollout_s']:.3f}" if name != "SFT" else "-", f"{r['score_s']:.3f}" if name != "SFT" else "-",
            f"{r['total_tokens_per_s']:.0f}", f"{r['step_s'] / total:.0%}",
        )  # fmt: skip
    return t


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    Console(width=160).print(table(measure(args), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
