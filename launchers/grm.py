"""The GRM report (`megatron-opd run` of a grm config; issue 14): the actor as its own judge against
a scalar reward model, the hidden oracle and no RL, from one annotation set and one budget.

Once, in the run directory: the annotation file (data.annotations, made here when it does not
exist: `grm.annotations_size` random answers of the demonstrations' distribution, which the cold
start imitates, labelled by the oracle with `grm.annotator_noise`; never overwritten, its sha256
in the summary). Then per seed of `grm.seeds`, under `<run_dir>/seed<S>/`:

  cold/           grm_sft from random weights on [rubric, judge] (`grm.cold_start_overrides`)
  start/          judge RL on the annotations from the cold start (stage grm, data.domains [judge],
                  `grm.judge_rl_overrides`): the starting policy of every RL run below, and the
                  "none" row (no RL)
  reward_model/   the scalar RM: stage grm_rm from the start weights on the same annotations
                  (`grm.reward_model_overrides`)
  policies/<p>/   GRPO on the rubric task from the start weights, the same optimizer steps and the
                  same rubric samples per step (`train.global_batch_size` rubric samples; the GRM
                  runs interleave as many judge-RL samples on the annotations):
      grm           the live weights judge their own samples (data.domains [rubric, judge])
      grm_frozen    a frozen snapshot of the start weights judges (same interleaving)
      scalar_rm     the scalar RM's value is the reward (data.domains [rubric])
      oracle        the hidden oracle's score is the reward: the upper bound
  eval.json       stages/grm_eval.py against the oracle on data.eval_size held-out prompts x
                  `grm.eval_samples` samples: each policy's oracle score; the trained judge (the
                  grm run's final weights) and the scalar RM ranking the start policy's and the
                  end policy's samples (pairwise accuracy, rank correlation; the judge with k of
                  `grm.eval_votes`); best-of-1/4/16 of the start policy's samples by the judge,
                  the RM, the oracle and at random

then the report over seeds: the table (mean and spread), summary.json, and reward_gap.png (each
policy run's reward against the oracle's score of the same rubric samples, per rollout: reward
hacking shows as a widening gap). A rerun reuses every finished phase (stages/run_dir.py) and an
evaluation whose models did not change.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_opd.config import ConfigError, JobConfig, derive
from megatron_opd.runtime.spawn import spawn_world
from megatron_opd.stages.run_dir import read_summary

from launchers.local import _say, run_sft_jobs
from launchers.recipe import _checkpoint_id, mean_spread

RL_POLICIES = ("grm", "grm_frozen", "scalar_rm", "oracle")


@dataclass
class GRMSeedPlan:
    seed: int
    root: Path
    cold: JobConfig
    start: JobConfig
    reward_model: JobConfig | None
    policies: dict[str, JobConfig]  # the RL runs of grm.compare, in its order

    def waves(self) -> list[dict[str, JobConfig]]:
        """The phases in the order they run; the jobs of one wave need none of each other."""
        rm = [{"reward_model": self.reward_model}] if self.reward_model is not None else []
        return [{"cold": self.cold}, {"start": self.start}, *rm, *([self.policies] if self.policies else [])]


def annotation_path(cfg: JobConfig) -> Path:
    return Path(cfg.data.annotations) if cfg.data.annotations else cfg.run_dir / "annotations.jsonl"


def ensure_annotations(cfg: JobConfig) -> dict[str, Any]:
    """The annotation file, made once: B answers of the start policy's distribution (the cold
    start's random demonstrations) to training prompts, labelled by the oracle with noise."""
    from megatron_opd.data.rubric import RubricTasks, file_sha256, load_annotations, random_response
    from megatron_opd.grm_oracle.annotate import make_annotation_file

    path, g = annotation_path(cfg), cfg.grm
    if not path.exists():
        tasks = RubricTasks(cfg.data.seed, cfg.data.eval_size)
        rng = random.Random(f"annotations/{cfg.data.seed}")
        # Far past any run's training prompts: the labelled answers are not the ones RL samples.
        prompts = tasks.prompts(10**7, g.annotations_size)
        items = [(f"a{i}", p.metadata["query"], p.metadata["rubric"], random_response(rng, p.metadata["query"]))
                 for i, p in enumerate(prompts)]  # fmt: skip
        make_annotation_file(path, items, noise=g.annotator_noise, seed=cfg.data.seed)
        _say(f"annotations: {len(items)} labelled answers written to {path}")
    size = len(load_annotations(path, key="data.annotations"))
    return {"path": str(path), "sha256": file_sha256(path), "size": size, "noise": g.annotator_noise}


