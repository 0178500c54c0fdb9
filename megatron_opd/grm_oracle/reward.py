"""The hidden oracle as a reward: the GRM report's upper bound (grm.policy_reward=oracle).

The one training run that reads the oracle is this baseline's, by design: it shows what the
policy reaches when its reward is the truth. stages/grm.py loads this module by name only when
grm.policy_reward=oracle, so every other run (the GRM's, the scalar RM's) works with the oracle's
package unreachable (tests/test_grm.py, tests/test_grm_stages.py).
"""

from __future__ import annotations

from megatron_opd.grm_oracle import oracle
from megatron_opd.rewards.types import RewardInput, RewardResult, require_field, score_each


class OracleReward:
    """The oracle's quality of each rubric sample, in [0, 1]; full marks count as correct."""

    name = "oracle"

    def score(self, samples: list[RewardInput]) -> list[RewardResult]:
        return score_each(self.name, samples, self._one)

    def _one(self, s: RewardInput) -> RewardResult:
        query, rubric = require_field(self.name, s, "query", str), require_field(self.name, s, "rubric", str)
        return RewardResult(oracle.score(query, rubric, s.response), {"format_failure": False})
