"""The GRM's evaluator (issue 14): the judge and the policies against the hidden oracle.

The only module besides the annotation maker that imports the oracle (grm_oracle/); no training
code imports this one. What it measures, on held-out prompts and fresh samples:

- pairwise accuracy of the judge: over pairs of responses to the same prompt whose oracle
  scores differ, 1 when the judge's scores order them the same way strictly, 0.5 on a judge tie,
  0 when reversed (`pairwise_accuracy`);
- rank correlation (Spearman, average ranks for ties) of judge and oracle scores per prompt,
  averaged over prompts whose scores are not all equal (`rank_correlation`);
- best-of-N: the oracle score of the response the judge picks among N samples (first maximum),
  of the oracle's own pick (the ceiling) and of a random pick (`best_of_n`);
- the judge-vs-oracle reward gap over training from a GRM run's grm_samples.jsonl (`reward_gap`).

The ranking metrics themselves live in rewards/ranking.py (oracle-free: the scalar RM's fit uses
them too).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from megatron_opd.grm_oracle import oracle
from megatron_opd.rewards.ranking import best_of_n, pairwise_accuracy, rank_correlation, spearman  # noqa: F401 (the evaluator's metrics)


def oracle_scores(samples: Sequence[tuple[str, str, str]]) -> list[float]:
    """The oracle's quality of each (query, rubric, response)."""
    return [oracle.score(q, r, resp) for q, r, resp in samples]


def reward_gap(samples_file: str | Path) -> list[dict[str, float]]:
    """Per rollout of a GRM run: the mean judge reward of its rubric samples, their mean oracle
    score and the gap (judge - oracle); a redone rollout (resume) counts once, its last record."""
    rows: dict[tuple[int, str], dict] = {}
    for line in Path(samples_file).read_text().splitlines():
        r = json.loads(line)
        rows[(r["rollout"], r["sample_id"])] = r
    per: dict[int, list[tuple[float, float]]] = {}
    for (k, _), r in sorted(rows.items()):
        per.setdefault(k, []).append((r["reward"], oracle.score(r["query"], r["rubric"], r["response"])))
    out = []
    for k, pairs in sorted(per.items()):
        judge = sum(p[0] for p in pairs) / len(pairs)
        truth = sum(p[1] for p in pairs) / len(pairs)
        out.append({"rollout": k, "judge": judge, "oracle": truth, "gap": judge - truth})
    return out


def plot_reward_gaps(gaps: dict[int, dict[str, list[dict[str, float]]]], path: str | Path) -> None:
    """One panel per run name: its mean reward and the oracle's score of its rubric samples per
    rollout (`reward_gap`), averaged over the seeds of `gaps` ({seed: {run: gap}}); where the two
    part, the policy exploits its reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted({name for g in gaps.values() for name in g})
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3.4), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], runs):
        series = [g[name] for g in gaps.values() if name in g]
        steps = min(len(s) for s in series)
        x = [series[0][i]["rollout"] for i in range(steps)]
        for key, label in (("judge", "its reward"), ("oracle", "oracle score")):
            ax.plot(x, [sum(s[i][key] for s in series) / len(series) for i in range(steps)], label=label)
        ax.set_title(name)
        ax.set_xlabel("rollout")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- policies, judges and reward models on held-out prompts ---------------------------------------


@dataclass
class PolicySamples:
    """`n` samples per held-out prompt (rows grouped by prompt) and their oracle scores."""

    rows: list  # Prompt per sample
    texts: list[str]
    truth: list[list[float]]  # [prompt][sample]

    @property
    def n(self) -> int:
        return len(self.truth[0])

    def grouped(self, flat: Sequence[float]) -> list[list[float]]:
        return [list(flat[i : i + self.n]) for i in range(0, len(flat), self.n)]

    @property
    def mean_oracle(self) -> float:
        return sum(map(sum, self.truth)) / len(self.texts)


def sample_policy(model, model_cfg, tokenizer, prompts: Sequence, n: int, *, seed: int, temperature: float) -> PolicySamples:
    """`n` samples per prompt at `temperature`, each seeded by (seed, its row): two policies are
    sampled with the same seeds, and a rerun repeats them."""
    from megatron_opd.data.rubric import MAX_RESPONSE_LEN
    from megatron_opd.serving.requests import GenItem
    from megatron_opd.stages.grm import generate_texts, model_generator

    rows = [p for p in prompts for _ in range(n)]
    items = [GenItem(input_ids=tokenizer.encode_prompt(p.text), max_new_tokens=MAX_RESPONSE_LEN + 1, temperature=temperature,
                     stop_token_ids=(tokenizer.eos_id,), sampling_seed=random.Random(f"eval/{seed}/{i}").getrandbits(31))
             for i, p in enumerate(rows)]  # fmt: skip
    texts = generate_texts(model_generator(model, model_cfg, tokenizer), items)
    flat = oracle_scores([(p.metadata["query"], p.metadata["rubric"], t) for p, t in zip(rows, texts)])
    return PolicySamples(rows, texts, [flat[i : i + n] for i in range(0, len(rows), n)])


def ranking_report(scores: list[list[float]], samples: PolicySamples) -> dict[str, float]:
    """How a scorer's scores order each prompt's samples against the oracle's."""
    acc, pairs = pairwise_accuracy(scores, samples.truth)
    return {"pairwise_acc": acc, "pairs": pairs, "rank_corr": rank_correlation(scores, samples.truth)}


