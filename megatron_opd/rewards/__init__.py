"""Rewards: the `Reward` protocol (prompt, response, sample metadata -> score and info, per batch),
a registry that finds rewards by name, and the rule verifiers of the tiny domains. Math, code,
exact/regex verifiers (issue 15) and GRM verdicts (issue 14) are further implementations."""
