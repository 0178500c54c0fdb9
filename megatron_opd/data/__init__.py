"""Data: tokenizers, the tiny verifiable domains and prompt source, the Trajectories batch type."""
