"""Model builders: `ModelConfig` -> megatron-core GPTModel (dense or MoE)."""
