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
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

from megatron_opd.grm_oracle import oracle


def oracle_scores(samples: Sequence[tuple[str, str, str]]) -> list[float]:
    """The oracle's quality of each (query, rubric, response)."""
    return [oracle.score(q, r, resp) for q, r, resp in samples]


def pairwise_accuracy(judge: Sequence[Sequence[float]], truth: Sequence[Sequence[float]]) -> tuple[float, int]:
    """(accuracy, pairs) over the pairs within each group (a prompt's responses) whose truths differ."""
    total, pairs = 0.0, 0
    for js, ts in zip(judge, truth, strict=True):
        for i in range(len(ts)):
            for j in range(i + 1, len(ts)):
                if ts[i] == ts[j]:
                    continue
                pairs += 1
                d = (js[i] - js[j]) * (ts[i] - ts[j])
                total += 1.0 if d > 0 else 0.5 if js[i] == js[j] else 0.0
    return (total / pairs if pairs else float("nan")), pairs


def _ranks(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho with average ranks; nan when either side is constant."""
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / (va * vb) ** 0.5 if va and vb else float("nan")


def rank_correlation(judge: Sequence[Sequence[float]], truth: Sequence[Sequence[float]]) -> float:
    """Mean per-group Spearman over groups where both sides vary (a constant judge counts 0)."""
    rhos = []
    for js, ts in zip(judge, truth, strict=True):
        if len(set(ts)) < 2:
            continue
        rho = spearman(js, ts)
        rhos.append(0.0 if rho != rho else rho)
    return sum(rhos) / len(rhos) if rhos else float("nan")


def best_of_n(judge: Sequence[Sequence[float]], truth: Sequence[Sequence[float]], n: int, *, seed: int) -> dict[str, float]:
    """Mean oracle score of the judge's pick, the oracle's pick and a random pick among the first
    `n` responses of each group."""
    rng = random.Random(seed)
    picks = {"judge": 0.0, "oracle": 0.0, "random": 0.0}
    for js, ts in zip(judge, truth, strict=True):
        if len(ts) < n:
            raise ValueError(f"best-of-{n} needs {n} responses per prompt, got {len(ts)}")
        js, ts = js[:n], ts[:n]
        picks["judge"] += ts[max(range(n), key=lambda i: js[i])]
        picks["oracle"] += max(ts)
        picks["random"] += ts[rng.randrange(n)]
    return {k: v / len(truth) for k, v in picks.items()}


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


def plot_reward_gap(gap: Sequence[dict[str, float]], path: str | Path) -> None:
    """The judge's reward and the oracle's score of the rubric samples per rollout (reward_gap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = [g["rollout"] for g in gap]
    ax.plot(x, [g["judge"] for g in gap], label="judge reward (GRM)")
    ax.plot(x, [g["oracle"] for g in gap], label="oracle score")
    ax.plot(x, [g["gap"] for g in gap], label="gap (judge - oracle)", linestyle="--")
    ax.set_xlabel("rollout")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- a policy and a judge from model directories ----------------------------------------------------


def evaluate_dirs(policy_dir: str, judge_dir: str, *, prompts: int = 64, n: int = 16, votes: Sequence[int] = (1, 4),
                  seed: int = 0, eval_seed: int = 0, temperature: float = 1.0) -> dict[str, float]:  # fmt: skip
    """Sample `n` responses per held-out rubric prompt from the policy (the server's generation
    loop, seeded per sample), judge each with k voted verdicts of the judge for each k in
    `votes`, and measure against the oracle: the policy's mean oracle score, and per k the
    judge's pairwise accuracy, rank correlation, format failures and best-of-1/4/16."""
    from megatron_opd.data.rubric import MAX_RESPONSE_LEN, RubricTasks
    from megatron_opd.rewards.base import reward_inputs
    from megatron_opd.rewards.grm import GRMReward
    from megatron_opd.runtime.checkpoint import load_checkpoint
    from megatron_opd.serving.backend import ModelBackend, ModelSource
    from megatron_opd.serving.requests import GenItem
    from megatron_opd.stages.grm import ModelJudge

    policy = ModelBackend.load(ModelSource(model_dir=policy_dir), weight_version="eval")
    tok = policy.tokenizer
    if Path(judge_dir).resolve() == Path(policy_dir).resolve():
        judge_model = policy.model
    else:
        from megatron_opd.models.model_dir import read_model_dir

        judge_model = policy.build_model()
        load_checkpoint(read_model_dir(judge_dir).latest_checkpoint(), [judge_model], load_rng=False)
    held_out = RubricTasks(eval_seed, prompts).eval_prompts("rubric")
    rows = [p for p in held_out for _ in range(n)]
    items = [GenItem(input_ids=tok.encode_prompt(p.text), max_new_tokens=MAX_RESPONSE_LEN + 1, temperature=temperature,
                     stop_token_ids=(tok.eos_id,), sampling_seed=random.Random(f"eval/{seed}/{i}").getrandbits(31))
             for i, p in enumerate(rows)]  # fmt: skip
    out_ids = [r.output_ids for i in range(0, len(items), 256) for r in policy.run(items[i : i + 256])]
    texts = [tok.decode(ids) for ids in out_ids]
    truth_flat = oracle_scores([(p.metadata["query"], p.metadata["rubric"], t) for p, t in zip(rows, texts)])
    truth = [truth_flat[i : i + n] for i in range(0, len(rows), n)]
    report: dict[str, float] = {"policy_oracle_score": sum(truth_flat) / len(truth_flat), "eval_prompts": len(held_out),
                                "samples_per_prompt": n}  # fmt: skip
    judge = ModelJudge(judge_model, policy.cfg, tok, temperature=temperature)
    for k in votes:
        results = GRMReward(judge, k=k, seed=seed).score(reward_inputs(rows, texts))
        flat = [r.score for r in results]
        scores = [flat[i : i + n] for i in range(0, len(rows), n)]
        acc, pairs = pairwise_accuracy(scores, truth)
        report[f"k{k}/pairwise_acc"] = acc
        report[f"k{k}/pairs"] = pairs
        report[f"k{k}/rank_corr"] = rank_correlation(scores, truth)
        report[f"k{k}/format_fail"] = sum(r.info["format_failure"] for r in results) / len(results)
        for size in (1, 4, 16):
            if size <= n:
                for who, v in best_of_n(scores, truth, size, seed=seed).items():
                    report[f"k{k}/best_of_{size}/{who}"] = v
    return report


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m megatron_opd.stages.grm_eval", description=__doc__.splitlines()[0])
    ap.add_argument("--policy", required=True, help="the policy's model directory (a run directory)")
    ap.add_argument("--judge", required=True, help="the judge's model directory (the same one: actor as judge)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--votes", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="write the report here as JSON")
    ap.add_argument("--plot", default="", help="plot the policy run's judge-vs-oracle reward gap here (PNG)")
    a = ap.parse_args(argv)
    report = evaluate_dirs(a.policy, a.judge, prompts=a.prompts, n=a.n, votes=a.votes, seed=a.seed)
    samples = Path(a.policy) / "grm_samples.jsonl"
    if samples.is_file():  # a GRM run: the gap between its judged rewards and the oracle, per rollout
        gap = reward_gap(samples)
        report["reward_gap/first"], report["reward_gap/last"] = gap[0]["gap"], gap[-1]["gap"]
        report["reward_gap/oracle_first"], report["reward_gap/oracle_last"] = gap[0]["oracle"], gap[-1]["oracle"]
        if a.plot:
            plot_reward_gap(gap, a.plot)
    text = json.dumps(report, indent=1, sort_keys=True)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
