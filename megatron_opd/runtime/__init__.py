"""The parallel runtime: process groups, megatron parallel state, CPU compatibility, checkpoints."""
