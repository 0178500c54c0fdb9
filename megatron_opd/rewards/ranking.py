"""How well a scorer orders responses against the truth: pairwise accuracy, rank correlation and
best-of-N, over groups (a prompt's responses). Torch-free and oracle-free: the GRM's evaluator
(stages/grm_eval.py) and the scalar RM's fit (stages/grm.py) use the same definitions.
"""

from __future__ import annotations

import random
from typing import Sequence


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
