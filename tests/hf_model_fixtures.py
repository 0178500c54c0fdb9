"""Tiny Hugging Face model directories made locally with transformers, and what the HF-path tests
do with them: job YAMLs whose `model:` describes config.json, the `megatron-opd` CLI, and the
megatron model's own logits from any model directory (megatron or HF) for comparisons.

    d = tiny_hf_dir(tmp / "qwen2", "qwen2", vocab_size=tok.vocab_size)   # config.json + safetensors
    tok.save(d)                                                           # its tokenizer beside it
    write_job(tmp / "sft.yaml", stage="sft", init_from=d, ...)           # model: from config.json
    cli("train", tmp / "sft.yaml")
    megatron_logits(run_dir, tokens)                                      # [B, T, V] float32
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def tiny_hf_model(arch: str, *, vocab_size: int, seed: int = 0, layers: int = 4, **special_ids: int):
    """A tiny random transformers model (fp32, eager attention) with non-trivial norms and biases.

    llama: tied embeddings; qwen2: untied with QKV bias; qwen3_moe: 4 experts, a dense first layer."""
    import transformers as T

    torch.manual_seed(seed)
    base = dict(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128, **special_ids,
    )  # fmt: skip
    if arch == "qwen2":
        model = T.Qwen2ForCausalLM(T.Qwen2Config(**base, tie_word_embeddings=False, rope_theta=50000.0))
    elif arch == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(**base, tie_word_embeddings=True))
    elif arch == "qwen3_moe":
        model = T.Qwen3MoeForCausalLM(
            T.Qwen3MoeConfig(
                **base, moe_intermediate_size=32, head_dim=16, num_experts=4, num_experts_per_tok=2,
                norm_topk_prob=True, mlp_only_layers=[0],
            )
        )  # fmt: skip
    else:
        raise ValueError(arch)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # ones would hide a missing or misplaced norm
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model.eval()


def tiny_hf_dir(directory: Path, arch: str, *, tokenizer, seed: int = 0, layers: int = 4) -> Path:
    """`tiny_hf_model` saved with `tokenizer`'s files and special ids: a model directory that
    both transformers and megatron-opd load."""
    ids = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    if tokenizer.bos_id is not None:
        ids["bos_token_id"] = tokenizer.bos_id
    model = tiny_hf_model(arch, vocab_size=tokenizer.vocab_size, seed=seed, layers=layers, **ids)
    model.save_pretrained(directory)
    tokenizer.save(directory)
    return Path(directory)


def model_keys(hf_dir: Path, **training: Any) -> dict[str, Any]:
    """The `model:` section that describes `hf_dir`'s config.json, with training-side keys."""
    import dataclasses

    from megatron_opd.models.hf.config_json import hf_model_config, model_section

    cfg = dataclasses.replace(hf_model_config(hf_dir), **training)
    return yaml.safe_load(model_section(cfg))["model"]


def write_job(path: Path, tree: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`megatron-opd ARGS` as a user runs it (this checkout first on the path)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("MEGATRON_OPD_FAULT", None)
    return subprocess.run(
        [sys.executable, "-m", "megatron_opd.cli", *map(str, args)],
        cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _logits_world(model_dir: str, tokens: list[list[int]]) -> torch.Tensor:
    from megatron_opd.models.gpt import build_gpt_model
    from megatron_opd.models.model_dir import load_model_dir_weights, read_model_dir
    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.runtime.layout import ParallelLayout

    layout = init_runtime(ParallelLayout(), seed=0)
    mdir = read_model_dir(model_dir)
    net = build_gpt_model(mdir.model, layout).eval()
    load_model_dir_weights(mdir, [net])
    ids = torch.tensor(tokens)
    with torch.no_grad():
        return net(ids, torch.arange(ids.shape[1]).expand_as(ids), None)[..., : mdir.model.vocab_size].float()


def megatron_logits(model_dir: Path, tokens: list[list[int]]) -> torch.Tensor:
    """The logits of the megatron model a model directory holds (its newest checkpoint, or an HF
    directory converted in memory), computed in a world of one rank."""
    from megatron_opd.runtime.spawn import spawn_world

    return spawn_world(_logits_world, 1, (str(model_dir), tokens), timeout_s=300)[0]


def transformers_logits(hf_dir: Path, tokens: list[list[int]]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float()


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
