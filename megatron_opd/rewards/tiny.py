"""Rule verifiers of the tiny domains: a response is correct iff it equals the domain's solution
of the prompt text (the rule itself, not a stored answer). A prompt of another domain (a twin's,
under its own tag) is an error, not a score."""

from __future__ import annotations

from megatron_opd.data.domains import DOMAINS, get_domain
from megatron_opd.rewards.types import RewardInput, RewardResult, score_each


class TinyDomainReward:
    """Exact match against the domain's rule applied to the prompt: score 1.0 or 0.0."""

    def __init__(self, domain: str):
        self.domain = get_domain(domain)
        self.name = domain

    def score(self, samples: list[RewardInput]) -> list[RewardResult]:
        return score_each(self.name, samples, self._score_one)

    def _score_one(self, sample: RewardInput) -> RewardResult:
        tag = self.domain.tag
        # A twin's prompt (same body, other tag) would otherwise be scored by this domain's rule.
        if not (sample.prompt.startswith(tag) and sample.prompt.endswith("=")):
            raise ValueError(f"prompt {sample.prompt!r} is not a {self.name} prompt (those read {tag}...=)")
        expected = self.domain.solve(sample.prompt)
        equal = sample.response == expected
        return RewardResult(score=1.0 if equal else 0.0, info={"expected": expected})


# Registered under the domain names (what `TinyDomains.reward_name` answers).
REWARDS = {name: (lambda name=name: TinyDomainReward(name)) for name in DOMAINS}
