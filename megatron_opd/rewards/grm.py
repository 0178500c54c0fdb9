"""GRM verdicts as rewards (issue 14): the verdict parser, the judge-RL agreement reward, the
pairwise rule, and voting over k sampled verdicts into the policy's reward.

A judge writes, after the judge template (data/rubric.py), one 0/1 per rubric code in the order
the prompt lists them, a comma and a score digit: "101,6". Nothing else: leading or trailing
text, a wrong number of verdicts, a missing comma or score, or a truncated verdict is a *format
failure*, which earns its own reward (`format_reward`) and is counted (`info["format_failure"]`),
never guessed at.

Judge-RL reward (`judge_agreement`, pointwise): chance-corrected agreement with the annotation,

    r = w * mean_j (1[v_j = y_j] - base_j) + (1 - w) * (d0 - |s - y_s|) / MAX_SCORE

with base_j = max(p_j, 1 - p_j), p_j the label rate of code j over the annotation set, and d0 the
mean |y_s - median(y_s)| over it: the best constant verdict (every criterion its majority label,
the median score) earns exactly 0 on average over the annotation set, and any other constant
verdict less, so a judge that ignores the response earns nothing. The baselines travel with each
judge prompt (`fields["baseline"]`, data/rubric.py `annotation_baselines`).

Pairwise (`pairwise_reward`): 1 when the two parsed scores order the responses strictly as the
labels do, 0 for a tie or the reverse (a constant verdict ties: it earns nothing).

Voting (`vote`): k verdicts on one (query, rubric, response); vote 0 lists the rubric as given,
vote i > 0 a permutation of it seeded by (seed, sample id, i), un-permuted after parsing so every
vote speaks of the same criteria. The aggregate is the mean of the parsed votes (per criterion
and score); votes that fail to parse are dropped and counted; all k failing is a format failure.
The policy's GRM reward is the aggregate score / MAX_SCORE.

The scalar reward model's reward (`ScalarRMReward`, the baseline the GRM replaces): one value per
(query, rubric, response) read from a `ValueModel` over the same judge-template text, no verdict,
no vote; the value is the reward as the model regressed it (no clipping).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Protocol, Sequence

from megatron_opd.data.rubric import MAX_SCORE, Baselines, JudgeTemplate
from megatron_opd.rewards.types import RewardInput, RewardResult, require_field, score_each


@dataclass(frozen=True)
class Verdict:
    verdicts: tuple[int, ...]  # in the order the judge prompt listed the codes
    score: int


@dataclass(frozen=True)
class FormatFailure:
    reason: str


def parse_verdict(text: str, n_criteria: int) -> Verdict | FormatFailure:
    """The verdict in a judge's output, or why it is not one."""
    m = re.fullmatch(r"([01]*),([0-9])", text)
    if m is None:
        if re.fullmatch(r"[01]*,?", text):
            return FormatFailure(f"truncated verdict {text!r}: expected {n_criteria} verdicts, ',' and a score digit")
        return FormatFailure(f"not a verdict {text!r}: expected {n_criteria} digits 0/1, ',' and a score digit 0..{MAX_SCORE}")
    marks = m.group(1)
    if len(marks) != n_criteria:
        return FormatFailure(f"{len(marks)} verdicts in {text!r} for {n_criteria} criteria")
    return Verdict(tuple(int(c) for c in marks), int(m.group(2)))


# -- the judge-RL reward --------------------------------------------------------------------------


def agreement_reward(v: Verdict, label_verdicts: Sequence[int], label_score: int, rubric: str,
                     base: Baselines, *, item_weight: float) -> float:  # fmt: skip
    items = sum(int(a == b) - base.criterion[c] for a, b, c in zip(v.verdicts, label_verdicts, rubric)) / len(rubric)
    score = (base.score_distance - abs(v.score - label_score)) / MAX_SCORE
    return item_weight * items + (1 - item_weight) * score


class JudgeAgreement:
    """The judge-RL reward (registry name "judge_agreement") on judge-template samples whose
    fields carry the annotation (`verdicts`, `score`, `rubric`) and the set's `baseline`."""

    name = "judge_agreement"

    def __init__(self, *, item_weight: float = 0.5, format_reward: float = -1.0):
        if not 0.0 <= item_weight <= 1.0:
            raise ValueError(f"grm.item_weight={item_weight} must be in [0, 1]")
        self.item_weight, self.format_reward = item_weight, format_reward

    def score(self, samples: list[RewardInput]) -> list[RewardResult]:
        return score_each(self.name, samples, self._one)

    def _one(self, s: RewardInput) -> RewardResult:
        rubric = require_field(self.name, s, "rubric", str)
        labels = require_field(self.name, s, "verdicts", list)
        label_score = require_field(self.name, s, "score", int)
        base = Baselines.from_json(require_field(self.name, s, "baseline", dict))
        v = parse_verdict(s.response, len(rubric))
        if isinstance(v, FormatFailure):
            return RewardResult(self.format_reward, {"format_failure": True, "reason": v.reason})
        r = agreement_reward(v, labels, label_score, rubric, base, item_weight=self.item_weight)
        agree = sum(int(a == b) for a, b in zip(v.verdicts, labels)) / len(rubric)
        return RewardResult(r, {"format_failure": False, "criterion_agreement": agree,
                                "score_error": abs(v.score - label_score)})  # fmt: skip


