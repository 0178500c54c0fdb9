"""HF <-> megatron conversion (megatron_opd.models.hf) without megatron running: name tables, row
layouts, config translation, file errors.

No process group is started here; everything that builds a megatron model runs in spawned worlds
(test_convert_models.py, test_convert_reshard.py, test_convert_merge.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoints_tools.staging import Arena
from megatron_opd.models.config import ModelConfig
from megatron_opd.models.hf.architectures import (
    ARCHITECTURES,
    architecture_of_hf_config,
    get_architecture,
    hf_config_from_model,
    infer_architecture,
    model_config_from_hf,
)
from megatron_opd.models.hf.errors import CorruptCheckpoint, UnknownArchitecture, UnsupportedConfig
from megatron_opd.models.hf.hf_dir import HFCheckpoint
from megatron_opd.models.hf.mapping import LAYOUTS, _pattern
from megatron_opd.models.hf.megatron_io import Slot, te_key

ROOT = Path(__file__).resolve().parents[1]


def tiny_hf_configs() -> dict[str, dict]:
    """config.json contents of tiny models of every architecture, written by transformers itself."""
    import transformers as T

    base = dict(
        vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64
    )
    configs = {
        "llama": T.LlamaConfig(
            **base, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True
        ),
        "qwen2": T.Qwen2Config(**base, intermediate_size=128, num_key_value_heads=2),
        "qwen3": T.Qwen3Config(**base, intermediate_size=128, num_key_value_heads=2, head_dim=16),
        "qwen3_moe": T.Qwen3MoeConfig(
            **base,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[0],
        ),
        "deepseek_v3": T.DeepseekV3Config(
            **base,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_key_value_heads=4,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
        ),
    }
    return {name: json.loads(c.to_json_string()) for name, c in configs.items()}


def test_tables_cover_each_megatron_name_once():
    # Instantiate every rule's megatron pattern and check no other rule of the table also claims it.
    for arch in ARCHITECTURES.values():
        for r in arch.rules:
            name = r.megatron.format(L="3", E="5")
            hits = [o.megatron for o in arch.rules if _pattern(o.megatron).fullmatch(name)]
            assert hits == [r.megatron], (arch.name, name, hits)


def test_qkv_layout_matches_megatrons_interleave():
    # Reference: megatron's fused QKV is [q heads of group g, k_g, v_g] for g in groups, i.e. a
    # view of q as (groups, heads_per_group * d) concatenated per group with k and v.
    cfg = ModelConfig(hidden_size=24, num_attention_heads=6, num_query_groups=2, kv_channels=3)
    d, g, h, hidden = 3, 2, 6, 5
    q, k, v = torch.randn(h * d, hidden), torch.randn(g * d, hidden), torch.randn(g * d, hidden)
    reference = torch.cat(
        [q.view(g, -1, hidden), k.view(g, -1, hidden), v.view(g, -1, hidden)], dim=1
    ).reshape(-1, hidden)
    hf_shapes, blocks = LAYOUTS["qkv"](tuple(reference.shape), 3, cfg)
    assert hf_shapes == [tuple(q.shape), tuple(k.shape), tuple(v.shape)]
    assembled = torch.cat([(q, k, v)[b.src][b.start : b.stop] for b in blocks])
    assert torch.equal(assembled, reference)
    # Bias (1-D) uses the same blocks.
    qb, kb, vb = torch.randn(h * d), torch.randn(g * d), torch.randn(g * d)
    _, blocks = LAYOUTS["qkv"](((h + 2 * g) * d,), 3, cfg)
    ref_bias = torch.cat([qb.view(g, -1), kb.view(g, -1), vb.view(g, -1)], dim=1).reshape(-1)
    assert torch.equal(torch.cat([(qb, kb, vb)[b.src][b.start : b.stop] for b in blocks]), ref_bias)


def test_vocab_layout_pads_with_zero_rows():
    cfg = ModelConfig(vocab_size=100)
    hf_shapes, blocks = LAYOUTS["vocab"]((128, 8), 1, cfg)
    assert hf_shapes == [(100, 8)]
    assert [(b.src, b.rows) for b in blocks] == [(0, 100), (None, 28)]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_config_translation_round_trips(arch):
    hf = tiny_hf_configs()[arch]
    a = architecture_of_hf_config(hf)
    assert a.name == arch
    cfg = model_config_from_hf(a, hf)
    assert infer_architecture(cfg).name == arch  # what export picks without --arch
    again = model_config_from_hf(a, hf_config_from_model(a, cfg, torch_dtype="float32"))
    assert again == cfg


def test_config_translation_maps_routing_and_attention_fields():
    cfgs = tiny_hf_configs()
    moe = model_config_from_hf(get_architecture("qwen3_moe"), cfgs["qwen3_moe"])
    assert moe.moe_layer_freq == [0, 1, 1] and moe.num_experts == 8 and not moe.moe_router_pre_softmax
    ds = model_config_from_hf(get_architecture("deepseek_v3"), cfgs["deepseek_v3"])
    assert ds.multi_latent_attention and ds.qk_pos_emb_head_dim == 8 and ds.v_head_dim == 16
    assert (
        ds.moe_router_score == "sigmoid" and ds.moe_router_expert_bias and ds.moe_topk_scaling_factor == 2.5
    )
    assert (ds.moe_router_num_groups, ds.moe_router_group_topk) == (2, 1)
    assert ds.moe_shared_expert_size == 32 and ds.moe_layer_freq == [0, 1, 1]


def test_unsupported_fields_are_named():
    cfgs = tiny_hf_configs()
    with pytest.raises(UnsupportedConfig, match="hidden_act"):
        model_config_from_hf(get_architecture("llama"), dict(cfgs["llama"], hidden_act="gelu"))
    with pytest.raises(UnsupportedConfig, match="topk_group"):
        model_config_from_hf(get_architecture("deepseek_v3"), dict(cfgs["deepseek_v3"], topk_group=2))
    with pytest.raises(UnsupportedConfig, match="rope_type"):
        model_config_from_hf(
            get_architecture("llama"),
            dict(cfgs["llama"], rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
        )
    # Export side: a model with q/k norm cannot be written as llama; the message suggests qwen3.
    with pytest.raises(UnsupportedConfig, match="qk_layernorm.*qwen3"):
        hf_config_from_model(get_architecture("llama"), ModelConfig(qk_layernorm=True), torch_dtype="float32")


def test_unknown_architecture_lists_supported_ones():
    with pytest.raises(UnknownArchitecture) as e:
        architecture_of_hf_config({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    for name in ARCHITECTURES:
        assert name in str(e.value)


def test_te_naming_differs_only_for_fused_norms():
    dense_moe = ModelConfig(num_layers=2, num_experts=4, moe_layer_freq=[0, 1])
    mla = dataclasses.replace(
        dense_moe,
        multi_latent_attention=True,
        kv_lora_rank=8,
        qk_head_dim=8,
        qk_pos_emb_head_dim=4,
        v_head_dim=8,
    )

    def slot(name, key):
        return Slot(name, key, (), (4,), torch.float32)

    # Local spec: pre-MLP norms are stored as mlp.linear_fc1.layer_norm_weight in every non-MLA layer.
    moe_norm = slot(
        "decoder.layers.1.pre_mlp_layernorm.weight", "decoder.layers.1.mlp.linear_fc1.layer_norm_weight"
    )
    assert te_key(dense_moe, moe_norm) == "decoder.layers.1.pre_mlp_layernorm.weight"
    dense_norm = slot(
        "decoder.layers.0.pre_mlp_layernorm.weight", "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"
    )
    assert te_key(dense_moe, dense_norm) == dense_norm.key
    q_norm = slot(
        "decoder.layers.0.self_attention.q_layernorm.weight",
        "decoder.layers.0.self_attention.q_layernorm.weight",
    )
    assert te_key(dense_moe, q_norm) == q_norm.key
    assert te_key(mla, q_norm) == "decoder.layers.0.self_attention.linear_q_up_proj.layer_norm_weight"
    mla_dense_norm = slot(
        "decoder.layers.0.pre_mlp_layernorm.weight", "decoder.layers.0.pre_mlp_layernorm.weight"
    )
    assert te_key(mla, mla_dense_norm) == "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"
    # Stacked keys (homogeneous models) keep their layer-less prefix.
    stacked = slot(
        "decoder.layers.1.input_layernorm.weight",
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
    )
    assert te_key(ModelConfig(), stacked) == stacked.key


def _write_tiny_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(tiny_hf_configs()["llama"]))
    tensors = {
        "a.weight": torch.randn(8, 4).to(torch.bfloat16),
        "b.weight": torch.randn(6, 4),
        "c.bias": torch.randn(5),
    }
    save_file(tensors, str(directory / "model.safetensors"))
    return tensors


def test_hf_reader_maps_rows_without_copies(tmp_path):
    tensors = _write_tiny_safetensors(tmp_path)
    hf = HFCheckpoint(tmp_path)
    assert hf.names() == sorted(tensors)
    rows = hf.rows("a.weight", 2, 5)
    assert torch.equal(rows, tensors["a.weight"][2:5])
    # megatron's writer clones any tensor whose storage is larger than itself; ours must not be.
    assert rows.untyped_storage().nbytes() == rows.numel() * rows.element_size()
    with Arena(
        tmp_path / "arena", Arena.bytes_for([((3, 4), torch.float32), ((7,), torch.bfloat16)])
    ) as arena:
        x, y = arena.zeros((3, 4), torch.float32), arena.zeros((7,), torch.bfloat16)
        assert x.untyped_storage().nbytes() == 48 and y.untyped_storage().nbytes() == 14
    assert not (tmp_path / "arena").exists()


def test_truncated_safetensors_names_file_and_tensors(tmp_path):
    _write_tiny_safetensors(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-30])  # cut into the last tensor's data
    with pytest.raises(CorruptCheckpoint) as e:
        HFCheckpoint(tmp_path)
    message = str(e.value)
    assert "model.safetensors is truncated" in message and "tensors cut off" in message
    assert re.search(r"(a\.weight|b\.weight|c\.bias)", message)
    f.write_bytes(b"\x10\x00")
    with pytest.raises(CorruptCheckpoint, match="too short"):
        HFCheckpoint(tmp_path)


def test_index_listing_an_absent_tensor_is_corrupt(tmp_path):
    _write_tiny_safetensors(tmp_path)
    index = {
        "metadata": {},
        "weight_map": {"a.weight": "model.safetensors", "ghost.weight": "model.safetensors"},
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpoint, match="ghost.weight"):
        HFCheckpoint(tmp_path)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_reports_unknown_architecture_and_truncated_file(tmp_path):
    _write_tiny_safetensors(tmp_path / "gpt2")
    cfg = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    (tmp_path / "gpt2" / "config.json").write_text(
        json.dumps(dict(cfg, model_type="gpt2", architectures=["GPT2LMHeadModel"]))
    )
    r = _cli(
        "checkpoints_tools.convert",
        "--source",
        "hf",
        "--target",
        "megatron",
        "--input",
        str(tmp_path / "gpt2"),
        "--output",
        str(tmp_path / "out"),
        "--no-progress",
    )
    assert r.returncode == 2, r.stderr
    assert "unknown architecture" in r.stderr and "deepseek_v3" in r.stderr and "Traceback" not in r.stderr

    _write_tiny_safetensors(tmp_path / "cut")
    f = tmp_path / "cut" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = _cli(
        "checkpoints_tools.convert",
        "--source",
        "hf",
        "--target",
        "megatron",
        "--input",
        str(tmp_path / "cut"),
        "--output",
        str(tmp_path / "out2"),
        "--no-progress",
    )
    assert r.returncode == 2 and "model.safetensors is truncated" in r.stderr and "Traceback" not in r.stderr