def judge_report(judge, samples: PolicySamples, k: int, *, seed: int) -> tuple[dict[str, float], list[list[float]]]:
    """(ranking report plus the format-failure rate, the scores) of k voted verdicts of `judge`
    on every sample; a sample no vote parses for scores -1 (below every parsed score)."""
    from megatron_opd.rewards.base import reward_inputs
    from megatron_opd.rewards.grm import GRMReward

    results = GRMReward(judge, k=k, seed=seed, format_reward=-1.0).score(reward_inputs(samples.rows, samples.texts))
    scores = samples.grouped([r.score for r in results])
    report = ranking_report(scores, samples)
    report["format_fail"] = sum(r.info["format_failure"] for r in results) / len(results)
    return report, scores


def value_scores(value_model, samples: PolicySamples) -> list[list[float]]:
    """A scalar reward model's value of every sample, grouped by prompt."""
    from megatron_opd.rewards.base import reward_inputs
    from megatron_opd.rewards.grm import ScalarRMReward

    results = ScalarRMReward(value_model).score(reward_inputs(samples.rows, samples.texts))
    return samples.grouped([r.score for r in results])


def evaluate_grm_seed(request: dict) -> dict:
    """Rank entry (one process, `spawn_world`) of the GRM report's evaluation of one seed.

    request: policies {name: model dir} (each sampled `n` times per held-out prompt); start_name
    (the policy every RL run started from) and end_name (optional: the GRM run's, the end policy);
    judge (optional: the trained judge's dir, the GRM run's final weights), judge_before (optional:
    the judge before RL, the start policy's weights), reward_model (optional: the scalar RM's dir);
    seed, data_seed, eval_size, n, votes [k...], temperature (policy sampling), judge_temperature.
    Returns {"policy_oracle_score": {name: mean}, "judge": {"start_policy"|"end_policy": {"k<k>":
    report}}, "judge_before_rl": {"start_policy": ...}, "scalar_rm": {...}, "best_of_n": {N: {judge,
    scalar_rm, oracle, random}}} (best-of-N on the start policy's samples, the judge with the most votes).
    """
    from megatron_opd.data.rubric import RubricTasks
    from megatron_opd.runtime.distributed import init_runtime, shutdown
    from megatron_opd.runtime.layout import ParallelLayout
    from megatron_opd.stages.grm import ModelJudge, ModelValue
    from megatron_opd.stages.model_eval import open_model

    layout = init_runtime(ParallelLayout(), request["seed"])
    models: dict[str, tuple] = {}

    def model(path: str):
        if path not in models:
            from megatron_opd.models.model_dir import read_model_dir

            m, tok = open_model(path, layout)
            models[path] = (m, tok, read_model_dir(path).model)
        return models[path]

    try:
        prompts = RubricTasks(request["data_seed"], request["eval_size"]).eval_prompts("rubric")
        seed, n, votes = request["seed"], request["n"], sorted(request["votes"])
        samples = {}
        for name, path in request["policies"].items():
            m, tok, mcfg = model(path)
            samples[name] = sample_policy(m, mcfg, tok, prompts, n, seed=seed, temperature=request["temperature"])
        out: dict = {"policy_oracle_score": {name: s.mean_oracle for name, s in samples.items()}}
        start, end = samples[request["start_name"]], samples.get(request.get("end_name", ""))
        judged = {"start_policy": start, **({"end_policy": end} if end is not None else {})}

        def judge_of(path: str) -> ModelJudge:
            m, tok, mcfg = model(path)
            return ModelJudge(m, mcfg, tok, temperature=request["judge_temperature"])

        picks: dict[str, list[list[float]]] = {}  # the start policy's samples, scored: best-of-N
        judges = (("judge", request.get("judge", ""), judged),
                  ("judge_before_rl", request.get("judge_before", ""), {"start_policy": start}))  # fmt: skip
        for key, path, on in judges:
            if not path:
                continue
            judge = judge_of(path)
            out[key] = {which: {} for which in on}
            for which, s in on.items():
                for k in votes:  # ascending: the most votes pick last
                    out[key][which][f"k{k}"], scores = judge_report(judge, s, k, seed=seed)
                    if (key, which) == ("judge", "start_policy"):
                        picks["judge"] = scores
        if request.get("reward_model"):
            m, tok, mcfg = model(request["reward_model"])
            value = ModelValue(m, mcfg, tok)
            scored = {which: value_scores(value, s) for which, s in judged.items()}
            out["scalar_rm"] = {which: ranking_report(scores, judged[which]) for which, scores in scored.items()}
            picks["scalar_rm"] = scored["start_policy"]
        out["best_of_n"] = {}
        for size in (size for size in (1, 4, 16) if size <= n):
            ceiling = best_of_n(start.truth, start.truth, size, seed=seed)  # the oracle's pick, and a random one
            out["best_of_n"][str(size)] = {
                "oracle": ceiling["oracle"], "random": ceiling["random"],
                **{who: best_of_n(scores, start.truth, size, seed=seed)["judge"] for who, scores in picks.items()},
            }  # fmt: skip
        return out
    finally:
        shutdown()