def plan_seed(cfg: JobConfig, seed: int) -> GRMSeedPlan:
    g, root = cfg.grm, cfg.run_dir / f"seed{seed}"
    ann = str(annotation_path(cfg))

    def phase(name: str, overrides: list[str], out: Path, **changes: Any) -> JobConfig:
        return derive(cfg, overrides, **{"run.output_dir": str(out), "run.name": name, "run.seed": seed,
                                         "data.annotations": ann, **changes})  # fmt: skip

    cold = phase("cold", g.cold_start_overrides, root, stage="grm_sft", **{"data.domains": ["rubric", "judge"],
                                                                        "train.init_from": ""})  # fmt: skip
    start = phase("start", g.judge_rl_overrides, root, stage="grm", **{"data.domains": ["judge"], "train.init_from": str(cold.run_dir)})
    reward_model = None
    if "scalar_rm" in g.compare:
        reward_model = phase("reward_model", g.reward_model_overrides, root, stage="grm_rm",
                             **{"data.domains": ["judge"], "train.init_from": str(start.run_dir)})  # fmt: skip
    policies = {}
    rubric_batch = cfg.train.global_batch_size
    for p in (p for p in g.compare if p in RL_POLICIES):
        changes: dict[str, Any] = {"stage": "grm", "train.init_from": str(start.run_dir)}
        if p in ("grm", "grm_frozen"):
            # Half of each rollout is judge RL on the annotations: as many rubric samples as the others.
            changes.update({"data.domains": ["rubric", "judge"], "train.global_batch_size": 2 * rubric_batch,
                            "train.micro_batch_size": 2 * cfg.train.micro_batch_size,
                            "grm.judge": "live" if p == "grm" else "frozen", "grm.policy_reward": "judge"})  # fmt: skip
        else:
            changes.update({"data.domains": ["rubric"], "grm.policy_reward": p,
                            "grm.reward_model": str(reward_model.run_dir) if p == "scalar_rm" else ""})  # fmt: skip
        policies[p] = phase(p, [], root / "policies", **changes)
    return GRMSeedPlan(seed, root, cold, start, reward_model, policies)


def check_plans(cfg: JobConfig) -> dict[int, GRMSeedPlan]:
    """Every seed's plan, each phase's job checked as `megatron-opd train` would check it, before
    anything runs; an error names the phase."""
    cfg.grm.check()
    plans = {seed: plan_seed(cfg, seed) for seed in cfg.grm.seeds}
    for plan in plans.values():
        for name, job in ((n, j) for wave in plan.waves() for n, j in wave.items()):
            try:
                job.check(job.run.nproc)
            except ConfigError as e:
                raise ConfigError(f"the GRM report's phase seed{plan.seed}/{name} ({job.stage}): {e}") from None
    return plans


def budget_of(plan: GRMSeedPlan) -> dict[str, dict[str, int]]:
    """Per RL run: optimizer steps (its summary), rubric samples and judge-RL samples (its ledger)."""
    from megatron_opd.stages.trainer import read_ledger

    out = {}
    for p, job in plan.policies.items():
        ids = [i for e in read_ledger(job.run_dir) for i in e["samples"]]
        out[p] = {"optimizer_steps": int((read_summary(job.run_dir) or {}).get("step", 0)),
                  "rubric_samples": sum(i.startswith("rubric/") for i in ids),
                  "judge_samples": sum(i.startswith("judge/") for i in ids)}  # fmt: skip
    return out


def evaluate_seed(cfg: JobConfig, plan: GRMSeedPlan) -> dict[str, Any]:
    """stages/grm_eval.py's evaluate_grm_seed in its own process, cached in eval.json by the
    checkpoints it read and the request."""
    from megatron_opd.stages.grm_eval import evaluate_grm_seed

    g = cfg.grm
    names = [p for p in g.compare if p != "none"]
    policies = {"none": str(plan.start.run_dir), **{p: str(plan.policies[p].run_dir) for p in names}}
    request = {
        "policies": policies, "start_name": "none", "end_name": "grm" if "grm" in policies else "",
        "judge": policies.get("grm", ""), "judge_before": str(plan.start.run_dir),
        "reward_model": str(plan.reward_model.run_dir) if plan.reward_model else "",
        "seed": plan.seed, "data_seed": cfg.data.seed, "eval_size": cfg.data.eval_size, "n": g.eval_samples,
        "votes": list(g.eval_votes), "temperature": cfg.rollout.temperature, "judge_temperature": g.judge_temperature,
    }  # fmt: skip
    dirs = sorted({*policies.values(), request["reward_model"]} - {""})
    key = {"request": request, "checkpoints": {d: _checkpoint_id(Path(d)) for d in dirs}}
    path = plan.root / "eval.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["result"]
    _say(f"seed {plan.seed}: evaluating {len(policies)} policies against the oracle")
    result = spawn_world(evaluate_grm_seed, 1, (request,), timeout_s=3600)[0]
    path.write_text(json.dumps({"key": key, "result": result}, indent=1))
    return result


