"""Checkpoint tools: HF <-> megatron conversion, resharding, export, merging (docs/checkpoints.md)."""
