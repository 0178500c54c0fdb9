"""Supported Hugging Face architectures: a name table each (from shared rule groups), and config translation.

    llama        LlamaForCausalLM       GQA, SwiGLU, RMSNorm, RoPE (optionally Llama-3 scaling)
    qwen2        Qwen2ForCausalLM       llama + QKV bias
    qwen3        Qwen3ForCausalLM       llama + per-head q/k RMSNorm
    qwen3_moe    Qwen3MoeForCausalLM    qwen3 + routed experts (softmax router), dense layers optional
    deepseek_v3  DeepseekV3ForCausalLM  multi-latent attention, sigmoid router with score-correction
                                         bias and group-limited top-k, shared experts, first-k dense

Translating configs is where silent mismatches would hide, so every field with no faithful
megatron equivalent (another activation, o_proj bias, sliding windows, another RoPE scaling,
a router megatron computes differently) raises `UnsupportedConfig` naming the field.

Checkpoints on the hub store experts one by one (`mlp.experts.E.gate_proj.weight`); so does
transformers 5's `save_pretrained` (it fuses experts only in memory), and so do these tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_opd.models.config import ModelConfig
from megatron_opd.models.hf.errors import UnknownArchitecture, UnsupportedConfig
from megatron_opd.models.hf.mapping import Rule, check_rules, rule

L = "decoder.layers.{L}."
H = "model.layers.{L}."

EMBEDDINGS = (
    rule("embedding.word_embeddings.weight", "model.embed_tokens.weight", layout="vocab"),
    rule("decoder.final_layernorm.weight", "model.norm.weight"),
    rule("output_layer.weight", "lm_head.weight", layout="vocab"),
)
GQA_ATTENTION = (
    rule(L + "input_layernorm.weight", H + "input_layernorm.weight"),
    rule(
        L + "self_attention.linear_qkv.weight",
        *(H + f"self_attn.{p}_proj.weight" for p in "qkv"),
        layout="qkv",
    ),
    rule(L + "self_attention.linear_proj.weight", H + "self_attn.o_proj.weight"),
)
QKV_BIAS = (
    rule(
        L + "self_attention.linear_qkv.bias", *(H + f"self_attn.{p}_proj.bias" for p in "qkv"), layout="qkv"
    ),
)
QK_NORM = (
    rule(L + "self_attention.q_layernorm.weight", H + "self_attn.q_norm.weight"),
    rule(L + "self_attention.k_layernorm.weight", H + "self_attn.k_norm.weight"),
)
MLA_ATTENTION = (
    rule(L + "input_layernorm.weight", H + "input_layernorm.weight"),
    rule(L + "self_attention.linear_q_proj.weight", H + "self_attn.q_proj.weight"),  # q_lora_rank = 0
    rule(L + "self_attention.linear_q_down_proj.weight", H + "self_attn.q_a_proj.weight"),
    rule(L + "self_attention.q_layernorm.weight", H + "self_attn.q_a_layernorm.weight"),
    rule(L + "self_attention.linear_q_up_proj.weight", H + "self_attn.q_b_proj.weight"),
    rule(L + "self_attention.linear_kv_down_proj.weight", H + "self_attn.kv_a_proj_with_mqa.weight"),
    rule(L + "self_attention.kv_layernorm.weight", H + "self_attn.kv_a_layernorm.weight"),
    rule(L + "self_attention.linear_kv_up_proj.weight", H + "self_attn.kv_b_proj.weight"),
    rule(L + "self_attention.linear_proj.weight", H + "self_attn.o_proj.weight"),
)
DENSE_MLP = (
    rule(L + "pre_mlp_layernorm.weight", H + "post_attention_layernorm.weight"),
    rule(L + "mlp.linear_fc1.weight", H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight", layout="cat"),
    rule(L + "mlp.linear_fc2.weight", H + "mlp.down_proj.weight"),
)
ROUTED_EXPERTS = (
    rule(L + "mlp.router.weight", H + "mlp.gate.weight"),
    rule(
        L + "mlp.experts.local_experts.{E}.linear_fc1.weight",
        H + "mlp.experts.{E}.gate_proj.weight",
        H + "mlp.experts.{E}.up_proj.weight",
        layout="cat",
    ),
    rule(L + "mlp.experts.local_experts.{E}.linear_fc2.weight", H + "mlp.experts.{E}.down_proj.weight"),
)
ROUTER_BIAS = (rule(L + "mlp.router.expert_bias", H + "mlp.gate.e_score_correction_bias"),)
SHARED_EXPERTS = (
    rule(
        L + "mlp.shared_experts.linear_fc1.weight",
        H + "mlp.shared_experts.gate_proj.weight",
        H + "mlp.shared_experts.up_proj.weight",
        layout="cat",
    ),
    rule(L + "mlp.shared_experts.linear_fc2.weight", H + "mlp.shared_experts.down_proj.weight"),
)


@dataclass(frozen=True)
class Architecture:
    name: str  # = the HF model_type
    hf_class: str
    rules: tuple[Rule, ...]
    attention: str = "gqa"  # "gqa" | "mla"
    qkv_bias: bool = False
    qk_norm: bool = False
    moe: str = ""  # "" | "qwen3_moe" | "deepseek_v3"
    # HF tensors with no megatron counterpart, skipped on import (regexes, full match).
    ignore: tuple[str, ...] = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("llama", "LlamaForCausalLM", EMBEDDINGS + GQA_ATTENTION + DENSE_MLP),
        Architecture(
            "qwen2", "Qwen2ForCausalLM", EMBEDDINGS + GQA_ATTENTION + QKV_BIAS + DENSE_MLP, qkv_bias=True
        ),
        Architecture(
            "qwen3", "Qwen3ForCausalLM", EMBEDDINGS + GQA_ATTENTION + QK_NORM + DENSE_MLP, qk_norm=True
        ),
        Architecture(
            "qwen3_moe",
            "Qwen3MoeForCausalLM",
            EMBEDDINGS + GQA_ATTENTION + QK_NORM + DENSE_MLP + ROUTED_EXPERTS,
            qk_norm=True,
            moe="qwen3_moe",
        ),
        Architecture(
            "deepseek_v3",
            "DeepseekV3ForCausalLM",
            EMBEDDINGS + MLA_ATTENTION + DENSE_MLP + ROUTED_EXPERTS + ROUTER_BIAS + SHARED_EXPERTS,
            attention="mla",
            moe="deepseek_v3",
        ),
    )
}
for _arch in ARCHITECTURES.values():
    check_rules(_arch.name, _arch.rules)


def get_architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise UnknownArchitecture(
            f"unknown architecture {name!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[name]


def architecture_of_hf_config(hf: dict) -> Architecture:
    """The architecture of a config.json, by model_type (and the class listed in `architectures`)."""
    model_type = hf.get("model_type")
    classes = hf.get("architectures") or []
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    by_class = {a.hf_class: a for a in ARCHITECTURES.values()}
    for c in classes:
        if c in by_class:
            return by_class[c]
    raise UnknownArchitecture(
        f"unknown architecture: model_type={model_type!r}, architectures={classes}; supported model types: "
        f"{', '.join(sorted(ARCHITECTURES))} ({', '.join(sorted(by_class))})"
    )


def infer_architecture(cfg: ModelConfig) -> Architecture:
    """The HF architecture that expresses a ModelConfig exactly (export without --arch)."""
    if cfg.multi_latent_attention:
        return ARCHITECTURES["deepseek_v3"]
    if cfg.is_moe:
        return ARCHITECTURES["qwen3_moe"]
    if cfg.qk_layernorm:
        return ARCHITECTURES["qwen3"]
    if cfg.qkv_bias:
        return ARCHITECTURES["qwen2"]
    return ARCHITECTURES["llama"]


# ---------------------------------------------------------------------------------------------
# config.json -> ModelConfig


def _unsupported(arch: str, field: str, value: Any, why: str) -> UnsupportedConfig:
    return UnsupportedConfig(f"{arch}: config field {field}={value!r} is not supported: {why}")


def _rope_from_hf(arch: str, hf: dict) -> dict:
    # transformers >= 5 writes rope_parameters (theta inside); hub configs have rope_theta + rope_scaling.
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope = params if params.get("rope_type", "default") != "default" else scaling or params
    kind = rope.get("rope_type", rope.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind in ("default", None):
        return out
    if kind == "llama3":
        fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for k, v in fixed.items():
            if float(rope.get(k, v)) != v:
                raise _unsupported(arch, f"rope_scaling.{k}", rope.get(k), f"megatron-core fixes it at {v}")
        return dict(out, rope_scaling="llama3", rope_scaling_factor=float(rope["factor"]))
    if kind == "yarn":
        if arch != "deepseek_v3":
            raise _unsupported(
                arch, "rope_scaling.rope_type", kind, "megatron-core implements YaRN for MLA only"
            )
        return dict(
            out,
            rope_scaling="yarn",
            rope_scaling_factor=float(rope["factor"]),
            yarn_original_max_position=int(rope.get("original_max_position_embeddings", 4096)),
            yarn_beta_fast=float(rope.get("beta_fast", 32.0)),
            yarn_beta_slow=float(rope.get("beta_slow", 1.0)),
            yarn_mscale=float(rope.get("mscale", 1.0)),
            yarn_mscale_all_dim=float(rope.get("mscale_all_dim", 0.0)),
        )
    raise _unsupported(arch, "rope_scaling.rope_type", kind, "supported: default, llama3, yarn (MLA)")


def model_config_from_hf(arch: Architecture, hf: dict) -> ModelConfig:
    a = arch.name
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported(a, "hidden_act", hf.get("hidden_act"), "the model builder uses SwiGLU (silu)")
    if hf.get("mlp_bias"):
        raise _unsupported(a, "mlp_bias", True, "the model builder has no linear biases")
    if hf.get("use_sliding_window"):
        raise _unsupported(a, "use_sliding_window", True, "sliding-window attention is not built")
    if arch.attention == "gqa" and hf.get("attention_bias") and not arch.qkv_bias:
        raise _unsupported(
            a, "attention_bias", True, "it adds an o_proj bias the model builder does not have"
        )
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    kw: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        ffn_hidden_size=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 4096),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        **_rope_from_hf(a, hf),
    )
    if arch.attention == "gqa":
        kw.update(
            num_query_groups=hf.get("num_key_value_heads") or heads,
            kv_channels=hf.get("head_dim") or hidden // heads,
        )
    else:
        if not hf.get("rope_interleave", True):
            raise _unsupported(
                a, "rope_interleave", False, "megatron's MLA applies RoPE to interleaved pairs"
            )
        kw.update(
            multi_latent_attention=True,
            qk_layernorm=True,  # q_a_layernorm / kv_a_layernorm
            q_lora_rank=hf.get("q_lora_rank") or 0,
            kv_lora_rank=hf["kv_lora_rank"],
            qk_head_dim=hf["qk_nope_head_dim"],
            qk_pos_emb_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
        )
    n = kw["num_layers"]
    if arch.moe and not any(_moe_layers(arch, hf, n)):
        return ModelConfig(**kw)  # every layer dense (e.g. first_k_dense_replace >= num_hidden_layers)
    if arch.moe == "qwen3_moe":
        freq = _moe_layers(arch, hf, n)
        kw.update(
            num_experts=hf.get("num_experts") or hf["num_local_experts"],  # transformers 5 writes the latter
            moe_topk=hf["num_experts_per_tok"],
            moe_ffn_hidden_size=hf["moe_intermediate_size"],
            moe_layer_freq=freq if 0 in freq else [],
            moe_router_score="softmax",
            # megatron's softmax router renormalises over the top-k unless it softmaxes first.
            moe_router_pre_softmax=not hf.get("norm_topk_prob", False),
        )
    elif arch.moe == "deepseek_v3":
        topk, groups, group_topk = (
            hf["num_experts_per_tok"],
            hf.get("n_group") or 1,
            hf.get("topk_group") or 1,
        )
        if hf.get("scoring_func", "sigmoid") != "sigmoid":
            raise _unsupported(a, "scoring_func", hf.get("scoring_func"), "DeepSeek-V3 routing is sigmoid")
        if hf.get("topk_method", "noaux_tc") != "noaux_tc":
            raise _unsupported(
                a, "topk_method", hf.get("topk_method"), "only noaux_tc (DeepSeek-V3) is mapped"
            )
        if topk > 1 and not hf.get("norm_topk_prob", True):
            raise _unsupported(
                a, "norm_topk_prob", False, "megatron's sigmoid router always normalises the top-k"
            )
        if groups > 1 and topk // group_topk != 2:
            raise _unsupported(
                a,
                "topk_group",
                group_topk,
                f"megatron scores an expert group by its top num_experts_per_tok/topk_group experts "
                f"({topk}/{group_topk}), DeepSeek-V3 by its top 2",
            )
        freq = _moe_layers(arch, hf, n)
        kw.update(
            num_experts=hf["n_routed_experts"],
            moe_topk=topk,
            moe_ffn_hidden_size=hf["moe_intermediate_size"],
            moe_shared_expert_size=(hf.get("n_shared_experts") or 0) * hf["moe_intermediate_size"],
            moe_layer_freq=freq if 0 in freq else [],
            moe_router_score="sigmoid",
            moe_router_expert_bias=True,
            moe_topk_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            moe_router_num_groups=groups if groups > 1 else 0,
            moe_router_group_topk=group_topk if groups > 1 else 0,
        )
    return ModelConfig(**kw)


def _moe_layers(arch: Architecture, hf: dict, n: int) -> list[int]:
    """1 for each layer with routed experts, as the HF modeling code decides it."""
    if arch.moe == "qwen3_moe":
        step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
        return [0 if (i in dense or (i + 1) % step) else 1 for i in range(n)]
    if arch.moe == "deepseek_v3":
        first, every = hf.get("first_k_dense_replace", 0), hf.get("moe_layer_freq", 1)
        return [1 if (i >= first and i % every == 0) else 0 for i in range(n)]
    return [0] * n


# ---------------------------------------------------------------------------------------------
# ModelConfig -> config.json


def _require(arch: Architecture, cfg: ModelConfig, **expected) -> None:
    for field, want in expected.items():
        have = getattr(cfg, field)
        if have != want:
            other = infer_architecture(cfg).name
            hint = f" (architecture {other} can)" if other != arch.name else ""
            raise UnsupportedConfig(f"architecture {arch.name} cannot express model.{field}={have!r}{hint}")


def hf_config_from_model(
    arch: Architecture, cfg: ModelConfig, *, torch_dtype: str, token_ids: dict[str, int] | None = None
) -> dict:
    """A hub-style config.json for `cfg` (rope_theta/rope_scaling at top level: what SGLang and
    both transformers 4 and 5 read)."""
    _require(arch, cfg, qkv_bias=arch.qkv_bias, multi_latent_attention=arch.attention == "mla")
    if arch.attention == "gqa":
        _require(arch, cfg, qk_layernorm=arch.qk_norm)
    if not arch.moe:
        _require(arch, cfg, num_experts=0)
    hf: dict[str, Any] = {
        "architectures": [arch.hf_class],
        "model_type": arch.name,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.query_groups,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.qkv_bias if arch.name != "qwen2" else True,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": torch_dtype,
    }
    if cfg.rope_scaling == "llama3":
        hf["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": cfg.rope_scaling_factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    elif cfg.rope_scaling == "yarn":
        hf["rope_scaling"] = {
            "rope_type": "yarn",
            "factor": cfg.rope_scaling_factor,
            "original_max_position_embeddings": cfg.yarn_original_max_position,
            "beta_fast": cfg.yarn_beta_fast,
            "beta_slow": cfg.yarn_beta_slow,
            "mscale": cfg.yarn_mscale,
            "mscale_all_dim": cfg.yarn_mscale_all_dim,
        }
    if arch.attention == "gqa":
        hf["head_dim"] = cfg.head_dim
    if arch.name in ("qwen2", "qwen3", "qwen3_moe"):
        hf.update(use_sliding_window=False, sliding_window=None)
    freq = (list(cfg.moe_layer_freq) or [1] * cfg.num_layers) if cfg.is_moe else [0] * cfg.num_layers
    if arch.moe and not cfg.is_moe:
        # An architecture with experts, every layer dense: the routing fields are inert placeholders.
        expert = {
            "qwen3_moe": dict(
                num_experts=1,
                num_experts_per_tok=1,
                moe_intermediate_size=cfg.ffn_size,
                mlp_only_layers=list(range(cfg.num_layers)),
                decoder_sparse_step=1,
            ),
            "deepseek_v3": dict(
                n_routed_experts=1,
                num_experts_per_tok=1,
                moe_intermediate_size=cfg.ffn_size,
                n_shared_experts=0,
                first_k_dense_replace=cfg.num_layers,
                n_group=1,
                topk_group=1,
            ),
        }
        hf.update(expert[arch.moe])
    if arch.moe == "qwen3_moe" and cfg.is_moe:
        _require(
            arch,
            cfg,
            moe_router_score="softmax",
            moe_router_expert_bias=False,
            moe_shared_expert_size=0,
            moe_topk_scaling_factor=0.0,
            moe_router_num_groups=0,
        )
        hf.update(
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.moe_topk,
            moe_intermediate_size=cfg.moe_ffn_hidden_size or cfg.ffn_size,
            norm_topk_prob=not cfg.moe_router_pre_softmax,
            decoder_sparse_step=1,
            mlp_only_layers=[i for i, f in enumerate(freq) if not f],
            output_router_logits=False,
            router_aux_loss_coef=cfg.moe_aux_loss_coeff,
        )
    if arch.attention == "mla":
        hf.update(
            q_lora_rank=cfg.q_lora_rank or None,
            kv_lora_rank=cfg.kv_lora_rank,
            qk_nope_head_dim=cfg.qk_head_dim,
            qk_rope_head_dim=cfg.qk_pos_emb_head_dim,
            qk_head_dim=cfg.qk_head_dim + cfg.qk_pos_emb_head_dim,
            head_dim=cfg.qk_pos_emb_head_dim,
            v_head_dim=cfg.v_head_dim,
            rope_interleave=True,
            num_nextn_predict_layers=0,
        )
    if arch.moe == "deepseek_v3" and cfg.is_moe:
        _require(
            arch, cfg, moe_router_score="sigmoid", moe_router_expert_bias=True, moe_router_pre_softmax=False
        )
        first = freq.index(1) if 1 in freq else cfg.num_layers
        if freq != [0] * first + [1] * (cfg.num_layers - first):
            raise UnsupportedConfig(
                f"deepseek_v3 needs dense layers first, then MoE; model.moe_layer_freq={freq}"
            )
        expert = cfg.moe_ffn_hidden_size or cfg.ffn_size
        if cfg.moe_shared_expert_size % expert:
            raise UnsupportedConfig(
                f"deepseek_v3 needs moe_shared_expert_size ({cfg.moe_shared_expert_size}) to be a multiple of the "
                f"expert size ({expert})"
            )
        hf.update(
            n_routed_experts=cfg.num_experts,
            num_experts_per_tok=cfg.moe_topk,
            moe_intermediate_size=expert,
            n_shared_experts=cfg.moe_shared_expert_size // expert,
            first_k_dense_replace=first,
            moe_layer_freq=1,
            n_group=cfg.moe_router_num_groups or 1,
            topk_group=cfg.moe_router_group_topk or 1,
            routed_scaling_factor=cfg.moe_topk_scaling_factor or 1.0,
            norm_topk_prob=True,
            scoring_func="sigmoid",
            topk_method="noaux_tc",
        )
    hf.update(token_ids or {})
    return hf
