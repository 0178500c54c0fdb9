"""`ModelConfig` -> megatron-core `GPTModel`: Llama/Qwen-style dense models and MoE models.

Dense: RMSNorm, SwiGLU, RoPE, grouped-query attention, no linear biases (optionally a QKV bias
as in Qwen2 and QK-norm as in Qwen3), tied or untied embeddings. MoE: routed experts with top-k
routing (softmax or sigmoid scores, optional expert bias as in DeepSeek-V3), shared experts,
dense layers first via `moe_layer_freq`, expert parallelism.

The layer spec is megatron's Transformer Engine spec when TE imports on a CUDA machine, the
local (pure megatron-core) spec otherwise: the same model, swappable implementations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

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

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

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
        if self.num_attention_heads % self.query_groups:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"model.num_query_groups={self.query_groups}"
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


def transformer_engine_available() -> bool:
    """TE is used only on CUDA machines where it imports cleanly (it breaks megatron on CPU)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - TE raises RuntimeError, not only ImportError, when broken
        return False
    return True


def transformer_config(cfg: ModelConfig, layout: ParallelLayout, dtype: torch.dtype = torch.float32):
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg.check(layout)
    moe = {}
    if cfg.is_moe:
        moe = dict(
            num_moe_experts=cfg.num_experts,
            moe_router_topk=cfg.moe_topk,
            moe_ffn_hidden_size=cfg.moe_ffn_hidden_size or cfg.ffn_size,
            moe_shared_expert_intermediate_size=cfg.moe_shared_expert_size or None,
            moe_layer_freq=list(cfg.moe_layer_freq) or 1,
            moe_router_score_function=cfg.moe_router_score,
            moe_router_pre_softmax=cfg.moe_router_pre_softmax,
            moe_router_enable_expert_bias=cfg.moe_router_expert_bias,
            moe_router_topk_scaling_factor=cfg.moe_topk_scaling_factor or None,
            moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
            moe_router_load_balancing_type="aux_loss" if cfg.moe_aux_loss_coeff else "none",
            moe_grouped_gemm=False,
            # fp32 routing scores keep top-k choices identical across TP/EP layouts.
            moe_router_dtype="fp32",
        )
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.query_groups,
        ffn_hidden_size=cfg.ffn_size,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_std,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        sequence_parallel=layout.sequence_parallel and layout.tp > 1,
        # Initialise the full weight on the CPU with one generator, then shard: a model built under
        # TP=2 holds exactly the shards of the TP=1 model built from the same seed.
        use_cpu_initialization=True,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        # Losses return token sums and counts; megatron divides by the global count (see trainer).
        calculate_per_token_loss=True,
        # Rollouts differ in length from step to step; pipeline p2p then exchanges shapes first.
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",
        **moe,
    )


def build_gpt_model(
    cfg: ModelConfig,
    layout: ParallelLayout,
    *,
    dtype: torch.dtype = torch.float32,
    pre_process: bool | None = None,
    post_process: bool | None = None,
):
    """Build this rank's part of the model (its TP shard and PP stage) on the runtime's device.

    Requires `runtime.init_runtime` to have set up megatron's parallel state.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron_opd.runtime.distributed import device

    config = transformer_config(cfg, layout, dtype)
    # The block spec places dense and MoE layers per moe_layer_freq (all dense without experts).
    spec = get_gpt_decoder_block_spec(
        config, use_transformer_engine=transformer_engine_available(), normalization="RMSNorm"
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=cfg.padded_vocab_size(layout.tp),
        max_sequence_length=cfg.max_seq_len,
        pre_process=parallel_state.is_pipeline_first_stage() if pre_process is None else pre_process,
        post_process=parallel_state.is_pipeline_last_stage() if post_process is None else post_process,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta),
        parallel_output=True,
    )
    return model.to(device())


def mask_vocab_padding(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set this rank's padded vocabulary columns (global id >= vocab_size) to -inf.

    `logits` is this rank's vocab-parallel shard [..., V_padded / TP]; padded columns are not
    tokens and must take no probability mass in any softmax.
    """
    from megatron.core import parallel_state

    shard = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    if start + shard <= vocab_size:
        return logits
    is_token = torch.arange(start, start + shard, device=logits.device) < vocab_size
    return logits.masked_fill(~is_token, float("-inf"))
