"""megatron-opd: multi-teacher on-policy distillation and expert post-training on megatron-core."""

__version__ = "0.1.0"
