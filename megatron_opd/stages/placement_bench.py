"""Benchmark: an OPD step with in-job teachers against the same step with served teachers.

    megatron-opd bench placement [--steps 6] [--experts RUN_DIR/experts] [--quick] [--json out.json]

One run, one model and batch: the job is configs/tiny/opd.yaml (its student, TP=2 on 2 ranks,
its batch) cut to `--steps` steps without evaluation or checkpoints, and each case trains it
from the same seed in a fresh spawned world:

    server                 every teacher an embedded teacher server on 127.0.0.1 (HTTP, the
                           TeacherPool), as `megatron-opd run` starts them
    in-job                 teachers.<name>.placement=in_job, one resident, the next prefetched
    in-job, no prefetch    the same, weights read on the critical path (the overlap's control)

The teachers are the experts of a finished run (`--experts`, e.g. runs/tiny/experts) or random
ones of the job's model config. Each column is the median over the steps after the first (the
warm-up): rollout (the student generates), teacher (scoring, wall time), of which the in-job
teacher forward, "loading" (making teachers resident: reads waited for, binding, the replica
agreeing that every rank loaded), "read wait" (the part blocked on weight reads: what the
prefetch left on the critical path), the weight reads themselves (disk to host, background ones
included), and training (forward, backward, optimizer). "prefetch hidden" is 1 - read wait /
read: the share of the reads that the background thread took off the critical path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "configs/tiny/opd.yaml"


@dataclass
class Row:
    case: str
    step_s: float  # rollout + teacher + training
    rollout_s: float
    teacher_s: float
    forward_s: float
    load_wait_s: float
    load_s: float
    read_s: float
    train_s: float
    loads: float  # teachers made resident per step
    kl: float  # the last step's reverse KL (the cases train the same job: a sanity column)

    @property
    def prefetch_hidden(self) -> float:
        return 1.0 - self.load_wait_s / self.read_s if self.read_s > 0 else float("nan")


def _random_teachers(root: str, config: str, names: list[str]) -> dict[str, str]:
    """Random teacher model directories of the job's model config (a spawned rank: megatron's state)."""
    from megatron_opd.config import load_config
    from megatron_opd.data.tokenizer import CharTokenizer
    from megatron_opd.models.gpt import build_gpt_model
    from megatron_opd.models.model_dir import write_model_dir
    from megatron_opd.runtime import checkpoint as ckpt
    from megatron_opd.runtime.distributed import init_runtime, seed_everything
    from megatron_opd.runtime.layout import ParallelLayout

    cfg = load_config(config).model
    layout = init_runtime(ParallelLayout(), 0)
    out = {}
    for i, name in enumerate(names):
        seed_everything(100 + i)
        d = write_model_dir(Path(root) / name, cfg, CharTokenizer())
        ckpt.save_checkpoint(d.checkpoints, 0, [build_gpt_model(cfg, layout)])
        out[name] = str(d.path)
    return out


def _median(records: list[dict], key: str) -> float:
    values = [r[f"train/{key}"] for r in records if f"train/{key}" in r]
    return statistics.median(values) if values else 0.0


def _row(case: str, run_dir: Path) -> Row:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/kl" in r]
    timed = train[1:] or train  # the first step warms up (imports, allocator, first load)
    rollout, teacher, trained = (_median(timed, k) for k in ("rollout_time_s", "score_time_s", "step_time_s"))
    return Row(
        case,
        step_s=rollout + teacher + trained,
        rollout_s=rollout,
        teacher_s=teacher,
        forward_s=_median(timed, "teacher_forward_s"),
        load_wait_s=_median(timed, "teacher_load_wait_s"),
        load_s=_median(timed, "teacher_load_s"),
        read_s=_median(timed, "teacher_read_s"),
        train_s=trained,
        loads=_median(timed, "teacher_loads"),
        kl=train[-1]["train/kl"],
    )


def run(*, steps: int, experts: str = "", config: str = str(DEFAULT_CONFIG), overrides: list[str] | None = None) -> list[Row]:
    from megatron_opd.config import derive, load_config, to_dict
    from megatron_opd.runtime.spawn import spawn_world
    from megatron_opd.serving.launch import start_teacher_server, stop_all, wait_ready
    from megatron_opd.stages.launch import _rank_entry

    base = load_config(config)
    names = sorted(base.teachers)
    with tempfile.TemporaryDirectory(prefix="opd-placement-bench-") as tmp, ExitStack() as stack:
        if experts:
            dirs = {n: str(Path(experts) / n) for n in names}
            missing = [d for d in dirs.values() if not (Path(d) / "model.yaml").is_file()]
            if missing:
                raise SystemExit(f"--experts {experts}: no model directory at {missing}; pass the experts/ of a finished run")
        else:
            dirs = spawn_world(_random_teachers, 1, (str(Path(tmp) / "teachers"), config, names))[0]
        common = [
            f"train.steps={steps}",
            "train.eval_every=0",
            "train.eval_at_start=false",
            "train.checkpoint_every=0",
            "run.progress=none",
            "run.log_every=1",
            f"run.output_dir={tmp}",
            *(overrides or []),
        ]
        handles = {n: stack.enter_context(start_teacher_server(model_dir=dirs[n], wait=False)) for n in names}
        wait_ready(list(handles.values()))
        cases = {
            "server": {f"teachers.{n}": {"endpoints": [handles[n].url], "model_dir": dirs[n]} for n in names},
            "in-job": {f"teachers.{n}": {"placement": "in_job", "model_dir": dirs[n]} for n in names},
            "in-job, no prefetch": {
                "opd.prefetch_teachers": False,
                **{f"teachers.{n}": {"placement": "in_job", "model_dir": dirs[n]} for n in names},
            },
        }
        rows = []
        for i, (case, changes) in enumerate(cases.items()):
            flat = {}
            for key, value in changes.items():
                if isinstance(value, dict):
                    flat.update({f"{key}.{k}": v for k, v in value.items()})
                else:
                    flat[key] = value
            cfg = derive(base, common + [f"run.name=case{i}"], **flat)
            spawn_world(_rank_entry, cfg.run.nproc, (to_dict(cfg),), timeout_s=3600)
            rows.append(_row(case, cfg.run_dir))
            if case == "server":  # the servers are not needed any more: their CPU goes to the trainer
                stop_all(list(handles.values()))
    return rows


def render(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    server = next((r for r in rows if r.case == "server"), rows[0])
    table = Table(title=title)
    columns = ("case", "step (s)", "vs server", "rollout", "teacher", "forward", "loading", "read wait", "weight read", "training",
               "prefetch hidden", "loads/step", "kl")
    for col in columns:
        table.add_column(col, justify="left" if col == "case" else "right")
    for r in rows:
        table.add_row(
            r.case, f"{r.step_s:.3f}", f"{r.step_s / server.step_s:.2f}x", f"{r.rollout_s:.3f}", f"{r.teacher_s:.3f}",
            f"{r.forward_s:.3f}", f"{r.load_s:.4f}", f"{r.load_wait_s:.4f}", f"{r.read_s:.4f}", f"{r.train_s:.3f}",
            "-" if r.prefetch_hidden != r.prefetch_hidden else f"{r.prefetch_hidden:.0%}", f"{r.loads:.0f}", f"{r.kl:.4f}",
        )
    Console(width=160).print(table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=6, help="steps per case; the first is a warm-up")
    parser.add_argument("--experts", default="", help="a finished run's experts/ directory (default: random teachers)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--quick", action="store_true", help="3 steps of a 24-sample batch (tests)")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the job (e.g. train.global_batch_size=48)")


def bench_command(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    steps = args.steps
    if args.quick:
        steps = 3
        overrides += ["train.global_batch_size=24", "train.micro_batch_size=12"]
    rows = run(steps=steps, experts=args.experts, config=args.config, overrides=overrides)
    teachers = f"experts of {args.experts}" if args.experts else "random teachers"
    render(rows, f"One OPD step, served vs in-job teachers ({Path(args.config).name}, {teachers}; median of steps 2..{steps})")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) | {"prefetch_hidden": r.prefetch_hidden} for r in rows], indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-opd bench placement", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return bench_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
