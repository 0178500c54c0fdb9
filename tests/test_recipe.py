"""The recipe experiment (launchers/recipe.py): base, experts, every method, the table.

- a cut-down recipe (three domains with a conflicting pair, a few steps, one seed) runs end to end
  through the real `megatron-opd run` (spawned rank worlds, real teacher servers, the real merge
  tool) and writes the summary with every method, the heat map and the table; every expert is
  fine-tuned from the one base; its held-out accuracy through the model-evaluation path equals
  the accuracy its own training run measured; a rerun reuses every finished phase;
- the budget: every trained method's run records the same optimizer steps and samples (its
  summary and its sample ledger), and a config that would give one method another budget is refused;
- the aggregation over seeds against hand-computed means, spreads and worst-domain fractions;
- mixed SFT's data: recorded responses replace the rule's answers, and a file that does not match
  the prompt source is refused.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_opd.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ["sort", "dsort", "add"]  # sort/dsort: one body, two tags, two rules


def _cut_down(tmp_path: Path) -> Path:
    c = yaml.safe_load((REPO / "configs" / "tiny" / "recipe.yaml").read_text())
    c["run"].update(name="cut", output_dir=str(tmp_path / "runs"), log_every=5)
    c["data"].update(domains=DOMAINS, eval_size=16)
    c["teachers"] = {d: {"domains": [d]} for d in DOMAINS}
    short = ["train.optim.lr=3e-3", "train.optim.decay=constant", "train.optim.warmup_steps=0"]
    # eval_every: each expert's SFT also measures its held-out accuracy itself (checked below).
    c["pipeline"]["expert_overrides"] = ["train.steps=10", "train.global_batch_size=64", "train.micro_batch_size=64", "train.eval_every=1000", *short]
    r = c["recipe"]
    r["seeds"] = [7]
    r["base_overrides"] = ["train.steps=20", "train.global_batch_size=64", "train.micro_batch_size=64", *short]
    c["pipeline"]["expert_rl_overrides"] = ["train.steps=2", "train.global_batch_size=32", "train.micro_batch_size=32", "grpo.group_size=4"]
    r["budget_overrides"] = ["train.steps=4", "train.global_batch_size=24", "train.micro_batch_size=24"]
    r["method_overrides"] = {"mixed_rl": ["grpo.group_size=4"]}
    path = tmp_path / "cut.yaml"
    path.write_text(yaml.safe_dump(c, sort_keys=False))
    return path


def _run(config: Path, log: Path) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "megatron_opd.cli", "run", str(config)],
        cwd=REPO,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    log.write_text(out.stdout + "\n--- stderr ---\n" + out.stderr)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


# About 15 worlds and 3 servers start one after another (base, 3 x expert SFT and GRPO, expert
# samples, 3 OPD, mixed SFT, mixed RL, evaluation): a few minutes on an idle 2-core machine, more
# than the suite's default 900 s when several jobs share its cores.
@pytest.mark.timeout(2400)
def test_recipe_cut_down_end_to_end(tmp_path):
    from launchers.recipe import grpo_available, plan_seed
    from megatron_opd.stages.run_dir import read_summary
    from megatron_opd.stages.trainer import read_ledger

    config = _cut_down(tmp_path)
    cfg = load_config(config)
    first = _run(config, tmp_path / "first.log")
    root = cfg.run_dir
    summary = json.loads((root / "summary.json").read_text())
    assert (root / "heatmap.png").stat().st_size > 0

    # Every method, on every domain; mixed RL runs when the grpo stage exists, and is named as skipped otherwise.
    methods = list(cfg.recipe.methods)
    ran = [m for m in methods if not (m == "mixed_rl" and not grpo_available())]
    assert list(summary["methods"]) == ran
    assert set(summary["base"]) == {*DOMAINS, "mean"} and all(0 <= v <= 1 for v in summary["base"].values())
    assert ("mixed_rl" in summary["skipped"]) == (not grpo_available())
    for m in ran:
        assert set(summary["methods"][m]) == set(DOMAINS)  # {method: {domain: held-out accuracy}}
        assert all(0 <= summary["methods"][m][d] <= 1 for d in DOMAINS)
        assert summary["method_summary"][m]["mean"] == pytest.approx(sum(summary["methods"][m][d] for d in DOMAINS) / 3)
        fractions = [summary["methods"][m][d] / summary["experts"][d] for d in DOMAINS if summary["experts"][d] > 0]
        worst = summary["method_summary"][m]["worst_fraction_of_expert"]
        assert worst == pytest.approx(min(fractions)) if fractions else math.isnan(worst)
        assert m in first.stdout  # a column of the printed table
    assert set(summary["experts"]) == set(DOMAINS)
    assert summary["seeds"] == [7]

    # One base: every expert's first phase starts from it, every method (and the merges' base) too.
    plan = plan_seed(cfg, 7)
    base = str(plan.base.run_dir)
    assert all(job.train.init_from == base for job in plan.expert_sft.values())
    assert all(job.train.init_from == base for job in plan.methods.values())
    assert bool(plan.expert_grpo) == grpo_available()
    for name, job in plan.expert_grpo.items():
        assert job.train.init_from == str(plan.expert_sft[name].run_dir)
    for m in ("task_arithmetic", "ties"):
        manifest = json.loads((plan.merge_dir(m) / "manifest.json").read_text())
        assert Path(manifest["base"]) == Path(base).resolve()

    # The evaluation path agrees with the experts' own held-out evaluation (SFT-only experts; the
    # table's expert is the expert's last phase).
    heldout = json.loads((plan.root / "heldout.json").read_text())
    for name, job in plan.expert_sft.items():
        if name not in plan.expert_grpo:
            assert heldout[f"expert/{name}"]["acc"][name] == pytest.approx(read_summary(job.run_dir)[f"acc/{name}"])

    # The budget: the same optimizer steps and samples in every trained method's own records.
    budget = summary["budget"]
    assert budget["optimizer_steps"] == 4 and budget["samples"] == 4 * 24
    for m, job in plan.methods.items():
        assert read_summary(job.run_dir)["step"] == 4, m
        ids = [i for entry in read_ledger(job.run_dir) for i in entry["samples"]]
        assert len(ids) == 4 * 24 and len(set(ids)) == len(ids), m
        assert summary["budget"]["recorded"]["7"][m] == {"optimizer_steps": 4, "samples": 96}
    samples = (plan.samples_path).read_text().splitlines()
    assert len(samples) == 4 * 24  # mixed SFT's data: the experts' answers to its training prompts

    # On-policy methods report their step time split.
    for m in ("opd_hidden", "opd_topk", "opd_sampled"):
        t = summary["step_times_s"]["7"][m]
        assert t["rollout_s"] > 0 and t["teacher_scoring_s"] > 0 and t["training_s"] > 0

    # A rerun reuses every finished phase: no training, no merge, no evaluation.
    again = _run(config, tmp_path / "second.log")
    for line in ("SFT:", "merging", "held-out accuracy of", "teacher servers ready", "recording"):
        assert line not in again.stdout
    assert json.loads((root / "summary.json").read_text())["methods"] == summary["methods"]


def test_budget_is_the_same_for_every_method(tmp_path):
    config = _cut_down(tmp_path)
    with pytest.raises(ConfigError, match="every method has the same budget"):
        load_config(config, ["recipe.method_overrides={mixed_sft: [train.steps=9]}"]).check(1, by_pipeline=True)
    with pytest.raises(ConfigError, match="recipe.methods names"):
        load_config(config, ["recipe.methods=[opd_hidden, model_soup]"]).check(1, by_pipeline=True)
    from launchers.recipe import plan_seed

    plan = plan_seed(load_config(config), 7)
    assert {(j.train.steps, j.train.global_batch_size) for j in plan.methods.values()} == {(4, 24)}
    assert {j.train.init_from for j in plan.methods.values()} == {str(plan.base.run_dir)}


def test_aggregate_over_seeds_by_hand():
    from launchers.recipe import aggregate

    owner = {"a": "ea", "b": "eb"}
    per_seed = {
        1: {"experts": {"ea": {"a": 0.8}, "eb": {"b": 0.5}}, "methods": {"m": {"a": 0.4, "b": 0.5}}},
        2: {"experts": {"ea": {"a": 1.0}, "eb": {"b": 0.0}}, "methods": {"m": {"a": 0.6, "b": 0.1}}},
    }
    agg = aggregate(per_seed, owner, ["a", "b"])
    assert agg["experts"] == pytest.approx({"a": 0.9, "b": 0.25})
    assert agg["experts_spread"]["a"] == pytest.approx(math.sqrt(0.02))  # sample sd of 0.8, 1.0
    m, sd = {**agg["methods"]["m"], **agg["method_summary"]["m"]}, agg["spread"]["m"]
    assert agg["methods"]["m"] == pytest.approx({"a": 0.5, "b": 0.3})
    assert m["mean"] == pytest.approx((0.45 + 0.35) / 2)
    # seed 1: min(0.4/0.8, 0.5/0.5) = 0.5; seed 2: b's expert scored 0 (no fraction), 0.6/1.0 = 0.6
    assert m["worst_fraction_of_expert"] == pytest.approx(0.55)
    assert sd["worst_fraction_of_expert"] == pytest.approx(math.sqrt(0.005))


def test_recorded_responses_replace_the_rules_answers(tmp_path):
    from megatron_opd.data.domains import TinyDomains
    from megatron_opd.data.samples import RecordedResponses, write_samples
    from megatron_opd.data.tokenizer import CharTokenizer
    from megatron_opd.stages.sft import encode_demonstrations

    source = TinyDomains(DOMAINS, seed=0, eval_size=8)
    prompts = source.prompts(0, 6)
    path = tmp_path / "s.jsonl"
    wrong = [{"index": i, "domain": p.domain, "prompt": p.text, "response": "9" * (i % 3)} for i, p in enumerate(prompts)]
    write_samples(path, wrong)
    recorded = RecordedResponses(source, path)
    tok = CharTokenizer()
    rows = encode_demonstrations(recorded.demonstrations(0, 6), tok, 16)
    for (ids, mask), p, s in zip(rows, prompts, wrong):
        # SFT trains on the recorded answer (even an empty one, then EOS alone), not on the rule's.
        assert tok.decode(ids) == p.text + s["response"]
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == s["response"]
        assert sum(mask) == len(s["response"]) + 1
    assert recorded.eval_prompts("sort") == source.eval_prompts("sort")
    with pytest.raises(ValueError, match="none at index 6"):
        recorded.prompt(6)
    other = RecordedResponses(TinyDomains(DOMAINS, seed=1, eval_size=8), path)
    with pytest.raises(ValueError, match="recorded for another data section"):
        other.prompt(0)


# -- the cluster chain ---------------------------------------------------------------------------


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "megatron_opd.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _deps(commands: str) -> dict[str, list[str]]:
    """{job variable: [the variables of its afterok dependencies]} from the submission script."""
    import re

    out = {}
    for line in commands.splitlines():
        m = re.match(r"(JOB_\w+)=\$\(sbatch --parsable(?: --dependency=afterok:(\S+))? (\S+)", line)
        if m:
            out[m.group(1)] = [d.lstrip("$") for d in (m.group(2) or "").split(":") if d]
    return out


def test_submit_dry_run_renders_the_chain_with_dependencies(tmp_path):
    from launchers.recipe import grpo_available

    out = _cli("submit", str(REPO / "configs/tiny/recipe.yaml"), "recipe.seeds=[5]", "--dry-run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    commands, _, scripts = out.stdout.partition("\n# ===== ")
    deps = _deps(commands)
    base, report = "JOB_SEED5_BASE", "JOB_SEED5_REPORT"
    experts = [f"JOB_SEED5_EXPERTS_{d.upper()}_{'GRPO' if grpo_available() else 'SFT'}" for d in ("add", "sub", "reverse", "sort", "dsort", "count", "rot1", "rot3", "max", "min")]
    assert deps[base] == []
    for d in ("add", "sub", "reverse", "sort", "dsort", "count", "rot1", "rot3", "max", "min"):
        # experts in parallel: each needs only the base (its GRPO only its own SFT)
        assert deps[f"JOB_SEED5_EXPERTS_{d.upper()}_SFT"] == [base]
        if grpo_available():
            assert deps[f"JOB_SEED5_EXPERTS_{d.upper()}_GRPO"] == [f"JOB_SEED5_EXPERTS_{d.upper()}_SFT"]
    methods = [v for v in deps if v.startswith("JOB_SEED5_METHODS_")]
    assert {"JOB_SEED5_METHODS_OPD_HIDDEN", "JOB_SEED5_METHODS_OPD_TOPK", "JOB_SEED5_METHODS_OPD_SAMPLED", "JOB_SEED5_METHODS_MIXED_SFT"} <= set(methods)
    assert ("JOB_SEED5_METHODS_MIXED_RL" in methods) == grpo_available()
    for m in methods:
        assert set(experts) <= set(deps[m])  # a method starts once every expert is done
    assert set(methods) | set(experts) <= set(deps[report])
    assert deps["JOB_REPORT"] == [report]
    order = list(deps)
    assert all(order.index(d) < order.index(j) for j, ds in deps.items() for d in ds)  # ids exist when used
    # Each job runs its one phase of the same recipe snapshot, and nothing was written.
    assert "recipe.only=seed5/experts/add/sft" in scripts and "recipe.only=report" in scripts
    assert scripts.count("#!/bin/bash") == len(deps)
    assert not (tmp_path / "runs").exists()
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash" + scripts.split("#!/bin/bash")[1])
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_submit_passes_each_jobs_dependencies_to_sbatch(tmp_path):
    calls = tmp_path / "calls"
    exe = tmp_path / "sbatch"
    # A fake sbatch: records its arguments, answers ids 100, 101, ...
    exe.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nn=$(wc -l < {calls})\necho $((99 + n))\n')
    exe.chmod(0o755)
    out = _cli("submit", str(REPO / "configs/tiny/recipe.yaml"), "recipe.seeds=[5]", "--sbatch", str(exe), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = calls.read_text().splitlines()
    ids = dict(line.split(" ", 1)[::-1] for line in out.stdout.splitlines())  # phase -> id
    assert ids["seed5/base"] == "100" and lines[0].split() == ["--parsable", str(tmp_path / "runs/recipe/slurm/seed5/base/sbatch.sh")]
    assert lines[1].split()[:2] == ["--parsable", "--dependency=afterok:100"]  # the first expert needs the base
    assert lines[-1].split()[1] == f"--dependency=afterok:{ids['seed5/report']}"
    snapshot = tmp_path / "runs/recipe/slurm/recipe.yaml"
    assert load_config(snapshot).recipe.seeds == [5]  # every job reads this snapshot
    assert (tmp_path / "runs/recipe/slurm/seed5/methods/opd_hidden/sbatch.sh").is_file()


def test_only_runs_one_phase_and_needs_its_dependencies(tmp_path):
    config = _cut_down(tmp_path)
    out = _cli("run", str(config), "recipe.only=seed7/methods/opd_hidden", cwd=tmp_path)
    assert out.returncode == 2 and "needs ['seed7/base'" in out.stderr
    out = _cli("run", str(config), "recipe.only=seed7/nothing", cwd=tmp_path)
    assert out.returncode == 2 and "is not a phase of this recipe" in out.stderr
    assert not (tmp_path / "runs" / "cut" / "seed7" / "methods").exists()


def test_training_waves_pair_independent_phases_in_order():
    from launchers.recipe import Phase, training_waves

    ps = [Phase("base", [], {}), Phase("a/sft", ["base"], {}), Phase("a/grpo", ["a/sft"], {}),
          Phase("b/sft", ["base"], {}), Phase("b/grpo", ["b/sft"], {}), Phase("opd", ["a/grpo", "b/grpo"], {}, "opd"),
          Phase("rl", ["base"], {}), Phase("report", [], {}, "report")]  # fmt: skip
    waves = [[p.id for p in w] for w in training_waves(ps)]
    # base + a/sft share a wave only if a/sft does not need base: it does, so each dependency cuts.
    assert waves == [["base"], ["a/sft"], ["a/grpo", "b/sft"], ["b/grpo"], ["opd"], ["rl"], ["report"]]
    assert [p.id for w in training_waves(ps) for p in w] == [p.id for p in ps]  # nothing lost or reordered
