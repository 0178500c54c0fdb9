"""Rewards: verifiers that score a batch of responses (math, code, exact and regex match)."""
