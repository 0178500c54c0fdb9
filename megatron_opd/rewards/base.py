"""The `Reward` protocol and `score_responses`, the one way stages verify responses.

A reward (a verifier, later a judge) has a `name` and scores a batch at once (a judge model or a
sandbox pool wants the whole batch): `score(samples: list[RewardInput]) -> list[RewardResult]`,
with the records of rewards/types.py. A sample carries its prompt text, the response, its sample
id and domain, and the prompt's verifier fields (`Prompt.metadata`: a reference answer, tests, a
rubric). A result's `score` is what a policy trains on; a response counts as correct for
accuracy when it earns full marks (`is_correct`); a time-out is flagged, never a silent zero.
"""

from __future__ import annotations

import math
from typing import Mapping, Protocol, Sequence, runtime_checkable

from megatron_opd.data.prompts import Prompt
from megatron_opd.rewards.types import RewardError, RewardInput, RewardResult, verifier_raised


@runtime_checkable
class Reward(Protocol):
    name: str

    def score(self, samples: list[RewardInput]) -> list[RewardResult]:
        """One result per sample, in order; a sample it cannot score is a RewardError naming it."""
        ...


def is_correct(result: RewardResult) -> bool:
    """What held-out and rollout accuracy count: full marks."""
    return result.score >= 1.0


def reward_inputs(prompts: Sequence[Prompt], responses: Sequence[str]) -> list[RewardInput]:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
    return [
        RewardInput(prompt=p.text, response=r, sample_id=p.sample_id, domain=p.domain, fields=dict(p.metadata))
        for p, r in zip(prompts, responses)
    ]


def score_responses(
    prompts: Sequence[Prompt], responses: Sequence[str], reward_of: Mapping[str, Reward]
) -> list[RewardResult]:
    """Score each response with the reward of its prompt's domain (`reward_of[domain]`), one call
    per reward over all of its rows; results in row order. Any failure is a RewardError naming the
    reward, the domain and the sample."""
    samples = reward_inputs(prompts, responses)
    rows_of: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        if s.domain not in reward_of:
            raise RewardError(f"sample {s.sample_id!r} has domain {s.domain!r}, which has no reward; known: {sorted(reward_of)}")
        rows_of.setdefault(s.domain, []).append(i)
    out: list[RewardResult | None] = [None] * len(samples)
    for domain, rows in rows_of.items():
        reward, batch = reward_of[domain], [samples[i] for i in rows]
        try:
            results = reward.score(batch)
        except RewardError:
            raise
        except Exception as e:
            raise verifier_raised(reward.name, _failing_sample(reward, batch), f"{type(e).__name__}: {e}") from e
        if len(results) != len(rows):
            raise RewardError(f"reward {reward.name!r} returned {len(results)} results for {len(rows)} samples of domain {domain!r}")
        for i, r in zip(rows, results):
            if not math.isfinite(r.score):
                raise RewardError(f"reward {reward.name!r} scored sample {samples[i].sample_id!r} (domain {domain!r}) {r.score}")
            out[i] = r
    return out  # type: ignore[return-value]


def _failing_sample(reward: Reward, batch: list[RewardInput]) -> RewardInput:
    """The sample a failed batch call fails on: the rows again one at a time (error path only);
    the first of the batch if none fails alone."""
    for sample in batch:
        try:
            reward.score([sample])
        except Exception:  # noqa: BLE001 - this is the search for the failing row
            return sample
    return batch[0]