def reward_gaps(runs: dict[str, str | Path]) -> dict[str, list[dict[str, float]]]:
    """`reward_gap` of each run directory that logged rubric samples (grm_samples.jsonl)."""
    return {name: reward_gap(Path(d) / "grm_samples.jsonl") for name, d in runs.items()
            if (Path(d) / "grm_samples.jsonl").is_file()}  # fmt: skip


# -- a policy and a judge from model directories ----------------------------------------------------


def evaluate_dirs(policy_dir: str, judge_dir: str, *, n: int = 16, votes: Sequence[int] = (1, 4), seed: int = 0,
                  data_seed: int = 0, eval_size: int = 64, temperature: float = 1.0) -> dict[str, float]:  # fmt: skip
    """The policy's held-out oracle score, and the judge's ranking of its samples for each k of
    `votes` (pairwise accuracy, rank correlation, format failures) with best-of-1/4/16, flat."""
    from megatron_opd.runtime.spawn import spawn_world

    request = {"policies": {"policy": policy_dir}, "start_name": "policy", "judge": judge_dir, "seed": seed,
               "data_seed": data_seed, "eval_size": eval_size, "n": n, "votes": list(votes), "temperature": temperature,
               "judge_temperature": temperature}  # fmt: skip
    result = spawn_world(evaluate_grm_seed, 1, (request,), timeout_s=3600)[0]
    report: dict[str, float] = {"policy_oracle_score": result["policy_oracle_score"]["policy"], "eval_prompts": eval_size,
                                "samples_per_prompt": n}  # fmt: skip
    for k, r in result["judge"]["start_policy"].items():
        report.update({f"{k}/{m}": v for m, v in r.items()})
    for size, picks in result["best_of_n"].items():
        report.update({f"best_of_{size}/{who}": v for who, v in picks.items()})
    return report


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m megatron_opd.stages.grm_eval", description=__doc__.splitlines()[0])
    ap.add_argument("--policy", required=True, help="the policy's model directory (a run directory)")
    ap.add_argument("--judge", required=True, help="the judge's model directory (the same one: actor as judge)")
    ap.add_argument("--prompts", type=int, default=64, help="held-out prompts (data.eval_size of the runs)")
    ap.add_argument("--data-seed", type=int, default=0, help="data.seed of the runs (their held-out set)")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--votes", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="write the report here as JSON")
    ap.add_argument("--plot", default="", help="plot the policy run's judge-vs-oracle reward gap here (PNG)")
    a = ap.parse_args(argv)
    report = evaluate_dirs(a.policy, a.judge, n=a.n, votes=a.votes, seed=a.seed, data_seed=a.data_seed, eval_size=a.prompts)
    samples = Path(a.policy) / "grm_samples.jsonl"
    if samples.is_file():  # a GRM run: the gap between its judged rewards and the oracle, per rollout
        gap = reward_gap(samples)
        report["reward_gap/first"], report["reward_gap/last"] = gap[0]["gap"], gap[-1]["gap"]
        report["reward_gap/oracle_first"], report["reward_gap/oracle_last"] = gap[0]["oracle"], gap[-1]["oracle"]
        if a.plot:
            plot_reward_gaps({a.seed: {Path(a.policy).name: gap}}, a.plot)
    text = json.dumps(report, indent=1, sort_keys=True)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
