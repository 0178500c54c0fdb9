"""The local launcher: every role of a distillation job on one machine (`megatron-opd run`).

Roles, in order:
  1. experts   each teacher whose model directory holds no finished run is trained by SFT on its
               own domains (`pipeline.expert_overrides`);
  2. student   an optional SFT warm start on all domains (`pipeline.student_overrides`), in the
               same pool as the experts (`pipeline.parallel_jobs` SFT jobs at a time);
  3. RL        each expert with GRPO overrides (`pipeline.expert_rl_overrides`, and per teacher)
               continues from its SFT run with GRPO on its own domains (stages/grpo.py): its SFT
               run is then `<expert dir>-sft` and the GRPO run is the expert directory served;
               an empty list skips RL (the SFT run is the expert);
  4. servers   one embedded SGLang-compatible teacher server per served expert on 127.0.0.1
               (`pipeline.replicas` per teacher, behind the real sglang-router when > 1); experts
               with `teachers.<name>.placement: in_job` get none: the trainer loads them itself;
  5. distill   the OPD stage on `run.nproc` trainer ranks, talking HTTP to those servers;
  6. report    a per-domain table (expert after SFT, expert after GRPO, student before and after
               OPD), summary.json and a plot of the training curves in the run directory.

Each training role is its own world of spawned ranks (megatron keeps global state per process),
exactly like torchrun would start it; the servers are subprocesses stopped on exit.

A phase is done when its run reached its last step (its summary.json says finished at
train.steps: stages/run_dir.py); a rerun skips what is done and resumes what is not from its
newest checkpoint. A stop signal to this launcher (SIGTERM, SIGINT, SIGUSR1) reaches the ranks
of every world in flight, which save and return (runtime/spawn.py, forward_stop_signals); no
later phase starts, every server started here is stopped, and the command exits 75
(EXIT_STOPPED_EARLY), as it does when any phase stopped before its last step.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

from megatron_opd.config import ConfigError, JobConfig, derive, load_config, to_dict
from megatron_opd.runtime.spawn import StopRequested, forward_stop_signals, spawn_world, stop_requested, terminate_all
from megatron_opd.stages.run_dir import is_finished, read_summary


def _run_world(cfg: JobConfig, threads: int | None = None) -> dict[str, Any]:
    from megatron_opd.stages.launch import _rank_entry

    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    return spawn_world(_rank_entry, cfg.run.nproc, (to_dict(cfg),), timeout_s=6 * 3600, env=env)[0]


def _say(text: str) -> None:
    print(f"[megatron-opd run] {text}", flush=True)


def _expert_dir(cfg: JobConfig, name: str) -> Path:
    t = cfg.teachers[name]
    return Path(t.model_dir) if t.model_dir else cfg.run_dir / "experts" / name


def _has_rl(cfg: JobConfig, name: str) -> bool:
    """Whether teacher `name`'s expert is trained by GRPO after its SFT (a served-as-is foreign
    model directory is trained by neither)."""
    return bool(cfg.pipeline.rl_overrides(name)) and not _foreign(_expert_dir(cfg, name))


def _sft_dir(cfg: JobConfig, name: str) -> Path:
    """Teacher `name`'s SFT run: the expert directory itself, or `<expert dir>-sft` when GRPO follows."""
    out = _expert_dir(cfg, name)
    return out.with_name(f"{out.name}-sft") if _has_rl(cfg, name) else out


def sft_jobs(cfg: JobConfig) -> tuple[dict[str, JobConfig], JobConfig | None]:
    """The SFT jobs the distillation needs: one per expert, and the student's warm start (or None)."""
    # Only the distilled student is released (train.export_hf), not the experts or the warm start.
    sft = {"stage": "sft", "teachers": {}, "train.init_from": "", "train.export_hf": ""}
    experts = {}
    for name in sorted(cfg.teachers):
        out = _sft_dir(cfg, name)
        overrides = cfg.pipeline.expert_overrides + cfg.pipeline.expert_overrides_by_teacher.get(name, [])
        experts[name] = derive(
            cfg,
            overrides,
            **sft,
            **{"run.output_dir": str(out.parent), "run.name": out.name, "data.domains": list(cfg.teachers[name].domains)},
        )
    student = None
    if cfg.pipeline.student_overrides:
        student = derive(cfg, cfg.pipeline.student_overrides, **sft, **{"run.name": f"{cfg.run.name}/student_sft"})
    return experts, student


