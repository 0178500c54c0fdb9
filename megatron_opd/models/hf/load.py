"""A Hugging Face model directory (config.json + safetensors) as megatron weights, in memory.

    hf = open_hf_model(HF_DIR)                      # config.json -> ModelConfig; tensors mapped, not read
    model = build_gpt_model(hf.cfg, layout)         # under the job's layout: TP, PP, EP
    missing, unexpected = model.load_state_dict(
        rank_state_dict(hf, model), strict=False)   # missing: _extra_state only

`rank_state_dict` goes through the same tables as the file conversion (architectures.py,
mapping.py): for each parameter of `model` (this rank's pipeline stage, its experts, its TP
shard) it names the parameter as in the TP=PP=EP=1 model (its layer's global number, its
experts' global indices, the embedding for the output layer a tied model keeps on its last
stage), assembles that full tensor from the memory-mapped HF tensors (live.assemble) and keeps
this rank's part (full_weights.tp_shard, the inverse of the gather the weight sync uses). One full
tensor is alive at a time, so memory is the rank's shard plus the largest parameter.
`check_hf_tensors` is the check both paths make: every tensor the model needs is there with its
shape, and nothing unexplained is left over (under PP or EP, over the union of every rank's
needs: the call is then collective).

`hf_weights_id` is the identity of an HF directory's weights that a teacher server reports and
the teacher pool compares (the output layer a hidden-signal teacher's states are multiplied by);
`output_layer_rows` reads that layer's rows for models/heads.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_opd.models.config import ModelConfig
from megatron_opd.models.hf.architectures import (
    Architecture,
    architecture_of_hf_config,
    get_architecture,
    model_config_from_hf,
)
from megatron_opd.models.hf.errors import MissingTensors, ShapeMismatch, UnexpectedTensors, name_list
from megatron_opd.models.hf.hf_dir import HFCheckpoint
from megatron_opd.models.hf.mapping import Binding, bind


@dataclass(frozen=True)
class HFModel:
    checkpoint: HFCheckpoint  # the directory, its config.json and its (mapped) tensors
    architecture: Architecture
    cfg: ModelConfig  # translated from config.json

    @property
    def path(self) -> Path:
        return self.checkpoint.path


def open_hf_model(
    directory: str | Path, *, arch: str | None = None, make_vocab_size_divisible_by: int = 128
) -> HFModel:
    """Read config.json and the safetensors headers. `arch` overrides config.json's model_type."""
    checkpoint = HFCheckpoint(directory)
    architecture = get_architecture(arch) if arch else architecture_of_hf_config(checkpoint.config)
    cfg = model_config_from_hf(architecture, checkpoint.config)
    cfg = dataclasses.replace(cfg, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    return HFModel(checkpoint, architecture, cfg)


def check_hf_tensors(
    hf: HFCheckpoint,
    bindings: list[Binding],
    arch: Architecture,
    cfg: ModelConfig,
    *,
    required_by_all: set[str] | None = None,
) -> None:
    """Every HF tensor the model needs is there with the right shape, and nothing else is.

    `bindings` are those of the part of the model being loaded; `required_by_all`, the HF names
    that all parts together need, when `bindings` cover only one part (a pipeline stage, an
    expert-parallel rank's experts). Unexpected tensors are judged against the whole."""
    required = {n: s for b in bindings for n, s in zip(b.hf_names, b.hf_shapes)}
    everything = set(required) if required_by_all is None else required_by_all
    present = set(hf.names())
    missing = sorted(set(required) - present)
    if missing:
        raise MissingTensors(
            f"{hf.path} lacks tensors that a {arch.name} model with this config.json has: {name_list(missing)}"
        )
    skipped = {n for n in present - everything if any(re.fullmatch(p, n) for p in arch.ignore)}
    if cfg.tie_embeddings and "lm_head.weight" in present:
        skipped.add("lm_head.weight")  # tied: the embedding is the output layer
    extra_layers = {
        n
        for n in present - everything
        if (m := re.match(r"model\.layers\.(\d+)\.", n)) and int(m.group(1)) >= cfg.num_layers
    }
    if extra_layers and hf.config.get("num_nextn_predict_layers"):
        warnings.warn(
            f"skipping {len(extra_layers)} tensors of the multi-token-prediction layers "
            f"(model.layers.{cfg.num_layers}+): the megatron model is built without MTP"
        )
        skipped |= extra_layers
    unexpected = sorted(present - everything - skipped)
    if unexpected:
        hint = ""
        if any(n.endswith("weight_scale_inv") for n in unexpected):
            hint = " (FP8 block-quantized weights: dequantize the checkpoint to bf16 first)"
        raise UnexpectedTensors(
            f"{hf.path} has tensors a {arch.name} model with this config.json does not: {name_list(unexpected)}{hint}"
        )
    wrong = [
        f"{n}: file has {list(hf.info(n).shape)}, the megatron model needs {list(s)}"
        for n, s in required.items()
        if tuple(hf.info(n).shape) != tuple(s)
    ]
    if wrong:
        raise ShapeMismatch(f"{hf.path}: shape mismatch for " + "; ".join(wrong[:12]))


# Transformer Engine's layer spec fuses some norms into the next linear layer; its parameters
# are then named after that layer (the same correspondence as megatron_io.te_key, for
# parameter names rather than checkpoint keys). The tables are written for the local spec's names.
_TE_PARAM_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "self_attention.linear_q_up_proj.layer_norm_weight": "self_attention.q_layernorm.weight",
    "self_attention.linear_kv_up_proj.layer_norm_weight": "self_attention.kv_layernorm.weight",
}
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.*)")
_EXPERT = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.(.*)")


