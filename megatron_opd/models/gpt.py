"""`ModelConfig` -> megatron-core `GPTModel`: Llama/Qwen-style dense models and MoE models.

Dense: RMSNorm, SwiGLU, RoPE, grouped-query attention, no linear biases (optionally a QKV bias
as in Qwen2 and QK-norm as in Qwen3), tied or untied embeddings. MoE: routed experts with top-k
routing (softmax or sigmoid scores, optional expert bias as in DeepSeek-V3), shared experts,
dense layers first via `moe_layer_freq`, expert parallelism.

The layer spec is megatron's Transformer Engine spec when TE imports on a CUDA machine, the
local (pure megatron-core) spec otherwise: the same model, swappable implementations.
"""

from __future__ import annotations

import contextlib

import torch

from megatron_opd.models.config import ModelConfig
from megatron_opd.runtime.layout import ParallelLayout


def transformer_engine_available() -> bool:
    """TE is used only on CUDA machines where it imports cleanly (it breaks megatron on CPU)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - TE raises RuntimeError, not only ImportError, when broken
        return False
    return True


def transformer_config(
    cfg: ModelConfig, layout: ParallelLayout, dtype: torch.dtype = torch.float32, *, routing_replay: bool = False
):
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg.check(layout)
    moe = {}
    if cfg.is_moe:
        moe = dict(
            # Keep routing (models/routing.py): every router gets megatron's RouterReplay.
            moe_enable_routing_replay=routing_replay,
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
        if cfg.moe_router_num_groups:
            moe.update(
                moe_router_num_groups=cfg.moe_router_num_groups, moe_router_group_topk=cfg.moe_router_group_topk
            )
    config_cls, mla = TransformerConfig, {}
    if cfg.multi_latent_attention:
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        config_cls = MLATransformerConfig
        mla = dict(
            q_lora_rank=cfg.q_lora_rank or None,
            kv_lora_rank=cfg.kv_lora_rank,
            qk_head_dim=cfg.qk_head_dim,
            qk_pos_emb_head_dim=cfg.qk_pos_emb_head_dim,
            v_head_dim=cfg.v_head_dim,
            rotary_base=cfg.rope_theta,
            rope_type="yarn" if cfg.rope_scaling == "yarn" else "rope",
        )
        if cfg.rope_scaling == "yarn":
            mla.update(
                rotary_scaling_factor=cfg.rope_scaling_factor,
                original_max_position_embeddings=cfg.yarn_original_max_position,
                beta_fast=cfg.yarn_beta_fast,
                beta_slow=cfg.yarn_beta_slow,
                mscale=cfg.yarn_mscale,
                mscale_all_dim=cfg.yarn_mscale_all_dim,
            )
    return config_cls(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.query_groups,
        ffn_hidden_size=cfg.ffn_size,
        # MLA: the attention output has v_head_dim channels per head (what the core attention reshapes to).
        kv_channels=cfg.v_head_dim if cfg.multi_latent_attention else cfg.head_dim,
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
        **mla,
    )


# --- Multi-latent attention with the local spec (models/hf: DeepSeek-V3 on CPU) ---


def _adapt_local_mla_spec(spec) -> None:
    """Make megatron-core 0.16.1's multi-latent attention build with the local (non-TE) spec.

    Two gaps, both seen on CPU: (1) `multi_latent_attention` sets HAVE_TE=True when the TE
    extension module imports, which it does without TE (its classes are then mocks and
    `isinstance(x, TELinear)` raises TypeError); (2) MLA passes k_channels/v_channels to its core
    attention, which the local DotProductAttention does not accept. The local attention is
    correct for MLA once config.kv_channels = v_head_dim: queries/keys carry their own widths.
    """
    from megatron.core.extensions import transformer_engine as te_extension
    from megatron.core.transformer import multi_latent_attention

    multi_latent_attention.HAVE_TE = te_extension.HAVE_TE
    core_attention = _local_mla_core_attention()
    for layer_spec in spec.layer_specs:
        layer_spec.submodules.self_attention.submodules.core_attention = core_attention


_LOCAL_MLA_CORE_ATTENTION = None


def _local_mla_core_attention():
    global _LOCAL_MLA_CORE_ATTENTION
    if _LOCAL_MLA_CORE_ATTENTION is None:
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        class LocalMLACoreAttention(DotProductAttention):
            def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
                super().__init__(*args, **kwargs)

        _LOCAL_MLA_CORE_ATTENTION = LocalMLACoreAttention
    return _LOCAL_MLA_CORE_ATTENTION


def build_gpt_model(
    cfg: ModelConfig,
    layout: ParallelLayout,
    *,
    dtype: torch.dtype = torch.float32,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    on_device: torch.device | str | None = None,
    use_transformer_engine: bool | None = None,
    routing_replay: bool = False,
):
    """Build this rank's part of the model (its TP shard and PP stage) on the runtime's device.

    Requires `runtime.init_runtime` to have set up megatron's parallel state. `on_device` overrides
    the runtime's device ("meta", inside `with torch.device("meta")`, builds the structure without
    memory); `use_transformer_engine` overrides the automatic choice of layer spec;
    `routing_replay` (MoE models) lets models/routing.py record and replay the routers' choices.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron_opd.runtime.distributed import device

    config = transformer_config(cfg, layout, dtype, routing_replay=routing_replay)
    use_te = transformer_engine_available() if use_transformer_engine is None else use_transformer_engine
    # The block spec places dense and MoE layers per moe_layer_freq (all dense without experts).
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization="RMSNorm")
    if cfg.multi_latent_attention and not use_te:
        _adapt_local_mla_spec(spec)
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
        # Llama 3.1-style scaling (models/hf); the defaults leave RoPE as it was.
        rope_scaling=cfg.rope_scaling == "llama3",
        rope_scaling_factor=cfg.rope_scaling_factor if cfg.rope_scaling == "llama3" else 8.0,
    )
    if dtype != torch.float32:
        # The local spec's torch norms ignore params_dtype and stay float32; megatron's
        # Float16 optimizer only shards half-precision params (a float32 one fails the
        # checkpoint save), and Megatron-LM's Float16Module casts every param the same way.
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
    if on_device is not None:
        return model.to(on_device)
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


@contextlib.contextmanager
def output_layer_bypassed(model: torch.nn.Module, *, gather_sequence: bool = False):
    """Make megatron's output layer hand back its input: `GPTModel.forward` then returns the final
    (post-norm) hidden states [b, s, h] instead of logits, for losses that apply a head themselves
    and for in-job teachers (teachers/in_job.py). Under sequence parallelism that input is this
    rank's sequence shard; `gather_sequence` gathers the whole sequence (forward only)."""
    layer = model.output_layer

    def forward(input_, weight=None, runtime_gather_output=None):
        if gather_sequence and model.config.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            input_ = gather_from_sequence_parallel_region(input_)
        return input_, None

    layer.forward = forward
    try:
        yield
    finally:
        del layer.forward