def rl_jobs(cfg: JobConfig, experts: dict[str, JobConfig]) -> dict[str, JobConfig]:
    """The GRPO job of each expert that has one: from its SFT run (`experts[name]`), on its own
    domains, into the expert directory (what is served)."""
    jobs = {}
    for name in sorted(cfg.teachers):
        if not _has_rl(cfg, name):
            continue
        out = _expert_dir(cfg, name)
        jobs[name] = derive(
            cfg,
            cfg.pipeline.rl_overrides(name),
            stage="grpo",
            teachers={},
            **{
                "train.init_from": str(experts[name].run_dir),
                "run.output_dir": str(out.parent),
                "run.name": out.name,
                "data.domains": list(cfg.teachers[name].domains),
            },
        )
    return jobs


def run_sft_jobs(jobs: dict[str, JobConfig], parallel: int, label: str = "SFT") -> list[str]:
    """Run the jobs that have not reached their last step (resuming those a stop interrupted),
    `parallel` at a time, longest first. Once one stops early, or the launcher was asked to stop,
    no further job starts. Returns the names of the jobs still unfinished. (`label`: what the
    log line calls them; the GRPO jobs of the experts run through here too.)"""
    todo = [n for n, job in jobs.items() if not is_finished(job.run_dir, job.train.steps) and not _foreign(job.run_dir)]
    if todo:
        todo.sort(key=lambda n: -jobs[n].train.steps)  # longest first: the pool then packs the rest
        concurrent = max(1, min(parallel, len(todo)))
        _say(f"{label}: {', '.join(f'{n} ({jobs[n].train.steps} steps)' for n in todo)}; {concurrent} at a time")
        threads = max(1, (os.cpu_count() or 1) // concurrent) if concurrent > 1 else None
        stopped: list[str] = []

        def run(name: str) -> None:
            if stopped or stop_requested():
                return
            try:
                if not _run_world(jobs[name], threads).get("finished"):
                    stopped.append(name)
            except StopRequested:
                pass

        with ThreadPoolExecutor(concurrent) as pool:
            try:
                list(pool.map(run, todo))
            except BaseException:  # a failed job: stop the worlds of the others
                terminate_all()
                raise
    return [n for n, job in jobs.items() if not is_finished(job.run_dir, job.train.steps) and not _foreign(job.run_dir)]


def _foreign(run_dir: Path) -> bool:
    """A model directory with checkpoints that no `megatron-opd train` run left (a converted or
    copied teacher), or a Hugging Face model directory: it is served as it is, never trained on."""
    from megatron_opd.models.hf.config_json import is_hf_model_dir
    from megatron_opd.runtime.checkpoint import latest_complete

    if is_hf_model_dir(run_dir):
        return True
    return latest_complete(run_dir / "checkpoints") is not None and not any(
        (run_dir / name).exists() for name in ("summary.json", "config.yaml")
    )


def expert_accuracy(
    cfg: JobConfig, experts: dict[str, JobConfig], key: str = "pipeline.expert_overrides"
) -> dict[str, dict[str, float]]:
    """Each expert's final held-out accuracy per domain, from its run's summary.json (`key`: the
    overrides that give the run its evaluation, for the error)."""
    accuracy = {}
    for name, job in experts.items():
        summary = read_summary(job.run_dir)
        if summary is None:
            raise ValueError(
                f"expert {name!r} ({job.run_dir}) has no summary.json, so its accuracy is unknown: it was "
                f"not trained by `megatron-opd train`; unset teachers.{name}.model_dir to train it here"
            )
        missing = [d for d in cfg.teachers[name].domains if f"acc/{d}" not in summary]
        if missing:
            raise ValueError(
                f"expert {name!r} ({job.run_dir}) has no final accuracy for {missing}: give its "
                f"{job.stage.upper()} job train.eval_every > 0 in {key}"
            )
        accuracy[name] = {d: summary[f"acc/{d}"] for d in cfg.teachers[name].domains}
    return accuracy


def start_servers(cfg: JobConfig, stack: ExitStack) -> dict[str, list[str]]:
    """One embedded teacher server per served expert replica (and a router in front of replicas
    > 1); in-job teachers get none (their endpoints stay empty)."""
    from megatron_opd.serving.launch import start_router, start_teacher_server, wait_ready

    endpoints: dict[str, list[str]] = {}
    handles = []
    logs = cfg.run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for name in sorted(cfg.teachers):
        if cfg.teachers[name].placement == "in_job":
            endpoints[name] = []
            continue
        if cfg.teachers[name].endpoints:
            endpoints[name] = list(cfg.teachers[name].endpoints)
            continue
        replicas = [
            stack.enter_context(
                start_teacher_server(
                    model_dir=str(_expert_dir(cfg, name)),
                    wait=False,
                    threads=1,
                    log_path=logs / f"teacher-{name}-{i}.log",
                )
            )
            for i in range(cfg.pipeline.replicas)
        ]
        handles.extend(replicas)
        endpoints[name] = replicas
    wait_ready(handles)
    for name, value in endpoints.items():
        if value and not isinstance(value[0], str):
            urls = [h.url for h in value]
            if len(urls) > 1 and cfg.pipeline.router:
                router = stack.enter_context(start_router(urls, log_path=logs / f"router-{name}.log"))
                urls = [router.url]
            endpoints[name] = urls
    if handles or any(endpoints.values()):
        _say("teacher servers ready: " + ", ".join(f"{n} -> {u}" for n, u in endpoints.items() if u))
    in_job = [n for n, u in endpoints.items() if not u]
    if in_job:
        _say(f"in-job teachers (loaded by the trainer): {', '.join(in_job)}")
    return endpoints


def run_pipeline(cfg: JobConfig) -> dict[str, Any] | None:
    """Every phase that is not done yet, then the report. Returns the summary, or None when a
    phase stopped before its last step (a rerun resumes it)."""
    t0 = time.monotonic()
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    experts, student = sft_jobs(cfg)
    unfinished = run_sft_jobs({**experts, **({"student": student} if student else {})}, cfg.pipeline.parallel_jobs)
    if unfinished:
        _say(f"stopped before SFT of {', '.join(unfinished)} finished; checkpoints saved, rerun to resume")
        return None
    sft_acc = expert_accuracy(cfg, experts)
    rl = rl_jobs(cfg, experts)
    unfinished = run_sft_jobs(rl, cfg.pipeline.parallel_jobs, label="GRPO")
    if unfinished:
        _say(f"stopped before GRPO of {', '.join(unfinished)} finished; checkpoints saved, rerun to resume")
        return None
    rl_acc = expert_accuracy(cfg, rl, key="pipeline.expert_rl_overrides")
    init_from = str(student.run_dir) if student else cfg.train.init_from
    opd = replace(
        cfg,
        teachers={name: replace(t, model_dir=str(_expert_dir(cfg, name))) for name, t in cfg.teachers.items()},
        train=replace(cfg.train, init_from=init_from),
        run=replace(cfg.run, name=f"{cfg.run.name}/opd"),
    )
    if not is_finished(opd.run_dir, opd.train.steps):
        with ExitStack() as stack:
            if stop_requested():
                return None
            endpoints = start_servers(cfg, stack)
            opd = replace(opd, teachers={n: replace(t, endpoints=endpoints[n]) for n, t in opd.teachers.items()})
            _say(f"distilling {len(opd.teachers)} experts into the student ({opd.train.steps} OPD steps, {opd.run.nproc} ranks)")
            try:
                final = _run_world(opd)
            except StopRequested:
                return None
        if not final.get("finished"):
            _say(f"OPD stopped at step {final.get('step')} of {opd.train.steps}; checkpoint saved, rerun to resume")
            return None
    summary = report(cfg, opd.run_dir, sft_acc, rl_acc, wall_time_s=time.monotonic() - t0)
    return summary


def report(
    cfg: JobConfig,
    opd_dir: Path,
    sft_acc: dict[str, dict[str, float]],
    rl_acc: dict[str, dict[str, float]],
    *,
    wall_time_s: float,
) -> dict[str, Any]:
    """Per-domain table, summary.json and training-curve plot for the whole pipeline. The
    teacher of a domain is its expert as served: after GRPO when it had RL, else after SFT."""
    from rich.console import Console
    from rich.table import Table

    from megatron_opd.stages.reporting import read_metrics

    records = read_metrics(opd_dir)
    evals = [r for r in records if any(k.startswith("eval/acc/") for k in r)]
    before, after = evals[0], evals[-1]
    owner = {d: n for n, t in cfg.teachers.items() for d in t.domains}
    domains: dict[str, dict[str, Any]] = {}
    for d in cfg.data.domains:
        sft = sft_acc[owner[d]][d]
        grpo = rl_acc[owner[d]][d] if owner[d] in rl_acc else None
        teacher = sft if grpo is None else grpo
        student_after = after[f"eval/acc/{d}"]
        domains[d] = {
            "teacher": owner[d],
            "expert_accuracy_after_sft": sft,
            "expert_accuracy_after_grpo": grpo,
            "teacher_accuracy": teacher,
            "student_accuracy_before": before[f"eval/acc/{d}"],
            "student_accuracy_after": student_after,
            "fraction_of_teacher": student_after / teacher if teacher > 0 else float("nan"),
        }
    summary = {
        "domains": domains,
        "opd_steps": after["step"],
        "wall_time_s": wall_time_s,
        "run_dir": str(cfg.run_dir),
    }
    (cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_curves(cfg, opd_dir, cfg.run_dir / "curves.png")

    table = Table(title=f"multi-teacher OPD: {cfg.run_dir}  ({wall_time_s:.0f} s)")
    for col in ("domain", "teacher", "expert after SFT", "expert after GRPO", "student before OPD", "student after OPD", "after / teacher"):
        table.add_column(col, justify="left" if col in ("domain", "teacher") else "right")
    for d, row in domains.items():
        grpo = row["expert_accuracy_after_grpo"]
        table.add_row(
            d,
            row["teacher"],
            f"{row['expert_accuracy_after_sft']:.3f}",
            f"{grpo:.3f}" if grpo is not None else "-",
            f"{row['student_accuracy_before']:.3f}",
            f"{row['student_accuracy_after']:.3f}",
            f"{row['fraction_of_teacher']:.2f}",
        )
    Console().print(table)
    _say(f"summary: {cfg.run_dir / 'summary.json'}  curves: {cfg.run_dir / 'curves.png'}")
    return summary


def plot_curves(cfg: JobConfig, opd_dir: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_opd.stages.reporting import read_metrics

    records = read_metrics(opd_dir)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, prefix, title in (
        (axes[0], "train/kl_domain/", "reverse KL per domain (OPD)"),
        (axes[1], "train/rollout_acc/", "rollout accuracy per domain (OPD)"),
        (axes[2], "eval/acc/", "held-out accuracy per domain"),
    ):
        for d in cfg.data.domains:
            pts = [(r["step"], r[prefix + d]) for r in records if prefix + d in r]
            if pts:
                ax.plot(*zip(*pts), marker="o" if prefix.startswith("eval") else None, label=d)
        ax.set_title(title)
        ax.set_xlabel("OPD step")
        ax.legend()
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def run_command(args) -> int:
    cfg = load_config(args.config, args.overrides)
    from megatron_opd.stages.launch import EXIT_STOPPED_EARLY

    if cfg.stage == "grm":  # the GRM report: annotations, cold start, judge RL, every reward (launchers/grm.py)
        from launchers.grm import run_grm_report

        with forward_stop_signals():
            return 0 if run_grm_report(cfg) is not None else EXIT_STOPPED_EARLY
    if cfg.stage != "opd":
        raise SystemExit(
            f"megatron-opd run expects a distillation config (stage: opd) or a GRM report config (stage: grm), "
            f"{args.config} has stage={cfg.stage!r}"
        )
    # Before anything starts; this pipeline trains the experts and starts their servers itself.
    cfg.check(cfg.run.nproc, by_pipeline=True)
    experts, _ = sft_jobs(cfg)
    for name, job in rl_jobs(cfg, experts).items():  # a bad GRPO override fails here, in one line
        try:
            job.check(job.run.nproc)
        except ConfigError as e:
            raise ConfigError(f"the GRPO job of expert {name!r} (pipeline.expert_rl_overrides): {e}") from None

    with forward_stop_signals():
        if cfg.recipe.methods:  # the experiment: base, experts, every method (launchers/recipe.py)
            from launchers.recipe import run_recipe

            summary = run_recipe(cfg)
        else:
            summary = run_pipeline(cfg)
    return 0 if summary is not None else EXIT_STOPPED_EARLY
