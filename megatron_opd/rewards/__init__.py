"""Rewards: the `Reward` protocol (a batch of samples -> a score and info each, rewards/base.py,
with the records of rewards/types.py), the registry that finds them by name (rewards/registry.py),
the rule verifiers of the tiny domains, and verifiers that score real responses (math, code,
exact and regex match; docs/rewards.md). GRM verdicts will be another reward."""
