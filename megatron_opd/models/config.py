"""`ModelConfig`: the architecture of a model, as a job's YAML or a model directory declares it.

Torch-free on purpose: the config tree imports it, and a SLURM login node renders jobs without
torch. `models/gpt.py` turns it into a megatron-core GPTModel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from megatron_opd.runtime.layout import ParallelLayout


@dataclass
class ModelConfig:
    vocab_size: int = 64
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    num_query_groups: int = 0  # 0: one group per head (plain multi-head attention)
    ffn_hidden_size: int = 0  # 0: 4 * hidden_size
    kv_channels: int = 0  # 0: hidden_size / num_attention_heads
    max_seq_len: int = 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    qkv_bias: bool = False
    qk_layernorm: bool = False
    init_std: float = 0.02
    # Megatron pads the vocabulary to a multiple of this times TP; padded columns are no tokens.
    make_vocab_size_divisible_by: int = 128
    # MoE (num_experts = 0: dense).
    num_experts: int = 0
    moe_topk: int = 2
    moe_ffn_hidden_size: int = 0  # 0: ffn_hidden_size
    moe_shared_expert_size: int = 0  # intermediate size of the shared experts; 0: none
    moe_layer_freq: list[int] = field(default_factory=list)  # 1 = MoE layer, 0 = dense; []: all MoE
    moe_router_score: Literal["softmax", "sigmoid"] = "softmax"
    moe_router_pre_softmax: bool = False
    moe_router_expert_bias: bool = False
    moe_topk_scaling_factor: float = 0.0  # 0: none
    moe_aux_loss_coeff: float = 0.0
    # --- Architectures imported from Hugging Face checkpoints (models/hf) ---
    # RoPE scaling. "llama3": Llama 3.1+ (megatron fixes the low/high frequency factors at 1 and 4
    # and the original context at 8192). "yarn": DeepSeek-V3 (megatron has it for MLA only).
    rope_scaling: Literal["none", "llama3", "yarn"] = "none"
    rope_scaling_factor: float = 1.0
    yarn_original_max_position: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 0.0
    # Multi-latent attention (DeepSeek-V2/V3). num_query_groups and kv_channels do not apply.
    multi_latent_attention: bool = False
    q_lora_rank: int = 0  # 0: queries are not compressed (one linear_q_proj)
    kv_lora_rank: int = 0
    qk_head_dim: int = 0  # per-head query/key channels without RoPE
    qk_pos_emb_head_dim: int = 0  # per-head query/key channels with RoPE
    v_head_dim: int = 0
    # Group-limited routing (DeepSeek-V3): top-k experts are chosen inside the best
    # moe_router_group_topk of moe_router_num_groups expert groups. 0: no groups.
    moe_router_num_groups: int = 0
    moe_router_group_topk: int = 0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def moe_layers(self) -> list[int]:
        """0-based indices of the MoE layers (the layers of `Trajectories.routed_experts`)."""
        if not self.is_moe:
            return []
        return [i for i in range(self.num_layers) if not self.moe_layer_freq or self.moe_layer_freq[i]]

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int) -> int:
        multiple = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def check(self, layout: ParallelLayout) -> None:
        """Raise `ValueError` (or `LayoutError`) naming the first key that cannot work under `layout`."""
        for key in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "max_seq_len"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("num_query_groups", "ffn_hidden_size", "kv_channels", "num_experts", "moe_ffn_hidden_size"):
            if getattr(self, key) < 0:
                raise ValueError(f"model.{key} must be >= 0 (0: its default), got {getattr(self, key)}")
        if self.is_moe and not 1 <= self.moe_topk <= self.num_experts:
            raise ValueError(f"model.moe_topk={self.moe_topk} must be between 1 and model.num_experts={self.num_experts}")
        if self.num_attention_heads % self.query_groups:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"model.num_query_groups={self.query_groups}"
            )
        if self.rope_scaling == "yarn" and not self.multi_latent_attention:
            raise ValueError(
                "model.rope_scaling=yarn needs model.multi_latent_attention (megatron-core has YaRN for MLA only)"
            )
        if self.rope_scaling == "llama3" and self.multi_latent_attention:
            raise ValueError("model.rope_scaling=llama3 does not apply to multi-latent attention; use yarn")
        mla_dims = (self.kv_lora_rank, self.qk_head_dim, self.qk_pos_emb_head_dim, self.v_head_dim)
        if self.multi_latent_attention and self.num_query_groups:
            raise ValueError(
                f"model.multi_latent_attention does not take model.num_query_groups={self.num_query_groups} "
                "(multi-latent attention has one key/value head per query head); set model.num_query_groups=0"
            )
        if self.multi_latent_attention and not all(mla_dims):
            raise ValueError(
                "model.multi_latent_attention needs kv_lora_rank, qk_head_dim, qk_pos_emb_head_dim and v_head_dim"
            )
        if self.moe_layer_freq and len(self.moe_layer_freq) != self.num_layers:
            raise ValueError(
                f"model.moe_layer_freq has {len(self.moe_layer_freq)} entries, model.num_layers is {self.num_layers}"
            )
        layout.check_model(
            num_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.query_groups,
            num_experts=self.num_experts or None,
        )
