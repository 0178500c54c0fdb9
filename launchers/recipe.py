"""The recipe at many experts, against weight merging and mixed training (`megatron-opd run` with `recipe.methods`).

The experiment the product exists for (issue 16): do many domain experts distilled into one
student by multi-teacher OPD keep their skills better than merging their weights or training one
model on the union? For each seed of `recipe.seeds`, under `<run_dir>/seed<S>/`:

  base/                    SFT on every domain (a generic mixture) from random weights
                           (`recipe.base_overrides`): the one base everything starts from
  experts/<name>/sft/      each teacher's expert: SFT from the base on its own domains
                           (`pipeline.expert_overrides`, `pipeline.expert_overrides_by_teacher`)
  experts/<name>/grpo/     then GRPO on its domains (`pipeline.expert_rl_overrides`, and per
                           teacher, as `megatron-opd run` trains experts); the expert is its last phase
  methods/<method>/        from the base, with the same budget (`recipe.budget_overrides`: the same
                           optimizer steps and training samples for every trained method):
      opd_hidden           multi-teacher OPD, full-vocabulary reverse KL from the experts' hidden states
      opd_topk             OPD from the experts' top-k (`recipe.topk`) log-probs with the tail bucket
      opd_sampled          OPD from the log-prob of the sampled token (k1)
      mixed_rl             GRPO on the union of the domains, every domain's verifier (grpo stage)
      mixed_sft            SFT on the experts' own greedy answers to the training prompts
                           (sequence-level distillation; samples.jsonl beside it, data/samples.py)
      uniform, task_arithmetic, ties   the experts' weights merged (checkpoints_tools/merge.py)
  heldout.json             every expert on its own domains, and the base and every method on
                           every domain: greedy held-out accuracy through one path
                           (stages/model_eval.py)

then the report over the seeds in `<run_dir>`: the table (rows: domains, their mean, and the
worst domain's fraction of its expert; columns: each expert on its own domain, the base (every
method's start), then every method;
mean over seeds with the spread), `heatmap.png` and `summary.json` (experts, methods, spread,
budget, seeds, step times of the on-policy methods split into rollout, teacher scoring and training).

Phases are the existing pipeline's (launchers/local.py): each is a world of spawned ranks, done
when its run reached its last step (stages/run_dir.py is_finished), skipped on a rerun, resumed
from its checkpoint when a stop interrupted it; the teacher servers the OPD methods need are
started here (local.py start_servers) and stopped after them. A merge is done when its output
directory exists (the merge tool writes it atomically), an evaluation when heldout.json holds
the model's newest checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from megatron_opd.config import ConfigError, JobConfig, derive, to_dict
from megatron_opd.config.stages import STAGES
from megatron_opd.runtime.spawn import StopRequested, spawn_world, stop_requested
from megatron_opd.stages.run_dir import is_finished, read_summary

from launchers.local import _run_world, _say, run_sft_jobs, start_servers

OPD_SIGNALS = {"opd_hidden": "hidden", "opd_topk": "topk", "opd_sampled": "sampled"}
MERGES = ("uniform", "task_arithmetic", "ties")
GRPO_METHODS = ("mixed_rl",)


def grpo_available() -> bool:
    """Whether the grpo stage is registered (experts' GRPO and mixed RL run only then)."""
    return STAGES.get("grpo") is not None


@dataclass
class SeedPlan:
    """Every phase of one seed, as derived job configs (and the merges, which train nothing)."""

    seed: int
    root: Path
    base: JobConfig
    expert_sft: dict[str, JobConfig]
    expert_grpo: dict[str, JobConfig]
    methods: dict[str, JobConfig]  # trained methods, in recipe.methods order
    merges: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # method -> why it does not run

    def expert_dir(self, name: str) -> Path:
        job = self.expert_grpo.get(name) or self.expert_sft[name]
        return job.run_dir

    @property
    def samples_path(self) -> Path:
        return self.root / "methods" / "mixed_sft" / "expert_samples.jsonl"

    def merge_dir(self, method: str) -> Path:
        return self.root / "methods" / method


def _phase(cfg: JobConfig, overrides: list[str], out: Path, name: str, seed: int, **changes: Any) -> JobConfig:
    changes.setdefault("teachers", {})
    changes.setdefault("train.init_from", "")
    return derive(cfg, overrides, **{"run.output_dir": str(out), "run.name": name, "run.seed": seed, **changes})


def plan_seed(cfg: JobConfig, seed: int) -> SeedPlan:
    r = cfg.recipe
    root = cfg.run_dir / f"seed{seed}"
    base = _phase(cfg, r.base_overrides, root, "base", seed, stage="sft")
    sft, grpo = {}, {}
    for name in sorted(cfg.teachers):
        domains = list(cfg.teachers[name].domains)
        overrides = cfg.pipeline.expert_overrides + cfg.pipeline.expert_overrides_by_teacher.get(name, [])
        out = root / "experts" / name
        sft[name] = _phase(
            cfg, overrides, out, "sft", seed, stage="sft", **{"train.init_from": str(base.run_dir), "data.domains": domains}
        )
        if cfg.pipeline.rl_overrides(name):
            grpo[name] = _phase(
                cfg,
                cfg.pipeline.rl_overrides(name),
                out,
                "grpo",
                seed,
                stage="grpo",
                **{"train.init_from": str(sft[name].run_dir), "data.domains": domains},
            )
    plan = SeedPlan(seed, root, base, sft, grpo, {}, [m for m in r.methods if m in MERGES])
    for method in r.methods:
        if method in MERGES:
            continue
        if method in GRPO_METHODS and not grpo_available():
            plan.skipped[method] = "the grpo stage is not in this build (config/stages.py)"
            continue
        overrides = r.budget_overrides + r.method_overrides.get(method, [])
        common = {"train.init_from": str(base.run_dir)}
        out = root / "methods"
        if method in OPD_SIGNALS:
            signal = OPD_SIGNALS[method]
            placement = r.hidden_placement if signal == "hidden" else "server"
            teachers = {
                n: replace(t, signal=signal, topk=r.topk if signal == "topk" else 0, model_dir=str(plan.expert_dir(n)),
                           placement=placement)
                for n, t in cfg.teachers.items()
            }  # fmt: skip
            job = _phase(cfg, overrides, out, method, seed, stage="opd", **common, teachers={n: to_dict(t) for n, t in teachers.items()})
        elif method == "mixed_sft":
            job = _phase(cfg, overrides, out, method, seed, stage="sft", **common, **{"data.samples": str(plan.samples_path)})
        else:  # mixed_rl
            job = _phase(cfg, overrides, out, method, seed, stage="grpo", **common)
        plan.methods[method] = job
    _check_budget(plan)
    return plan


def _check_budget(plan: SeedPlan) -> None:
    """Every trained method has the same optimizer steps and samples per step (the budget)."""
    shape = {m: (j.train.steps, j.train.global_batch_size) for m, j in plan.methods.items()}
    if len(set(shape.values())) > 1:
        raise ValueError(
            f"the methods' budgets differ (train.steps, train.global_batch_size): {shape}; set them once in "
            f"recipe.budget_overrides"
        )


# -- running the phases ------------------------------------------------------------------------


@dataclass
class Phase:
    """One step of the recipe: its id (`seed<S>/...`: `recipe.only` and the SLURM chain name it),
    the phases it needs finished first, and the training jobs it runs (none for the report)."""

    id: str
    needs: list[str]
    jobs: dict[str, JobConfig]
    kind: Literal["train", "opd", "mixed_sft", "report"] = "train"


def phases(cfg: JobConfig, plan: SeedPlan) -> list[Phase]:
    """The phases of one seed in an order that runs each after what it needs: the base, every
    expert (SFT, then GRPO), every trained method, and the report phase (merges, held-out
    evaluation of every model)."""
    s = f"seed{plan.seed}"
    out = [Phase(f"{s}/base", [], {"base": plan.base})]
    experts = []
    for name in sorted(plan.expert_sft):
        out.append(Phase(f"{s}/experts/{name}/sft", [f"{s}/base"], {name: plan.expert_sft[name]}))
        last = out[-1].id
        if name in plan.expert_grpo:
            out.append(Phase(f"{s}/experts/{name}/grpo", [last], {name: plan.expert_grpo[name]}))
            last = out[-1].id
        experts.append(last)
    for method, job in plan.methods.items():
        kind = "opd" if method in OPD_SIGNALS else "mixed_sft" if method == "mixed_sft" else "train"
        out.append(Phase(f"{s}/methods/{method}", [f"{s}/base", *experts], {method: job}, kind))
    trained = [p.id for p in out if p.id.startswith(f"{s}/methods/")]
    out.append(Phase(f"{s}/report", [f"{s}/base", *experts, *trained], {}, "report"))
    return out


def phase_done(phase: Phase) -> bool:
    return all(is_finished(j.run_dir, j.train.steps) for j in phase.jobs.values())


class TeacherServers:
    """The experts' servers, started for the first OPD phase with served teachers and kept for the
    next ones (one server per expert serves every signal kind); stopped by `close`. In-job
    teachers get no endpoints."""

    def __init__(self):
        self.stack = ExitStack()
        self.endpoints: dict[str, list[str]] | None = None

    def get(self, job: JobConfig) -> dict[str, list[str]]:
        served = [n for n, t in job.teachers.items() if t.placement == "server"]
        if served and self.endpoints is None:
            self.endpoints = start_servers(job, self.stack)
        return {n: list(self.endpoints[n]) if n in served else [] for n in job.teachers}

    def close(self) -> None:
        self.stack.close()
        self.endpoints = None


def run_phase(cfg: JobConfig, plan: SeedPlan, phase: Phase, servers: TeacherServers) -> bool:
    """Run `phase` unless it is done. False when a job stopped before its last step."""
    if phase.kind == "report":
        for method in plan.merges:
            merge_experts(cfg, plan, method)
        return True
    if phase_done(phase):
        return True
    if phase.kind == "mixed_sft" and not plan.samples_path.is_file():
        record_expert_samples(cfg, plan)
    if phase.kind != "opd":
        # run_sft_jobs runs any stage's jobs (resuming a stopped one) and returns the unfinished.
        return not run_sft_jobs(phase.jobs, cfg.pipeline.parallel_jobs, label=phase.id)
    if stop_requested():
        return False
    (method, job), = phase.jobs.items()
    endpoints = servers.get(job)
    job = replace(job, teachers={n: replace(t, endpoints=endpoints[n]) for n, t in job.teachers.items()})
    _say(f"seed {plan.seed}: {method}: {len(job.teachers)} teachers, {job.train.steps} steps")
    try:
        return bool(_run_world(job).get("finished"))
    except StopRequested:
        return False


def run_seed(cfg: JobConfig, plan: SeedPlan, only: str = "") -> bool:
    """Every phase of one seed that is not done yet (or only the phase `only`, whose needs must
    be done). False when one stopped before its last step."""
    todo = phases(cfg, plan)
    if only:
        by_id = {p.id: p for p in todo}
        phase = by_id[only]
        missing = [n for n in phase.needs if not phase_done(by_id[n])]
        if missing:
            raise ConfigError(
                f"recipe.only={only} needs {missing} finished first (the SLURM chain's dependencies); run them, "
                f"or the whole recipe without recipe.only"
            )
        todo = [phase]
    servers = TeacherServers()
    try:
        for wave in training_waves(todo):
            if len(wave) > 1:  # independent training phases, pipeline.parallel_jobs at a time
                jobs = {f"{p.id}": job for p in wave for job in p.jobs.values()}
                unfinished = run_sft_jobs(jobs, cfg.pipeline.parallel_jobs, label=f"seed {plan.seed}")
                if unfinished:
                    _say(f"{', '.join(unfinished)} stopped before the last step; checkpoints saved, rerun to resume")
                    return False
                continue
            (phase,) = wave
            if not run_phase(cfg, plan, phase, servers):
                _say(f"{phase.id} stopped before its last step; checkpoints saved, rerun to resume")
                return False
    finally:
        servers.close()
    return True


def training_waves(todo: list[Phase]) -> list[list[Phase]]:
    """`todo` in order, cut into waves: consecutive training phases that need none of each other
    (one expert's GRPO beside the next expert's SFT) share a wave; every other phase is alone."""
    waves: list[list[Phase]] = []
    for p in todo:
        last = waves[-1] if waves else []
        ids = {q.id for q in last}
        if last and p.kind == "train" and all(q.kind == "train" for q in last) and not ids & set(p.needs):
            last.append(p)
        else:
            waves.append([p])
    return waves


def record_expert_samples(cfg: JobConfig, plan: SeedPlan) -> None:
    """Each expert's greedy answers to the mixed-SFT run's training prompts of its own domains."""
    from megatron_opd.data.samples import write_samples
    from megatron_opd.data.sources import prompt_source

    job = plan.methods["mixed_sft"]
    total = job.train.steps * job.train.global_batch_size
    source = prompt_source(replace(job.data, samples=""))
    owner = {d: n for n, t in cfg.teachers.items() for d in t.domains}
    indices: dict[str, list[int]] = {n: [] for n in cfg.teachers}
    for i in range(total):
        indices[owner[source.prompt(i).domain]].append(i)
    requests = [
        {"name": n, "model_dir": str(plan.expert_dir(n)), "domains": list(cfg.teachers[n].domains), "sample_indices": idx}
        for n, idx in indices.items()
        if idx
    ]
    _say(f"seed {plan.seed}: recording {total} expert samples for mixed SFT")
    results = _evaluate(job, requests)
    samples = sorted((s for r in results.values() for s in r["samples"]), key=lambda s: s["index"])
    write_samples(plan.samples_path, samples)


def merge_experts(cfg: JobConfig, plan: SeedPlan, method: str) -> None:
    from checkpoints_tools.merge import merge

    out = plan.merge_dir(method)
    if out.exists():
        return
    r = cfg.recipe
    experts = [plan.expert_dir(n) for n in sorted(cfg.teachers)]
    kwargs: dict[str, Any] = {}
    if method != "uniform":
        kwargs["base"] = plan.base.run_dir
    if method == "task_arithmetic":
        kwargs["scale"] = r.task_arithmetic_scale
    if method == "ties":
        kwargs.update(density=r.ties_density, lam=r.ties_lambda)
    _say(f"seed {plan.seed}: merging {len(experts)} experts ({method})")
    merge(method, experts, out, progress=False, **kwargs)


def _evaluate(job: JobConfig, requests: list[dict]) -> dict[str, dict]:
    from megatron_opd.stages.model_eval import evaluate_models

    return spawn_world(evaluate_models, 1, (to_dict(job), requests), timeout_s=3600)[0]


def _checkpoint_id(model_dir: Path) -> str:
    """The newest complete checkpoint of a model directory: its path and unique id (a retrained
    model at the same step has another id)."""
    from megatron_opd.runtime.checkpoint import checkpoint_id, latest_complete

    latest = latest_complete(Path(model_dir) / "checkpoints")
    return f"{latest.resolve()}#{checkpoint_id(latest)}" if latest else ""


def evaluate_seed(cfg: JobConfig, plan: SeedPlan) -> dict[str, dict[str, dict[str, float]]]:
    """{"experts": {name: {domain: acc}}, "base": {domain: acc}, "methods": {method: {domain: acc}}},
    from heldout.json where it holds the model's newest checkpoint, else evaluated now (one world
    for all). The base is every method's start: how far each moved from it."""
    path = plan.root / "heldout.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    models = {f"expert/{n}": (plan.expert_dir(n), list(cfg.teachers[n].domains)) for n in sorted(cfg.teachers)}
    models["base/base"] = (plan.base.run_dir, list(cfg.data.domains))
    for method in cfg.recipe.methods:
        if method in plan.skipped:
            continue
        where = plan.merge_dir(method) if method in MERGES else plan.methods[method].run_dir
        models[f"method/{method}"] = (where, list(cfg.data.domains))
    key = {"eval_size": cfg.data.eval_size, "data_seed": cfg.data.seed, "max_new_tokens": cfg.rollout.max_new_tokens}
    todo = []
    for name, (where, domains) in models.items():
        c = cached.get(name)
        if not (c and c["checkpoint"] == _checkpoint_id(where) and c["key"] == key and c["domains"] == domains):
            todo.append({"name": name, "model_dir": str(where), "domains": domains})
    if todo:
        _say(f"seed {plan.seed}: held-out accuracy of {len(todo)} models")
        fresh = _evaluate(derive(cfg, **{"run.seed": plan.seed}), todo)
        for req in todo:
            cached[req["name"]] = {
                "checkpoint": _checkpoint_id(Path(req["model_dir"])),
                "key": key,
                "domains": req["domains"],
                "acc": {d: fresh[req["name"]][f"acc/{d}"] for d in req["domains"]},
            }
        path.write_text(json.dumps(cached, indent=1))
    out: dict[str, Any] = {"experts": {}, "methods": {}}
    for name in models:
        kind, _, who = name.partition("/")
        if kind == "base":
            out["base"] = cached[name]["acc"]
        else:
            out["experts" if kind == "expert" else "methods"][who] = cached[name]["acc"]
    return out


def budget_of(plan: SeedPlan) -> dict[str, dict[str, int]]:
    """What every method's run recorded: optimizer steps (its summary) and training samples (its
    sample ledger); a merge trains nothing."""
    from megatron_opd.stages.trainer import read_ledger

    out: dict[str, dict[str, int]] = {}
    for method, job in plan.methods.items():
        summary = read_summary(job.run_dir) or {}
        out[method] = {
            "optimizer_steps": int(summary.get("step", 0)),
            "samples": sum(len(e["samples"]) for e in read_ledger(job.run_dir)),
        }
    for method in plan.merges:
        out[method] = {"optimizer_steps": 0, "samples": 0}
    return out


def step_times(plan: SeedPlan) -> dict[str, dict[str, float]]:
    """Mean seconds per step of the on-policy methods: rollout, teacher scoring (the stage's
    signal), and the optimizer step (forward, backward, update)."""
    from megatron_opd.stages.reporting import read_metrics

    out = {}
    for method, job in plan.methods.items():
        rows = [r for r in read_metrics(job.run_dir) if "train/step_time_s" in r] if (job.run_dir / "metrics.jsonl").exists() else []
        if rows and "train/rollout_time_s" in rows[0]:
            mean = lambda k: sum(r.get(k, 0.0) for r in rows) / len(rows)  # noqa: E731
            out[method] = {
                "rollout_s": mean("train/rollout_time_s"),
                "teacher_scoring_s": mean("train/score_time_s"),
                "training_s": mean("train/step_time_s"),
            }
    return out


# -- the report ------------------------------------------------------------------------------


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def aggregate(per_seed: dict[int, dict[str, dict[str, dict[str, float]]]], owner: dict[str, str], domains: list[str]) -> dict[str, Any]:
    """Means over seeds and their spread (sample sd): experts {domain: acc of its expert},
    methods {method: {domain: acc}}, method_summary {method: {"mean": mean over domains,
    "worst_fraction_of_expert": min over domains of acc / expert acc}}, and spread {method: the
    sd of each of those}."""
    seeds = sorted(per_seed)
    experts, expert_sd = {}, {}
    for d in domains:
        experts[d], expert_sd[d] = mean_spread([per_seed[s]["experts"][owner[d]][d] for s in seeds])
    method_names = list(per_seed[seeds[0]]["methods"])
    methods: dict[str, dict[str, float]] = {}
    spread: dict[str, dict[str, float]] = {}
    summary: dict[str, dict[str, float]] = {}
    for m in method_names:
        rows: dict[str, list[float]] = {d: [per_seed[s]["methods"][m][d] for s in seeds] for d in domains}
        rows["mean"] = [sum(per_seed[s]["methods"][m][d] for d in domains) / len(domains) for s in seeds]
        # Per seed: the method's worst domain, as a fraction of that seed's expert on it (a domain
        # whose expert scored 0 has no fraction; nan when no expert scored).
        rows["worst_fraction_of_expert"] = [
            min(
                (per_seed[s]["methods"][m][d] / per_seed[s]["experts"][owner[d]][d] for d in domains if per_seed[s]["experts"][owner[d]][d] > 0),
                default=float("nan"),
            )
            for s in seeds
        ]
        summary[m], methods[m], spread[m] = {}, {}, {}
        for k, vs in rows.items():
            mean, spread[m][k] = mean_spread(vs)
            (methods if k in domains else summary)[m][k] = mean
    experts_mean = mean_spread([sum(per_seed[s]["experts"][owner[d]][d] for d in domains) / len(domains) for s in seeds])
    out = {
        "experts": experts,
        "experts_spread": expert_sd,
        "experts_mean": experts_mean[0],
        "methods": methods,
        "method_summary": summary,
        "spread": spread,
    }
    if all("base" in per_seed[s] for s in seeds):  # every method's start, per domain and its mean
        cols = {d: [per_seed[s]["base"][d] for s in seeds] for d in domains}
        cols["mean"] = [sum(per_seed[s]["base"][d] for d in domains) / len(domains) for s in seeds]
        pairs = {k: mean_spread(v) for k, v in cols.items()}
        out["base"] = {k: m for k, (m, _) in pairs.items()}
        out["base_spread"] = {k: sd for k, (_, sd) in pairs.items()}
    return out


def report(cfg: JobConfig, plans: list[SeedPlan], per_seed: dict, *, wall_time_s: float) -> dict[str, Any]:
    owner = {d: n for n, t in cfg.teachers.items() for d in t.domains}
    domains = list(cfg.data.domains)
    agg = aggregate(per_seed, owner, domains)
    first = plans[0]
    budget_per_seed = {p.seed: budget_of(p) for p in plans}
    trained = next(iter(first.methods.values()), None)
    summary = {
        **agg,
        "budget": {
            "optimizer_steps": trained.train.steps if trained else 0,
            "samples_per_step": trained.train.global_batch_size if trained else 0,
            "samples": trained.train.steps * trained.train.global_batch_size if trained else 0,
            "student_init": "the shared base (seed<S>/base)",
            "recorded": budget_per_seed,
        },
        "seeds": [p.seed for p in plans],
        "per_seed": {str(s): v for s, v in per_seed.items()},
        "skipped": first.skipped,
        "step_times_s": {str(p.seed): step_times(p) for p in plans},
        "grpo_experts": bool(first.expert_grpo),
        "wall_time_s": wall_time_s,
        "run_dir": str(cfg.run_dir),
    }
    (cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    heatmap(agg, domains, cfg.run_dir / "heatmap.png")
    print_table(agg, domains, owner, len(plans), title=f"recipe: {cfg.run_dir}  ({wall_time_s:.0f} s)")
    times = summary["step_times_s"][str(first.seed)]
    for m, t in times.items():
        _say(f"{m}: per step {t['rollout_s']:.3f} s rollout, {t['teacher_scoring_s']:.3f} s teacher scoring, {t['training_s']:.3f} s training")
    _say(f"summary: {cfg.run_dir / 'summary.json'}  heat map: {cfg.run_dir / 'heatmap.png'}")
    return summary


def _cell(mean: float, sd: float, seeds: int) -> str:
    return f"{mean:.3f}" + (f" ±{sd:.3f}" if seeds > 1 else "")


def print_table(agg: dict, domains: list[str], owner: dict[str, str], seeds: int, *, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title + (f"; mean ± sd over {seeds} seeds" if seeds > 1 else ""))
    table.add_column("domain")
    table.add_column("expert (own domain)", justify="right")
    base = "base" in agg
    if base:
        table.add_column("base (the start)", justify="right")
    for m in agg["methods"]:
        table.add_column(m, justify="right")

    def start(k: str) -> list[str]:
        return [_cell(agg["base"][k], agg["base_spread"][k], seeds)] if base else []

    for d in domains:
        table.add_row(
            d,
            _cell(agg["experts"][d], agg["experts_spread"][d], seeds),
            *start(d),
            *(_cell(agg["methods"][m][d], agg["spread"][m][d], seeds) for m in agg["methods"]),
        )
    table.add_row("mean", f"{agg['experts_mean']:.3f}", *start("mean"),
                  *(_cell(agg["method_summary"][m]["mean"], agg["spread"][m]["mean"], seeds) for m in agg["methods"]))  # fmt: skip
    table.add_row(
        "worst / expert",
        "1.00",
        *(["-"] if base else []),
        *(
            _cell(agg["method_summary"][m]["worst_fraction_of_expert"], agg["spread"][m]["worst_fraction_of_expert"], seeds)
            for m in agg["methods"]
        ),
    )
    Console(width=200).print(table)


def heatmap(agg: dict, domains: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = ["base"] if "base" in agg else []
    columns = ["expert"] + start + list(agg["methods"])
    rows = domains + ["mean"]
    grid = [[agg["experts"][d]] + [agg["base"][d] for _ in start] + [agg["methods"][m][d] for m in agg["methods"]] for d in domains]
    grid.append([agg["experts_mean"]] + [agg["base"]["mean"] for _ in start] + [agg["method_summary"][m]["mean"] for m in agg["methods"]])
    fig, ax = plt.subplots(figsize=(1.1 * len(columns) + 2, 0.45 * len(rows) + 1.5))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=35, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)
    ax.set_title("held-out accuracy (mean over seeds)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def run_recipe(cfg: JobConfig) -> dict[str, Any] | None:
    """Every seed's phases that are not done, their evaluation, then the report. None when a phase
    stopped before its last step (a rerun resumes it)."""
    t0 = time.monotonic()
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    plans = [plan_seed(cfg, s) for s in cfg.recipe.seeds]
    for method, why in plans[0].skipped.items():
        _say(f"{method} is skipped: {why}")
    only = cfg.recipe.only
    if only:
        known = [p.id for plan in plans for p in phases(cfg, plan)]
        if only not in known and only != "report":
            raise ConfigError(f"recipe.only={only!r} is not a phase of this recipe; its phases: {known + ['report']}")
        if only != "report":  # one phase of the chain (launchers/recipe.py submit_chain)
            plan = next(p for p in plans if only.startswith(f"seed{p.seed}/"))
            if not run_seed(cfg, plan, only):
                return None
            if not only.endswith("/report"):
                return {"phase": only}
            return {"phase": only, **evaluate_seed(cfg, plan)}
    per_seed = {}
    for plan in plans:
        if not run_seed(cfg, plan):
            return None
        per_seed[plan.seed] = evaluate_seed(cfg, plan)
    return report(cfg, plans, per_seed, wall_time_s=time.monotonic() - t0)


# -- the same recipe on a cluster: a chain of sbatch jobs ---------------------------------------


@dataclass
class ChainJob:
    """One sbatch job of the chain: a phase (`megatron-opd run CONFIG recipe.only=<phase>`), the
    phases whose jobs must end well first (`--dependency=afterok`), and its script."""

    phase: str
    needs: list[str]
    script: Path
    text: str


def _var(phase: str) -> str:
    import re

    return "JOB_" + re.sub(r"[^A-Za-z0-9]", "_", phase).upper()


def chain(cfg: JobConfig, snapshot: Path, *, workdir: Path) -> list[ChainJob]:
    """Every phase of every seed as one sbatch job (experts in parallel: each needs only the
    base; each method needs every expert; the last job writes the table over all seeds)."""
    from launchers.slurm import _sbatch_lines, plan

    all_phases = [p for s in cfg.recipe.seeds for p in phases(cfg, plan_seed(cfg, s))]
    all_phases.append(Phase("report", [p.id for p in all_phases if p.id.endswith("/report")], {}, "report"))
    c = cfg.cluster
    run_dir = cfg.run_dir if cfg.run_dir.is_absolute() else workdir / cfg.run_dir
    jobs = []
    for phase in all_phases:
        log_dir = run_dir / "slurm" / phase.id
        name = f"{c.job_name or cfg.run.name}-{phase.id.replace('/', '-')}"
        p = plan(cfg, replace(c, job_name=name, log_dir=str(log_dir), teachers={}, rollout=replace(c.rollout, replicas=0)), workdir=workdir)
        argv = [c.python, "-m", "megatron_opd.cli", "run", str(snapshot), f"recipe.only={phase.id}"]
        lines = ["#!/bin/bash", *_sbatch_lines(p)]
        lines += [
            f"# recipe phase {phase.id} of {run_dir}",
            f"# needs: {', '.join(phase.needs) or 'nothing'} (sbatch --dependency=afterok on their jobs)",
            "# The phase resumes from its newest checkpoint by itself (a requeued job too); finished phases are skipped.",
            "set -uo pipefail",
            *c.setup,
            *(f"export {k}={_sh(v)}" for k, v in sorted(c.env.items())),
            " ".join(_sh(a) for a in argv) + " &",
            "PID=$!",
            "trap 'kill -USR1 \"$PID\" 2>/dev/null' USR1",
            "trap 'kill -TERM \"$PID\" 2>/dev/null' TERM",
            "while true; do",
            '    wait "$PID"',
            "    rc=$?",
            '    if ((rc > 128)) && kill -0 "$PID" 2>/dev/null; then continue; fi',
            "    break",
            "done",
        ]
        if c.requeue:
            lines += [
                f"# Exit 75: stopped early with a checkpoint; requeue (at most {c.max_requeues} times), the dependents wait.",
                f'if ((rc == 75)) && (("${{SLURM_RESTART_COUNT:-0}}" < {c.max_requeues})); then',
                '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
                "fi",
            ]
        lines.append('exit "$rc"')
        jobs.append(ChainJob(phase.id, list(phase.needs), log_dir / "sbatch.sh", "\n".join(lines) + "\n"))
    return jobs


def _sh(word: str) -> str:
    import shlex

    return word if word.startswith("$") and word[1:].replace("_", "").isalnum() else shlex.quote(str(word))


def chain_commands(jobs: list[ChainJob], sbatch: str = "sbatch") -> str:
    """The submission as a bash script: one sbatch per job, dependencies by the ids before it."""
    out = ["#!/bin/bash", "set -euo pipefail"]
    for job in jobs:
        dep = f" --dependency=afterok:{':'.join('$' + _var(n) for n in job.needs)}" if job.needs else ""
        out.append(f"{_var(job.phase)}=$({sbatch} --parsable{dep} {job.script} | cut -d';' -f1)")
    return "\n".join(out) + "\n"


def submit_chain(cfg: JobConfig, jobs: list[ChainJob], snapshot: Path, *, sbatch: str = "sbatch") -> dict[str, str]:
    """Write the snapshot and every script, then sbatch them in order; {phase: job id}."""
    import subprocess

    from megatron_opd.config import dump_config

    dump_config(derive(cfg, **{"recipe.only": ""}), snapshot)
    ids: dict[str, str] = {}
    for job in jobs:
        job.script.parent.mkdir(parents=True, exist_ok=True)
        job.script.write_text(job.text)
        args = [sbatch, "--parsable"]
        if job.needs:
            args.append("--dependency=afterok:" + ":".join(ids[n] for n in job.needs))
        result = subprocess.run([*args, str(job.script)], capture_output=True, text=True)
        job_id = result.stdout.strip().split(";")[0]
        if result.returncode != 0 or not job_id.isdigit():
            raise RuntimeError(
                f"sbatch of {job.phase} failed (status {result.returncode}): {result.stderr.strip() or result.stdout.strip()}; "
                f"submitted so far: {ids}"
            )
        ids[job.phase] = job_id
    return ids


def submit_recipe_command(cfg: JobConfig, *, dry_run: bool, sbatch: str, workdir: Path | None = None) -> int:
    """`megatron-opd submit` of a recipe config: check it, then print (--dry-run) or submit the chain."""
    import sys

    cfg.check(cfg.run.nproc, by_pipeline=True)
    if cfg.recipe.only:
        raise ConfigError("recipe.only is set by the chain for each of its jobs; submit the recipe without it")
    workdir = Path(cfg.cluster.workdir or workdir or Path.cwd()).resolve()
    run_dir = cfg.run_dir if cfg.run_dir.is_absolute() else workdir / cfg.run_dir
    snapshot = run_dir / "slurm" / "recipe.yaml"
    jobs = chain(cfg, snapshot, workdir=workdir)
    if dry_run:
        sys.stdout.write(chain_commands(jobs, sbatch))
        for job in jobs:
            sys.stdout.write(f"\n# ===== {job.script} =====\n{job.text}")
        return 0
    ids = submit_chain(cfg, jobs, snapshot, sbatch=sbatch)
    for phase, job_id in ids.items():
        print(f"{job_id} {phase}")
    print(f"submitted {len(ids)} jobs; the table lands in {run_dir} when job {ids['report']} ends", file=sys.stderr)
    return 0
