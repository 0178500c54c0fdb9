"""Export a megatron model (a trained student or teacher) to Hugging Face format: SGLang, transformers, release.

`megatron_to_hf` is what the runtime calls (the SGLang rollout engine's disk sync with
rollout.weight_format=hf) and what `python -m checkpoints_tools.export` runs. It writes
HF_DIR/config.json, model-0000i-of-0000N.safetensors, model.safetensors.index.json, the
tokenizer files and manifest.json (sha256 per file).

- Architecture: --arch, else the model_type of the original config.json kept by an HF import
  (MODEL_DIR/hf/), else the one that expresses model.yaml exactly (MLA: deepseek_v3; MoE:
  qwen3_moe; q/k norm: qwen3; QKV bias: qwen2; else llama). A model the architecture cannot
  express is an error naming the field.
- config.json: the original one when the model came from HF and model.yaml still describes its
  architecture (training-side keys such as max_seq_len may differ), so an import/export round trip
  is bit-exact, config included; else generated.
- Tokenizer: the HF tokenizer files kept by the import (or by a run that started from an HF
  directory: <run_dir>/hf/), else the tokenizer files in the model directory; for our own tiny
  models, their character tokenizer.json (not loadable by transformers' AutoTokenizer: serve such a model
  with SGLang's --skip-tokenizer-init and token ids).
- Streaming: one safetensors shard (--max-shard-size) is in memory at a time; each is read
  from the dist checkpoint region by region, straight into the HF tensors.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# A model directory's tokenizer files that a release carries (a model without an hf/ directory:
# our character tokenizer.json, or the files a Hugging Face tokenizer saved there).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
)


def torch_dtype(name: str | None):
    """The torch dtype of a --dtype name (None: keep the stored dtype)."""
    import torch

    return None if name is None else getattr(torch, DTYPE_NAMES[name])


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _token_ids(model_dir: Path | None) -> dict[str, int]:
    """bos/eos/pad ids of our character tokenizer, for a generated config.json."""
    if model_dir is None or not (model_dir / "tokenizer.json").is_file():
        return {}
    try:
        from megatron_opd.data.tokenizer import load_tokenizer

        tok = load_tokenizer(model_dir)
    except (ValueError, KeyError):
        return {}
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def megatron_to_hf(
    input_path: str | Path,
    output_dir: str | Path,
    *,
    arch: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 10**9,
    model_config: str | Path | None = None,
    overwrite: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a Hugging Face model directory from a megatron model/checkpoint directory; returns it.

    `on_progress(tensors written, tensors in all)` is called after each safetensors shard.
    """
    import torch

    from megatron_opd.models.hf.architectures import (
        architecture_of_hf_config,
        get_architecture,
        infer_architecture,
    )
    from megatron_opd.models.hf.hf_dir import plan_shards, write_shards
    from megatron_opd.models.hf.manifest import write_manifest
    from megatron_opd.models.hf.mapping import bind
    from megatron_opd.models.hf.megatron_io import (
        init_single_process,
        model_slots,
        open_megatron,
        resolve_keys,
        stored_tensors,
    )
    from megatron_opd.models.hf.output import claim_output

    model = open_megatron(input_path, model_config)
    output = claim_output(output_dir, [input_path, *model.read_paths], overwrite)
    model.check_manifest()
    cfg, side = model.cfg, model.hf_side_dir
    original = (
        json.loads((side / "config.json").read_text()) if side and (side / "config.json").is_file() else None
    )
    if arch:
        architecture = get_architecture(arch)
    elif original is not None:
        architecture = architecture_of_hf_config(original)
    else:
        architecture = infer_architecture(cfg)

    init_single_process()
    slots = resolve_keys(cfg, model_slots(cfg), stored_tensors(model.step_dir), model.step_dir)
    bindings = bind(architecture.name, architecture.rules, {n: s.shape for n, s in slots.items()}, cfg)
    bindings.sort(key=lambda b: _natural(b.hf_names[0]))
    want = torch_dtype(dtype)

    def out_dtype(b):
        return want or slots[b.megatron_name].dtype

    def nbytes(shape, dt):
        return torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()

    by_name = {n: b for b in bindings for n in b.hf_names}
    sizes = [(b.megatron_name, sum(nbytes(s, out_dtype(b)) for s in b.hf_shapes)) for b in bindings]
    groups = plan_shards(sizes, max_shard_bytes)
    by_megatron = {b.megatron_name: b for b in bindings}
    shards = [[n for m in group for n in by_megatron[m].hf_names] for group in groups]

    # The dtype most weights are stored in (fp32 router biases beside bf16 weights are normal).
    stored = max(
        {s.dtype for s in slots.values()}, key=lambda d: sum(s.nbytes for s in slots.values() if s.dtype == d)
    )
    dtype_name = DTYPE_NAMES[dtype] if dtype else str(stored).replace("torch.", "")
    config = _hf_config(architecture, cfg, original, dtype_name, dtype is not None, model, side)

    written = 0

    def advance(n: int) -> None:
        nonlocal written
        written += n
        if on_progress is not None:
            on_progress(written, len(by_name))

    with output.writing() as out:
        write_shards(out, shards, _shard_loader(slots, by_name, out_dtype, model.step_dir), on_shard=advance)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if side is not None:
            for f in side.iterdir():
                if f.is_file() and f.name != "config.json":
                    shutil.copy2(f, out / f.name)
        elif model.model_dir is not None:  # a model of ours: the tokenizer files it was saved with
            for name in TOKENIZER_FILES:
                if (model.model_dir / name).is_file():
                    shutil.copy2(model.model_dir / name, out / name)
        write_manifest(
            out,
            "checkpoints_tools.export",
            {
                "input": str(model.step_dir.resolve()),
                "architecture": architecture.name,
                "dtype": dtype or "as stored",
            },
        )
    return output.path