def global_names(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, str]:
    """{this rank's parameter name: its name in the TP=PP=EP=1 model with the local spec}.

    Layers are numbered per pipeline stage (each layer knows its global `layer_number`), experts
    per expert-parallel rank (each MoE layer knows its `local_expert_indices`); a tied model's
    last stage holds its own copy of the embedding as `output_layer.weight`."""
    names = [n for n, _ in model.named_parameters()]
    layers = model.decoder.layers if any(_LAYER.match(n) for n in names) else None
    has_embedding = "embedding.word_embeddings.weight" in names
    out = {}
    for name in names:
        m = _LAYER.fullmatch(name)
        if m:
            layer = layers[int(m.group(1))]
            rest = _TE_PARAM_NAMES.get(m.group(2), m.group(2))
            e = _EXPERT.fullmatch(rest)
            if e:
                rest = f"mlp.experts.local_experts.{layer.mlp.local_expert_indices[int(e.group(1))]}.{e.group(2)}"
            out[name] = f"decoder.layers.{layer.layer_number - 1}.{rest}"
        elif name == "output_layer.weight" and cfg.tie_embeddings and not has_embedding:
            out[name] = "embedding.word_embeddings.weight"
        else:
            out[name] = name
    return out


def _full_shape(param: torch.nn.Parameter, tp_size: int) -> tuple[int, ...]:
    shape = list(param.shape)
    if tp_size > 1 and getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return tuple(shape)


def _split_world() -> bool:
    """Whether this rank holds only part of the layers or experts (then loading is collective)."""
    from megatron.core import parallel_state

    return parallel_state.model_parallel_is_initialized() and (
        parallel_state.get_pipeline_model_parallel_world_size() > 1
        or parallel_state.get_expert_model_parallel_world_size() > 1
    )


def rank_state_dict(
    hf: HFModel, model: torch.nn.Module, *, tp_rank: int | None = None, tp_size: int | None = None
) -> dict[str, torch.Tensor]:
    """{parameter name: tensor of this rank's shape} for `model` (this rank's pipeline stage and
    experts), built from `hf.cfg` on TP rank `tp_rank` of `tp_size` (default: megatron's parallel
    state; TP=1 without one), in the HF files' dtype (load_state_dict casts).

    Collective over the world when parallel.pp or parallel.ep > 1 (every rank's needs are
    gathered to judge unexpected tensors). Errors name what does not fit: HF tensors missing,
    unexpected or of another shape, and megatron parameters the architecture has no rule for.
    """
    from megatron.core import parallel_state

    from megatron_opd.models.full_weights import tp_shard
    from megatron_opd.models.hf.live import assemble

    if tp_size is None:
        initialized = parallel_state.model_parallel_is_initialized()
        tp_size = parallel_state.get_tensor_model_parallel_world_size() if initialized else 1
        tp_rank = parallel_state.get_tensor_model_parallel_rank() if initialized else 0
    if tp_rank is None or not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} is not a rank of tp_size {tp_size}")
    params = dict(model.named_parameters())
    rename = global_names(model, hf.cfg)
    arch, files = hf.architecture, hf.checkpoint
    shapes = {rename[n]: _full_shape(p, tp_size) for n, p in params.items()}
    bindings = {b.megatron_name: b for b in bind(arch.name, arch.rules, shapes, hf.cfg)}
    required_by_all = None
    if _split_world():
        import torch.distributed as dist

        mine = sorted({h for b in bindings.values() for h in b.hf_names})
        every: list[list[str]] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(every, mine)
        required_by_all = {h for part in every for h in part}
    check_hf_tensors(files, list(bindings.values()), arch, hf.cfg, required_by_all=required_by_all)
    out = {}
    for name, param in params.items():
        b = bindings[rename[name]]
        full = assemble(b, [files.tensor(n) for n in b.hf_names])
        part = tp_shard(b.megatron_name, param, full, tp_rank, tp_size)
        out[name] = part if part is full else part.clone()  # a view would keep `full` alive
    return out


def output_layer_name(cfg: ModelConfig) -> str:
    """The HF tensor that turns final hidden states into logits."""
    return "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"


def output_layer_rows(hf: HFModel, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of the output layer ([vocab, hidden], memory-mapped); rows past the
    real vocabulary are cut off (the caller pads)."""
    name = output_layer_name(hf.cfg)
    if name not in hf.checkpoint:
        raise MissingTensors(f"{hf.path} lacks {name}, the output layer of this {hf.architecture.name} model")
    rows = hf.checkpoint.info(name).shape[0]
    return hf.checkpoint.rows(name, min(start, rows), min(stop, rows))


def hf_weights_id(hf: HFModel) -> str:
    """An id of the model's output layer and config: equal for two directories iff both hold the
    same config.json and output-layer bytes (copies of one model share it; two experts trained
    from one base do not, unless their output layers are the same tensor, which is then correct
    to apply to either's hidden states)."""
    import mmap

    digest = hashlib.sha256((hf.path / "config.json").read_bytes())
    info = hf.checkpoint.info(output_layer_name(hf.cfg))
    with open(info.file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        step = 1 << 26
        for at in range(info.offset, info.offset + info.nbytes, step):
            digest.update(mm[at : min(at + step, info.offset + info.nbytes)])
    return "hf-" + digest.hexdigest()[:32]
