"""The `Reward` protocol and `score_responses`, which every stage uses to verify responses.

A reward scores a batch of (prompt, response) pairs at once (a judge model or a sandbox pool wants
the whole batch); the prompt carries its domain, sample id and verifier metadata. Each result has
the `score` a policy trains on and whether the response is `correct` (what held-out accuracy
counts): for rule verifiers the two agree; a judge's format failure is incorrect with a score of
its own. `info` holds the rest (a parsed verdict, a time-out), for metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

from megatron_opd.data.prompts import Prompt


@dataclass(frozen=True)
class RewardResult:
    score: float
    correct: bool
    info: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Reward(Protocol):
    name: str

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[RewardResult]:
        """One result per (prompt, response) pair, in order."""
        ...


class RewardError(RuntimeError):
    """A reward failed or answered something unusable; names the reward, domain and sample."""


def score_responses(
    prompts: Sequence[Prompt], responses: Sequence[str], reward_of: Mapping[str, Reward]
) -> list[RewardResult]:
    """Score each response with the reward of its prompt's domain (`reward_of[domain]`), one call
    per reward over all of its rows; results in row order."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
    rows_of: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        if p.domain not in reward_of:
            raise RewardError(f"sample {p.sample_id!r} has domain {p.domain!r}, which has no reward; known: {sorted(reward_of)}")
        rows_of.setdefault(p.domain, []).append(i)
    out: list[RewardResult | None] = [None] * len(prompts)
    for domain, rows in rows_of.items():
        reward = reward_of[domain]
        batch = [prompts[i] for i in rows]
        try:
            results = reward.score(batch, [responses[i] for i in rows])
        except Exception as e:
            raise RewardError(
                f"reward {reward.name!r} failed on domain {domain!r}, {_failing_sample(reward, batch, [responses[i] for i in rows])}: "
                f"{type(e).__name__}: {e}"
            ) from e
        if len(results) != len(rows):
            raise RewardError(f"reward {reward.name!r} returned {len(results)} results for {len(rows)} responses of domain {domain!r}")
        for i, r in zip(rows, results):
            if not math.isfinite(r.score):
                raise RewardError(f"reward {reward.name!r} scored sample {prompts[i].sample_id!r} (domain {domain!r}) {r.score}")
            out[i] = r
    return out  # type: ignore[return-value]


def _failing_sample(reward: Reward, prompts: Sequence[Prompt], responses: Sequence[str]) -> str:
    """Which sample a failed batch call fails on: the rows again one at a time (error path only)."""
    for p, r in zip(prompts, responses):
        try:
            reward.score([p], [r])
        except Exception:  # noqa: BLE001 - this is the search for the failing row
            return f"sample {p.sample_id!r}"
    return f"a batch of {len(prompts)} samples ({prompts[0].sample_id!r}...{prompts[-1].sample_id!r})"
