"""HF <-> megatron conversion of real tiny models, checked against transformers' own forward.

Everything megatron runs in one spawned world of one rank (`_world`), whose findings the tests
assert on: per architecture, HF -> megatron logits vs transformers (fp32, eager attention),
HF -> megatron -> HF bit-exactness of every tensor and of config.json, the export loading in
AutoModelForCausalLM; exports of models we trained ourselves (no HF origin); the errors for
missing, unexpected and mis-shaped tensors; and resident memory while converting.
"""

from __future__ import annotations

import functools
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

ARCHS = ("llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3")
TOKENS = [
    [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79],
    [2, 71, 82, 81, 82, 84, 59, 4, 52, 35, 36, 2, 87, 47, 13, 52],
]


def tiny_hf_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random transformers model with non-trivial norms, biases and router biases.

    "deepseek_v3_dense": DeepSeek-V3 attention (MLA, YaRN) with dense layers only.
    """
    import transformers as T

    torch.manual_seed(seed)
    base = dict(
        vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64
    )
    if arch == "llama":  # Llama 3.1-style RoPE scaling: it changes the low frequencies even at short lengths
        llama3 = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_theta": 500000.0,
        }
        model = T.LlamaForCausalLM(
            T.LlamaConfig(
                **dict(base, max_position_embeddings=16384),
                intermediate_size=128,
                num_key_value_heads=2,
                tie_word_embeddings=True,
                rope_parameters=llama3,
            )
        )
    elif arch == "qwen2":
        model = T.Qwen2ForCausalLM(
            T.Qwen2Config(**base, intermediate_size=128, num_key_value_heads=2, rope_theta=50000.0)
        )
    elif arch == "qwen3":
        model = T.Qwen3ForCausalLM(
            T.Qwen3Config(**base, intermediate_size=128, num_key_value_heads=2, head_dim=24)
        )
    elif arch == "qwen3_moe":
        model = T.Qwen3MoeForCausalLM(
            T.Qwen3MoeConfig(
                **base,
                intermediate_size=128,
                moe_intermediate_size=32,
                num_key_value_heads=2,
                head_dim=16,
                num_experts=8,
                num_experts_per_tok=2,
                norm_topk_prob=True,
                mlp_only_layers=[0],
            )
        )
    elif arch in ("deepseek_v3", "deepseek_v3_dense"):
        yarn = {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "rope_theta": 10000.0,
        }
        model = T.DeepseekV3ForCausalLM(
            T.DeepseekV3Config(
                **base,
                intermediate_size=128,
                moe_intermediate_size=32,
                num_key_value_heads=4,
                n_routed_experts=8,
                num_experts_per_tok=2,
                n_shared_experts=1,
                n_group=2,
                topk_group=1,
                first_k_dense_replace=1 if arch == "deepseek_v3" else base["num_hidden_layers"],
                q_lora_rank=32,
                kv_lora_rank=16,
                qk_nope_head_dim=16,
                qk_rope_head_dim=8,
                v_head_dim=16,
                rope_parameters=yarn,
            )
        )
    else:
        raise ValueError(arch)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # ones would hide a missing or misplaced norm
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.uniform_(-0.2, 0.2)
    return model.to(dtype).eval()


def read_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def hf_logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float()


# ---------------------------------------------------------------------------------------------
# The world (one rank): everything that runs megatron


def _round_trip(arch: str, root: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from checkpoints_tools.convert import hf_to_megatron
    from megatron_opd.models.hf.export import megatron_to_hf
    from megatron_opd.models.hf.manifest import verify_manifest
    from checkpoints_tools.verify import load_and_forward

    hf = tiny_hf_model(arch)
    hf.save_pretrained(root / "hf", max_shard_size="60KB")  # several shards + an index
    (root / "hf" / "tokenizer.json").write_text(
        '{"version": "1.0", "model": {"type": "BPE"}}'
    )  # travels along
    hf_to_megatron(root / "hf", root / "mg", progress=False)
    logits, _ = load_and_forward(str(root / "mg"), {}, TOKENS)
    reference = hf_logits(hf, TOKENS)
    megatron_to_hf(root / "mg", root / "back", max_shard_bytes=50_000)
    a, b = read_safetensors_dir(root / "hf"), read_safetensors_dir(root / "back")
    reloaded = AutoModelForCausalLM.from_pretrained(root / "back", attn_implementation="eager").eval()
    rope = {}
    if arch == "llama":  # short test sequences barely feel RoPE scaling: compare the frequencies themselves
        from megatron_opd.models.hf.megatron_io import open_megatron
        from megatron_opd.models.gpt import build_gpt_model
        from megatron_opd.runtime.layout import ParallelLayout

        net = build_gpt_model(open_megatron(root / "mg").cfg, ParallelLayout())
        ours, theirs = net.rotary_pos_emb.inv_freq.float(), hf.model.rotary_emb.inv_freq.float()
        unscaled = 1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16))
        rope = {
            "inv_freq_error": (ours - theirs).abs().max().item(),
            "scaling_changes": (theirs - unscaled).abs().max().item(),
        }
    return {
        **rope,
        "max_logit_error": (logits - reference).abs().max().item(),
        "logit_scale": reference.abs().max().item(),
        "same_names": sorted(a) == sorted(b),
        "bit_exact": sorted(a) == sorted(b)
        and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a),
        "n_tensors": len(a),
        "config_identical": (root / "hf" / "config.json").read_text()
        == (root / "back" / "config.json").read_text(),
        "tokenizer_copied": (root / "back" / "tokenizer.json").read_text()
        == (root / "hf" / "tokenizer.json").read_text(),
        "reloaded_error": (hf_logits(reloaded, TOKENS) - reference).abs().max().item(),
        "manifest_problems": verify_manifest(root / "mg") + verify_manifest(root / "back"),
        "shards": len(list((root / "back").glob("model-*-of-*.safetensors"))),
    }


def _student_export(root: Path, cfg_kwargs: dict) -> dict:
    """A model of ours (megatron init, char tokenizer, no HF origin) exported and reloaded by transformers."""
    from transformers import AutoModelForCausalLM

    from megatron_opd.models.hf.export import megatron_to_hf
    from checkpoints_tools.verify import load_and_forward
    from megatron_opd.data.tokenizer import CharTokenizer
    from megatron_opd.models.config import ModelConfig
    from megatron_opd.models.gpt import build_gpt_model
    from megatron_opd.models.model_dir import write_model_dir
    from megatron_opd.runtime.checkpoint import save_checkpoint
    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.runtime.layout import ParallelLayout

    tok = CharTokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, **cfg_kwargs)
    layout = init_runtime(ParallelLayout(), seed=7)
    net = build_gpt_model(cfg, layout)
    with torch.no_grad():  # a trained model's norms are not all ones
        for name, p in net.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    write_model_dir(root / "student", cfg, tok)
    save_checkpoint(root / "student" / "checkpoints", 5, [net])
    ids = [tok.encode("12+34=46"), tok.encode("abc|cba;")]
    logits, _ = load_and_forward(str(root / "student"), {}, ids)
    megatron_to_hf(root / "student", root / "student_hf")
    reloaded = AutoModelForCausalLM.from_pretrained(root / "student_hf", attn_implementation="eager").eval()
    config = json.loads((root / "student_hf" / "config.json").read_text())
    return {
        "architecture": config["architectures"][0],
        "max_logit_error": (hf_logits(reloaded, ids) - logits).abs().max().item(),
        "tokenizer": json.loads((root / "student_hf" / "tokenizer.json").read_text()).get("type"),
        "eos_token_id": config.get("eos_token_id"),
    }


def _errors(root: Path) -> dict:
    from safetensors.torch import save_file

    from checkpoints_tools.convert import hf_to_megatron
    from megatron_opd.models.hf.errors import CheckpointError
    from megatron_opd.models.hf.export import megatron_to_hf
    from megatron_opd.models.hf.megatron_io import write_model_yaml, read_model_yaml

    tiny_hf_model("qwen2").save_pretrained(root / "ok")
    tensors = read_safetensors_dir(root / "ok")

    def variant(name: str, change) -> str:
        d = root / name
        shutil.copytree(root / "ok", d)
        t = dict(tensors)
        change(t)
        (d / "model.safetensors").unlink()
        save_file(t, str(d / "model.safetensors"))
        try:
            hf_to_megatron(d, root / f"{name}_out", progress=False)
        except CheckpointError as e:
            return f"{type(e).__name__}: {e}"
        return "no error"

    k = "model.layers.1.self_attn.k_proj.weight"
    messages = {
        "missing": variant("missing", lambda t: t.pop(k)),
        "unexpected": variant(
            "unexpected", lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.ones(2)})
        ),
        "shape": variant("shape", lambda t: t.update({k: torch.ones(16, 64)})),
    }
    # Export of a checkpoint whose model.yaml no longer describes it.
    hf_to_megatron(root / "ok", root / "ok_mg", progress=False)
    import dataclasses

    write_model_yaml(
        root / "ok_mg", dataclasses.replace(read_model_yaml(root / "ok_mg" / "model.yaml"), qk_layernorm=True)
    )
    (root / "ok_mg" / "manifest.json").unlink()  # else the manifest refuses the edited model.yaml first
    try:
        megatron_to_hf(root / "ok_mg", root / "ok_back")
        messages["yaml"] = "no error"
    except CheckpointError as e:
        messages["yaml"] = f"{type(e).__name__}: {e}"
    return messages


def _dtype_and_cli(root: Path) -> dict:
    """The CLI entry point end to end, casting to bf16 on import and back to fp32 on export."""
    from checkpoints_tools.convert import main as convert_main
    from checkpoints_tools.crosscheck import compare_model_with_checkpoint
    from megatron_opd.models.hf.megatron_io import open_megatron
    from megatron_opd.models.gpt import build_gpt_model
    from megatron_opd.runtime.checkpoint import load_checkpoint
    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.runtime.layout import ParallelLayout

    hf = tiny_hf_model("qwen3_moe")
    hf.save_pretrained(root / "hf")
    codes = [
        convert_main(
            [
                "--source",
                "hf",
                "--target",
                "megatron",
                "--input",
                str(root / "hf"),
                "--output",
                str(root / "mg"),
                "--dtype",
                "bf16",
                "--no-progress",
            ]
        ),
        convert_main(
            [
                "--source",
                "megatron",
                "--target",
                "hf",
                "--input",
                str(root / "mg"),
                "--output",
                str(root / "back"),
                "--dtype",
                "fp32",
                "--no-progress",
            ]
        ),
    ]
    a, b = read_safetensors_dir(root / "hf"), read_safetensors_dir(root / "back")
    # The crosscheck machinery (used against Megatron-Bridge on GPUs): a model loaded from the
    # checkpoint compares equal to it, and a perturbed tensor is reported.
    model = open_megatron(root / "mg")
    net = build_gpt_model(model.cfg, init_runtime(ParallelLayout(), seed=0))
    load_checkpoint(model.step_dir, [net], load_rng=False)
    same = compare_model_with_checkpoint(net, model.step_dir, model.cfg.vocab_size)
    with torch.no_grad():
        net.decoder.layers[1].mlp.experts.local_experts[3].linear_fc2.weight[0, 0] += 1.0
    perturbed = compare_model_with_checkpoint(net, model.step_dir, model.cfg.vocab_size)
    return {
        "codes": codes,
        "bf16_then_fp32_exact": sorted(a) == sorted(b)
        and all(
            torch.equal(b[k], a[k].to(torch.bfloat16).float()) and b[k].dtype == torch.float32 for k in a
        ),
        "config_dtype": json.loads((root / "back" / "config.json").read_text()).get("torch_dtype"),
        "crosscheck_same": max(same.values()),
        "crosscheck_keys": len(same),
        "crosscheck_perturbed": {k: v for k, v in perturbed.items() if v > 0},
    }


def _rss_anon() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak_anon_growth(fn) -> int:
    import gc

    gc.collect()
    base, peak, stop = _rss_anon(), [0], threading.Event()

    def watch():
        while not stop.wait(0.01):
            peak[0] = max(peak[0], _rss_anon() - base)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        stop.set()
        thread.join()
    return max(peak[0], _rss_anon() - base)


def _memory(root: Path) -> dict:
    """Convert a ~130 MB bf16 model with many small tensors; resident (anonymous) memory must stay small."""
    from transformers import LlamaConfig
    from safetensors.torch import save_file

    from checkpoints_tools.convert import hf_to_megatron
    from megatron_opd.models.hf.export import megatron_to_hf
    from megatron_opd.models.hf.megatron_io import model_slots
    from megatron_opd.models.hf.architectures import get_architecture, model_config_from_hf

    hidden, ffn, layers = 512, 2048, 16
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    d = root / "big_hf"
    config.save_pretrained(d)
    gen = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=gen).to(torch.bfloat16)

    weight_map = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        shard = {
            p + "input_layernorm.weight": t(hidden),
            p + "post_attention_layernorm.weight": t(hidden),
            p + "self_attn.q_proj.weight": t(hidden, hidden),
            p + "self_attn.k_proj.weight": t(128, hidden),
            p + "self_attn.v_proj.weight": t(128, hidden),
            p + "self_attn.o_proj.weight": t(hidden, hidden),
            p + "mlp.gate_proj.weight": t(ffn, hidden),
            p + "mlp.up_proj.weight": t(ffn, hidden),
            p + "mlp.down_proj.weight": t(hidden, ffn),
        }
        if i == 0:
            shard.update(
                {
                    "model.embed_tokens.weight": t(1024, hidden),
                    "lm_head.weight": t(1024, hidden),
                    "model.norm.weight": t(hidden),
                }
            )
        name = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        save_file(shard, str(d / name))
        weight_map.update({k: name for k in shard})
        del shard
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    size = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    model_slots(model_config_from_hf(get_architecture("llama"), config.to_dict()))  # warm megatron's imports
    to_megatron = _peak_anon_growth(lambda: hf_to_megatron(d, root / "big_mg", progress=False))
    to_hf = _peak_anon_growth(
        lambda: megatron_to_hf(root / "big_mg", root / "big_back", max_shard_bytes=8_000_000)
    )
    a, b = read_safetensors_dir(d), read_safetensors_dir(root / "big_back")
    return {
        "model_bytes": size,
        "to_megatron": to_megatron,
        "to_hf": to_hf,
        "bit_exact_bf16": sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a),
    }


def _world(root: str) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.runtime.layout import ParallelLayout

    init_runtime(ParallelLayout(), seed=0)
    root = Path(root)
    out = {"round_trip": {a: _round_trip(a, root / a) for a in ARCHS}}
    out["students"] = {
        "dense": _student_export(
            root / "dense",
            dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96),
        ),
        "moe": _student_export(
            root / "moe",
            dict(
                hidden_size=64,
                num_layers=2,
                num_attention_heads=4,
                qk_layernorm=True,
                tie_embeddings=False,
                num_experts=4,
                moe_topk=2,
                moe_ffn_hidden_size=32,
            ),
        ),
    }
    out["errors"] = _errors(root / "errors")
    out["dtype_cli"] = _dtype_and_cli(root / "dtype_cli")
    out["memory"] = _memory(root / "memory")
    return out


@functools.lru_cache(maxsize=1)
def world_results(root: str) -> dict:
    from megatron_opd.runtime.spawn import spawn_world

    return spawn_world(_world, 1, (root,), timeout_s=300)[0]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return world_results(str(tmp_path_factory.mktemp("convert_models")))


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_megatron_logits_match_transformers(results, arch):
    r = results["round_trip"][arch]
    assert r["max_logit_error"] <= 1e-4, r
    assert r["logit_scale"] > 0.1  # the comparison is not between near-zero outputs


def test_llama3_rope_scaling_frequencies(results):
    r = results["round_trip"]["llama"]
    assert (
        r["scaling_changes"] > 1e-6 and r["inv_freq_error"] <= 1e-9 * max(1.0, r["scaling_changes"]) + 1e-12
    ), r


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_megatron_hf_is_bit_exact(results, arch):
    r = results["round_trip"][arch]
    assert r["same_names"] and r["bit_exact"], r
    assert r["config_identical"] and r["tokenizer_copied"], r
    assert r["shards"] > 1  # the export was really sharded, with an index
    assert r["manifest_problems"] == [], r["manifest_problems"]


@pytest.mark.parametrize("arch", ARCHS)
def test_export_loads_in_transformers(results, arch):
    assert results["round_trip"][arch]["reloaded_error"] <= 1e-4


def test_student_exports_load_in_transformers(results):
    dense, moe = results["students"]["dense"], results["students"]["moe"]
    assert dense["architecture"] == "LlamaForCausalLM" and moe["architecture"] == "Qwen3MoeForCausalLM"
    assert dense["max_logit_error"] <= 1e-4 and moe["max_logit_error"] <= 1e-4, results["students"]
    assert dense["tokenizer"] == "char" and dense["eos_token_id"] == 2


def test_tensor_errors_name_the_tensor(results):
    e = results["errors"]
    k = "model.layers.1.self_attn.k_proj.weight"
    assert e["missing"].startswith("MissingTensors") and k in e["missing"]
    assert (
        e["unexpected"].startswith("UnexpectedTensors")
        and "model.layers.0.self_attn.extra.weight" in e["unexpected"]
    )
    assert (
        e["shape"].startswith("ShapeMismatch")
        and k in e["shape"]
        and "[16, 64]" in e["shape"]
        and "[32, 64]" in e["shape"]
    )
    assert e["yaml"].startswith("MissingTensors") and "q_layernorm" in e["yaml"]


def test_cli_and_dtype_casts(results):
    r = results["dtype_cli"]
    assert r["codes"] == [0, 0]
    assert r["bf16_then_fp32_exact"] and r["config_dtype"] == "float32"


def test_crosscheck_compares_every_tensor(results):
    r = results["dtype_cli"]
    assert r["crosscheck_same"] == 0.0 and r["crosscheck_keys"] > 10
    assert list(r["crosscheck_perturbed"]) == ["decoder.layers.1.mlp.experts.experts.linear_fc2.weight"]


def test_conversion_streams(results):
    m = results["memory"]
    assert m["bit_exact_bf16"]
    # Resident anonymous memory stays a small fraction of the model: weights are mapped from files.
    assert m["to_megatron"] < 0.25 * m["model_bytes"], m
    assert m["to_hf"] < 0.35 * m["model_bytes"], m