def pairwise_reward(a: Verdict | FormatFailure, b: Verdict | FormatFailure, label_a: int, label_b: int,
                    *, format_reward: float = -1.0) -> float:  # fmt: skip
    """1 when the parsed scores order (a, b) strictly as the labels do, else 0 (ties earn nothing);
    a format failure in either earns `format_reward`. Labels must differ."""
    if label_a == label_b:
        raise ValueError(f"a pairwise label needs two different scores, got {label_a} and {label_b}")
    if isinstance(a, FormatFailure) or isinstance(b, FormatFailure):
        return format_reward
    return float((a.score - b.score) * (label_a - label_b) > 0)


# -- voting ---------------------------------------------------------------------------------------


class Judge(Protocol):
    """What writes verdicts: judge prompt texts in, one output text each (sampled with the given
    seed), e.g. the in-job model or a judge endpoint's /generate."""

    def judge(self, prompts: list[str], seeds: list[int]) -> list[str]: ...


@dataclass(frozen=True)
class Vote:
    verdicts: tuple[float, ...] | None  # per code of the rubric as given: the mean of the parsed votes
    score: float | None  # mean parsed score digit; None when no vote parsed
    parsed: int
    k: int


def vote_orders(rubric: str, k: int, *, seed: int, sample_id: str) -> list[list[int]]:
    """The rubric permutation of each vote (indices into `rubric`): identity for vote 0."""
    orders = [list(range(len(rubric)))]
    for i in range(1, k):
        order = list(range(len(rubric)))
        random.Random(f"{seed}/{sample_id}/{i}").shuffle(order)
        orders.append(order)
    return orders


def vote_prompts(template: JudgeTemplate, query: str, rubric: str, response: str, orders: list[list[int]]) -> list[str]:
    return [template.render(query, "".join(rubric[j] for j in order), response) for order in orders]


def aggregate(outputs: Sequence[str], orders: list[list[int]], n: int) -> Vote:
    """The mean over the parsed outputs, each vote's verdicts put back in the rubric's order."""
    marks, scores = [], []
    for text, order in zip(outputs, orders, strict=True):
        v = parse_verdict(text, n)
        if isinstance(v, FormatFailure):
            continue
        back = [0] * n
        for pos, j in enumerate(order):
            back[j] = v.verdicts[pos]
        marks.append(back)
        scores.append(v.score)
    if not scores:
        return Vote(None, None, 0, len(outputs))
    return Vote(tuple(sum(m[j] for m in marks) / len(marks) for j in range(n)), sum(scores) / len(scores),
                len(scores), len(outputs))  # fmt: skip


class GRMReward:
    """The policy's reward from a judge (registry domain reward "grm", built by the stage with its
    judge): the mean score of k voted verdicts / MAX_SCORE; a sample no vote parses for earns
    `format_reward` and is flagged."""

    name = "grm"

    def __init__(self, judge: Judge, *, k: int = 1, seed: int = 0, template: JudgeTemplate = JudgeTemplate(),
                 format_reward: float = 0.0):  # fmt: skip
        if k < 1:
            raise ValueError(f"grm.votes={k} must be >= 1")
        self.judge, self.k, self.seed, self.template, self.format_reward = judge, k, seed, template, format_reward

    def votes(self, samples: list[RewardInput]) -> list[Vote]:
        prompts, seeds, plans = [], [], []
        for s in samples:
            query = require_field(self.name, s, "query", str)
            rubric = require_field(self.name, s, "rubric", str)
            orders = vote_orders(rubric, self.k, seed=self.seed, sample_id=s.sample_id)
            plans.append((len(prompts), orders, len(rubric)))
            prompts += vote_prompts(self.template, query, rubric, s.response, orders)
            seeds += [_seed(self.seed, s.sample_id, i) for i in range(self.k)]
        outputs = self.judge.judge(prompts, seeds)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"the judge returned {len(outputs)} verdicts for {len(prompts)} prompts")
        return [aggregate(outputs[start : start + len(orders)], orders, n) for start, orders, n in plans]

    def score(self, samples: list[RewardInput]) -> list[RewardResult]:
        out = []
        for v in self.votes(samples):
            if v.score is None:
                out.append(RewardResult(self.format_reward, {"format_failure": True, "parsed_votes": 0}))
            else:
                out.append(RewardResult(v.score / MAX_SCORE, {"format_failure": False, "parsed_votes": v.parsed,
                                                              "verdicts": v.verdicts}))  # fmt: skip
        return out


def _seed(seed: int, sample_id: str, vote: int) -> int:
    """A vote's sampling seed: fixed by the run seed, the sample and the vote (resumes repeat it)."""
    return random.Random(f"judge/{seed}/{sample_id}/{vote}").getrandbits(31)


# -- the scalar reward model's reward --------------------------------------------------------------


class ValueModel(Protocol):
    """A scalar reward model: judge-template prompt texts in, one value each (stages/grm.py ModelValue)."""

    def values(self, prompts: list[str]) -> list[float]: ...


class ScalarRMReward:
    """The policy's reward from a scalar reward model (grm.policy_reward=scalar_rm): its value of
    the judge-template text of each sample. Nothing to parse: never a format failure."""

    name = "scalar_rm"

    def __init__(self, model: ValueModel, *, template: JudgeTemplate = JudgeTemplate()):
        self.model, self.template = model, template

    def score(self, samples: list[RewardInput]) -> list[RewardResult]:
        prompts = [self.template.render(require_field(self.name, s, "query", str), require_field(self.name, s, "rubric", str),
                                        s.response) for s in samples]  # fmt: skip
        values = self.model.values(prompts)
        if len(values) != len(prompts):
            raise RuntimeError(f"the reward model returned {len(values)} values for {len(prompts)} samples")
        return [RewardResult(float(v), {"format_failure": False}) for v in values]