def _hf_config(architecture, cfg, original, dtype_name, cast, model, side) -> dict:
    """The original config.json when model.yaml still matches it (bit-exact round trips), else generated."""
    from megatron_opd.models.hf.architectures import hf_config_from_model, model_config_from_hf
    from megatron_opd.models.hf.config_json import architecture_differences

    if original is not None and architecture.name == original.get("model_type"):
        # A job may train the model at a shorter context, another padding or init scale
        # (TRAINING_FIELDS): the weights are still the original architecture's.
        if not architecture_differences(cfg, model_config_from_hf(architecture, original)):
            config = dict(original)
            # The dtype the weights are stored in now (a bf16 model trained in fp32 is fp32).
            if cast or config.get("torch_dtype", config.get("dtype")) != dtype_name:
                config["torch_dtype"] = dtype_name
                config.pop("dtype", None)
            return config
        warnings.warn(f"{side / 'config.json'} no longer matches model.yaml; writing a generated config.json")
    return hf_config_from_model(
        architecture, cfg, torch_dtype=dtype_name, token_ids=_token_ids(model.model_dir)
    )


def _shard_loader(slots, by_name, out_dtype, step_dir):
    """load_shard(names) -> {name: tensor}: read each binding's blocks straight into its HF tensors."""
    import torch

    from megatron_opd.models.hf.megatron_io import block_region, read_regions

    def load_shard(names: list[str]) -> dict[str, torch.Tensor]:
        tensors, regions = {}, []
        for b in dict.fromkeys(by_name[n] for n in names):  # each binding once, in order
            slot = slots[b.megatron_name]
            hf = [torch.empty(s, dtype=slot.dtype) for s in b.hf_shapes]
            regions += [block_region(slot, row, hf[blk.src][blk.start : blk.stop]) for row, blk in b.row_blocks()]
            tensors[b] = hf
        read_regions(step_dir, regions)
        return {n: t.to(out_dtype(b)) for b, hf in tensors.items() for n, t in zip(b.hf_names, hf)}

    return load_shard