def run_seed(cfg: JobConfig, plan: GRMSeedPlan) -> bool:
    """Every phase of one seed that is not finished; False when one stopped before its last step."""
    for jobs in plan.waves():
        if run_sft_jobs(jobs, cfg.pipeline.parallel_jobs, label=f"seed {plan.seed}"):
            return False
    return True


def _flat(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def aggregate(per_seed: dict[int, dict]) -> tuple[dict, dict]:
    """(means, spreads) over seeds of every number of the seeds' evaluations, nested like them; a
    key missing from a seed (a policy not run there) is left out."""
    flats = [_flat(r) for r in per_seed.values()]
    keys = [k for k in flats[0] if all(k in f for f in flats)]
    pairs = {k: mean_spread([float(f[k]) for f in flats]) for k in keys}
    return _nest({k: m for k, (m, _) in pairs.items()}), _nest({k: s for k, (_, s) in pairs.items()})


def report_text(cfg: JobConfig, mean: dict, spread: dict, seeds: list[int]) -> str:
    def cell(path: str) -> str:
        node_m, node_s = mean, spread
        for p in path.split("/"):
            if not isinstance(node_m, dict) or p not in node_m:
                return "-"
            node_m, node_s = node_m[p], node_s[p]
        return f"{node_m:.3f} ± {node_s:.3f}" if len(seeds) > 1 else f"{node_m:.3f}"

    lines = [f"GRM report, mean ± sd over seeds {seeds} ({cfg.data.eval_size} held-out prompts x "
             f"{cfg.grm.eval_samples} samples, against the hidden oracle)", "",
             "held-out oracle score of the policy, by its RL reward:"]  # fmt: skip
    for p in cfg.grm.compare:
        lines.append(f"  {p:<12} {cell(f'policy_oracle_score/{p}')}")
    lines += ["", "ranking the samples of a policy against the oracle   pairwise acc      rank corr"]
    rows = [(f"judge before RL, k={k}", f"judge_before_rl/start_policy/k{k}", "start") for k in cfg.grm.eval_votes]
    for which in ("start_policy", "end_policy"):
        rows += [(f"trained judge, k={k}", f"judge/{which}/k{k}", which.split("_")[0]) for k in cfg.grm.eval_votes]
        rows.append(("scalar RM", f"scalar_rm/{which}", which.split("_")[0]))
    for label, path, which in rows:
        if cell(f"{path}/pairwise_acc") != "-":
            lines.append(f"  {label:<22} {which + ' policy':<14} {cell(path + '/pairwise_acc'):>16} {cell(path + '/rank_corr'):>16}")
    lines += ["", "best-of-N of the start policy's samples (oracle score of the pick):"]
    bon = mean.get("best_of_n", {})
    whos = [w for w in ("judge", "scalar_rm", "oracle", "random") if any(w in r for r in bon.values())]
    lines.append("  N    " + "".join(f"{w:>18}" for w in whos))
    for size in sorted(bon, key=int):
        lines.append(f"  {size:<4} " + "".join(f"{cell(f'best_of_n/{size}/{w}'):>18}" for w in whos))
    return "\n".join(lines)


def run_grm_report(cfg: JobConfig) -> dict[str, Any] | None:
    """The whole report (module docstring); None when a phase stopped before its last step."""
    from megatron_opd.stages.grm_eval import plot_reward_gaps, reward_gaps

    plans = check_plans(cfg)
    annotations = ensure_annotations(cfg)
    per_seed, budgets, gaps = {}, {}, {}
    for seed, plan in plans.items():
        if not run_seed(cfg, plan):
            return None
        per_seed[seed] = evaluate_seed(cfg, plan)
        budgets[seed] = budget_of(plan)
        gaps[seed] = reward_gaps({p: job.run_dir for p, job in plan.policies.items() if p != "oracle"})
        for p, series in gaps[seed].items():
            per_seed[seed].setdefault("reward_gap", {})[p] = {"first": series[0]["gap"], "last": series[-1]["gap"]}
    mean, spread = aggregate(per_seed)
    text = report_text(cfg, mean, spread, list(cfg.grm.seeds))
    print(text, flush=True)
    out = cfg.run_dir
    if any(gaps.values()):
        plot_reward_gaps(gaps, out / "reward_gap.png")
    summary = {"annotations": annotations, "seeds": list(cfg.grm.seeds), "budget": budgets[cfg.grm.seeds[0]],
               "budget_by_seed": budgets, "mean": mean, "spread": spread, "per_seed": per_seed,
               "reward_gap_by_rollout": gaps}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "report.txt").write_text(text + "\n")
    _say(f"report: {out / 'report.txt'}, {out / 'summary.json'}, {out / 'reward_gap.png'}")
    return summary
