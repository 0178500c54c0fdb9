"""Rewards by name: the one table a config's or a prompt source's reward names resolve through
(the judge-RL agreement reward is here; the policy's GRM reward needs a judge, so the stage
builds it: rewards/grm.py GRMReward)."""

from __future__ import annotations

import difflib
from typing import Callable

from megatron_opd.data.prompts import PromptSource
from megatron_opd.rewards import tiny
from megatron_opd.rewards.base import Reward
from megatron_opd.rewards.code import CodeVerifier
from megatron_opd.rewards.grm import JudgeAgreement
from megatron_opd.rewards.match import ExactMatch, RegexMatch
from megatron_opd.rewards.math import MathVerifier

# name -> a factory of the reward with its default settings
REWARDS: dict[str, Callable[[], Reward]] = {
    **tiny.REWARDS,  # the tiny domains by name (data/domains.py DOMAINS)
    "math": MathVerifier,
    "code": CodeVerifier,
    "exact": ExactMatch,
    "regex": RegexMatch,
    "judge_agreement": JudgeAgreement,
}


def get_reward(name: str) -> Reward:
    if name not in REWARDS:
        close = difflib.get_close_matches(name, list(REWARDS), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known rewards: {sorted(REWARDS)}"
        raise ValueError(f"unknown reward {name!r}; {hint}")
    return REWARDS[name]()


def rewards_for(source: PromptSource) -> dict[str, Reward]:
    """The reward of each of the source's domains (refusing unknown names before any step)."""
    out = {}
    for domain in source.domains:
        try:
            out[domain] = get_reward(source.reward_name(domain))
        except ValueError as e:
            raise ValueError(f"the verifier of domain {domain!r}: {e}") from None
    return out
