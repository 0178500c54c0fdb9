"""Rewards: the `Reward` protocol (a batch of samples -> a score and info each, rewards/base.py,
with the records of rewards/types.py), a registry that finds rewards by name, and the rule
verifiers of the tiny domains. Verifiers for real domains and GRM verdicts are further rewards."""
