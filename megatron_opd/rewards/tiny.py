"""Rule verifiers of the tiny domains: a response is correct iff it equals the domain's solution."""

from __future__ import annotations

from typing import Sequence

from megatron_opd.data.domains import DOMAINS, get_domain
from megatron_opd.data.prompts import Prompt
from megatron_opd.rewards.base import RewardResult


class TinyDomainReward:
    """Exact match against the domain's rule applied to the prompt text: score 1 or 0."""

    def __init__(self, domain: str):
        self.domain = get_domain(domain)
        self.name = domain

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[RewardResult]:
        out = []
        for p, response in zip(prompts, responses):
            correct = response == self.domain.solve(p.text)
            out.append(RewardResult(float(correct), correct))
        return out


# Registered under the domain names (what `TinyDomains.reward_name` answers).
REWARDS = {name: (lambda name=name: TinyDomainReward(name)) for name in DOMAINS}
