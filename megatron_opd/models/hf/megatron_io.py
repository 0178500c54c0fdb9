"""The megatron side: where each parameter lives in a torch_dist checkpoint; reading and writing by region.

A torch_dist checkpoint stores *global* tensors under sharding-independent keys: megatron's
sharded state dict maps each rank's shard to (key, offset) in the global tensor, and reshards
on load. What a tool must know is therefore, for every parameter (named as in the model's TP=1
state_dict), its `Slot`: the checkpoint key, its index on any prepended axes (megatron stacks
identical layers under one key `decoder.layers.<param>` with a leading layer axis, and experts
under `...experts.experts.<param>` with a leading expert axis), and its shape. We do not guess
these: `model_slots` builds the model on the meta device (no memory) and reads megatron's own
`sharded_state_dict()`.

Writing hands megatron's `dist_checkpointing.save` (through runtime.checkpoint.save_checkpoint,
so COMPLETE, common state and RNG are exactly what `load_checkpoint` expects) ShardedTensors
whose data are file-backed (hf_dir.mapped_tensor, checkpoints_tools/staging.py): HF pieces placed
directly, one per grid cell.
Reading uses torch.distributed.checkpoint with a planner that copies arbitrary regions of
any key straight into caller-provided tensors, in a single process (megatron's own load
requires every cell of a tensor's grid to be requested in a world of one).

Two namings of a few norm weights exist in checkpoints: the local spec's and Transformer
Engine's, which fuses norms into the following linear layer (see `te_key`). Reading accepts
either; writing uses the one asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from megatron_opd.models.config import ModelConfig
from megatron_opd.models.hf.config_json import HF_SIDE_DIR  # noqa: F401 - re-exported (tools import it here)
from megatron_opd.models.hf.errors import (
    CheckpointError,
    CorruptCheckpoint,
    MissingTensors,
    ShapeMismatch,
    UnexpectedTensors,
    name_list,
)
from megatron_opd.runtime.layout import ParallelLayout

VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass(frozen=True)
class Slot:
    name: str  # TP=1 local-spec state_dict name
    key: str  # checkpoint key
    prepend: tuple[tuple[int, int], ...]  # (index, size) on each prepended (stacked) axis
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def global_shape(self) -> tuple[int, ...]:
        return tuple(size for _, size in self.prepend) + self.shape

    def offsets(self, row: int = 0) -> tuple[int, ...]:
        return tuple(i for i, _ in self.prepend) + (row,) + (0,) * (len(self.shape) - 1)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def init_single_process() -> None:
    """A world of one gloo process with megatron's parallel state at TP=PP=EP=1 (idempotent)."""
    from megatron.core import parallel_state

    from megatron_opd.runtime.distributed import init_runtime

    if not parallel_state.model_parallel_is_initialized():
        init_runtime(ParallelLayout(), seed=0)


# ---------------------------------------------------------------------------------------------
# Slots from megatron's own sharded state dict


def _layer_index(name: str) -> int | None:
    m = re.match(r"decoder\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def layer_is_moe(cfg: ModelConfig, layer: int) -> bool:
    return cfg.is_moe and (not cfg.moe_layer_freq or bool(cfg.moe_layer_freq[layer]))


def te_key(cfg: ModelConfig, slot: Slot) -> str:
    """The checkpoint key Transformer Engine's layer spec uses for this parameter.

    Local and TE specs agree on all keys but the norms TE fuses into the next linear layer:
    the pre-attention norm (non-MLA), the pre-MLP norm (dense layers only: MoE layers keep a
    separate norm) and MLA's q/kv norms. The local spec writes `mlp.linear_fc1.layer_norm_weight`
    for every non-MLA layer, MoE included, and never fuses MLA's norms.
    """
    m = re.match(r"^(decoder\.layers\.(?:\d+\.)?)(.*)$", slot.key)
    layer = _layer_index(slot.name)
    if m is None or layer is None:
        return slot.key
    prefix, rest = m.groups()
    suffix = slot.name[len(f"decoder.layers.{layer}.") :]
    mla = cfg.multi_latent_attention
    te_suffix = {
        "input_layernorm.weight": (
            "input_layernorm.weight" if mla else "self_attention.linear_qkv.layer_norm_weight"
        ),
        "pre_mlp_layernorm.weight": (
            "pre_mlp_layernorm.weight" if layer_is_moe(cfg, layer) else "mlp.linear_fc1.layer_norm_weight"
        ),
    }
    if mla:
        te_suffix["self_attention.q_layernorm.weight"] = "self_attention.linear_q_up_proj.layer_norm_weight"
        te_suffix["self_attention.kv_layernorm.weight"] = "self_attention.linear_kv_up_proj.layer_norm_weight"
    return prefix + te_suffix.get(suffix, rest)


@dataclass(frozen=True)
class Structure:
    """What a model's checkpoint holds: its parameters' slots and megatron's per-module extra-state
    objects (None for local layers, but `load_checkpoint` requires them to be present)."""

    slots: dict[str, Slot]
    objects: tuple


def tensor_shards(obj) -> list | None:
    """The ShardedTensors one entry of megatron's sharded state dict stands for (a factory such as
    SwiGLU's fc1 builds several), or None when the entry is not tensor data."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(obj, ShardedTensorFactory):
        built = obj.build()
        return list(built.values()) if isinstance(built, dict) else list(built)
    if isinstance(obj, ShardedTensor):
        return [obj]
    return None


def model_structure(cfg: ModelConfig, *, vocab_tp: int = 1, naming: str = "local") -> Structure:
    """Every parameter of the model and where it lives in a checkpoint (megatron built on meta).

    `vocab_tp`: the TP size whose vocabulary padding the embedding and output layer get.
    `naming`: "local" or "te" (see `te_key`).
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_opd.models.gpt import build_gpt_model

    if naming not in ("local", "te"):
        raise CheckpointError(f"unknown checkpoint naming {naming!r}; choose local or te")
    init_single_process()
    padded = dataclasses.replace(
        cfg, make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by * vocab_tp
    )
    with torch.device("meta"):
        model = build_gpt_model(padded, ParallelLayout(), on_device="meta", use_transformer_engine=False)
    params = model.state_dict()
    slots: dict[str, Slot] = {}
    objects = []
    for name, obj in model.sharded_state_dict().items():
        if isinstance(obj, ShardedObject):
            objects.append(obj)
            continue
        shards = tensor_shards(obj)
        if shards is None:
            raise CheckpointError(
                f"internal: unexpected {type(obj).__name__} for {name} in megatron's sharded state dict"
            )
        first = shards[0]
        p = first.prepend_axis_num
        prepend = tuple((first.global_offset[i], first.global_shape[i]) for i in range(p))
        shape = tuple(params[name].shape)
        if tuple(first.global_shape[p:]) != shape:
            raise CheckpointError(
                f"internal: {name} has global shape {first.global_shape} at TP=1, param {shape}"
            )
        slot = Slot(name, first.key, prepend, shape, params[name].dtype)
        slots[name] = dataclasses.replace(slot, key=te_key(cfg, slot)) if naming == "te" else slot
    return Structure(slots, tuple(objects))


def model_slots(cfg: ModelConfig, *, vocab_tp: int = 1, naming: str = "local") -> dict[str, Slot]:
    return model_structure(cfg, vocab_tp=vocab_tp, naming=naming).slots


# ---------------------------------------------------------------------------------------------
# Checkpoint metadata and region reads

# How a tool's user falls back from a corrupt checkpoint (runtime.checkpoint.Corruption.describe).
TOOL_FALLBACK = "pass it as --input, or delete {step_dir}"


@contextlib.contextmanager
def naming_corruption(step_dir: Path) -> Iterator[None]:
    """A failed read of the checkpoint becomes CorruptCheckpoint naming the damaged file and the
    checkpoint to fall back to; other errors (the files are fine) pass through unchanged."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    from megatron_opd.runtime.checkpoint import find_corruption

    try:
        yield
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:
        corruption = find_corruption(step_dir)
        if corruption is None:
            raise
        raise CorruptCheckpoint(corruption.describe(TOOL_FALLBACK)) from e


@dataclass(frozen=True)
class StoredTensor:
    shape: tuple[int, ...]
    dtype: torch.dtype


def stored_tensors(step_dir: Path) -> dict[str, StoredTensor]:
    """Every tensor key in a torch_dist checkpoint with its global shape and dtype (metadata only)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not (step_dir / ".metadata").is_file():
        raise CheckpointError(f"{step_dir} is not a torch_dist checkpoint (.metadata is missing)")
    with naming_corruption(step_dir):
        md = _reader(step_dir).read_metadata()  # parsed once, shared with read_regions
    return {
        k: StoredTensor(tuple(v.size), v.properties.dtype)
        for k, v in md.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }


_OPTIMIZER_KEY = re.compile(r"(chained_\d+\.)?optimizer")


def is_model_key(key: str) -> bool:
    """Model weights, as opposed to optimizer state and TE/extra state. A MoE model's optimizer
    is megatron's ChainedOptimizer (dense and expert parameters): its keys are chained_<i>.optimizer.*."""
    return not _OPTIMIZER_KEY.match(key) and "_extra_state" not in key and key != "rng_state"


@dataclass(frozen=True)
class Region:
    """Copy the block of checkpoint tensor `key` starting at `offsets` (global) into `dest`.

    `dest` has the global tensor's number of dims; its shape is the block's extent.
    """

    key: str
    offsets: tuple[int, ...]
    dest: torch.Tensor


_METADATA_CACHE: dict[tuple[str, float], Any] = {}


def _reader(step_dir: Path):
    """A FileSystemReader that parses .metadata once per checkpoint (it can be large; tools read often)."""
    from torch.distributed.checkpoint import FileSystemReader

    global _CachedReader
    if _CachedReader is None:

        class CachedReader(FileSystemReader):
            def read_metadata(self, *args, **kwargs):
                path = Path(self.path)
                key = (str(path.resolve()), (path / ".metadata").stat().st_mtime)
                if key not in _METADATA_CACHE:
                    if len(_METADATA_CACHE) >= 16:  # a merge reads a handful of checkpoints in turn
                        _METADATA_CACHE.pop(next(iter(_METADATA_CACHE)))
                    _METADATA_CACHE[key] = super().read_metadata(*args, **kwargs)
                return _METADATA_CACHE[key]

        _CachedReader = CachedReader
    return _CachedReader(str(step_dir))


_CachedReader = None
_RegionPlanner = None


def _region_planner_class():
    """DCP LoadPlanner that reads Regions (defined once: classes made per call live in reference
    cycles, and would keep the regions' tensors alive until the cyclic GC runs)."""
    global _RegionPlanner
    if _RegionPlanner is not None:
        return _RegionPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
    from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class RegionPlanner(LoadPlanner):
        def __init__(self, step_dir: Path, regions: Sequence[Region]):
            self.step_dir, self.regions = step_dir, regions

        def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
            self.metadata = metadata

        def create_local_plan(self):
            items = []
            for i, r in enumerate(self.regions):
                md = self.metadata.state_dict_metadata.get(r.key)
                if md is None:
                    raise MissingTensors(f"{self.step_dir} has no tensor {r.key}")
                if len(r.offsets) != len(md.size) or any(
                    o + n > s for o, n, s in zip(r.offsets, r.dest.shape, md.size)
                ):
                    raise ShapeMismatch(
                        f"{self.step_dir}: tensor {r.key} has shape {list(md.size)}; cannot read a block of "
                        f"{list(r.dest.shape)} at {list(r.offsets)}"
                    )
                chunk = ChunkStorageMetadata(offsets=torch.Size(r.offsets), sizes=r.dest.shape)
                for item in create_read_items_for_chunk_list(r.key, md, [chunk]):
                    # dest_index names the region, so that several regions of one key stay apart.
                    items.append(
                        dataclasses.replace(item, dest_index=MetadataIndex(str(i), item.dest_index.offset))
                    )
            return LoadPlan(items)

        def create_global_plan(self, global_plan):
            return global_plan

        def finish_plan(self, central_plan):
            return central_plan

        def load_bytes(self, read_item, value):
            raise CheckpointError("internal: region reads request tensors only")

        def resolve_tensor(self, read_item):
            dest = self.regions[int(read_item.dest_index.fqn)].dest
            for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                dest = dest.narrow(dim, start, length)
            return dest

        def commit_tensor(self, read_item, tensor):
            pass

    _RegionPlanner = RegionPlanner
    return RegionPlanner


def read_regions(step_dir: Path, regions: Sequence[Region]) -> None:
    """Fill every region's `dest` from the checkpoint, reading only the stored chunks it overlaps."""
    from torch.distributed.checkpoint import load as dcp_load

    if regions:
        planner = _region_planner_class()(step_dir, regions)
        with naming_corruption(step_dir):
            dcp_load({}, storage_reader=_reader(step_dir), planner=planner, no_dist=True)


def read_slot(
    step_dir: Path, slot: Slot, rows: int | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The first `rows` rows (default: all) of one parameter, as a tensor of the slot's dtype."""
    rows = slot.shape[0] if rows is None else rows
    shape = (rows, *slot.shape[1:])
    out = torch.empty(shape, dtype=slot.dtype) if out is None else out
    read_regions(step_dir, [Region(slot.key, slot.offsets(0), out.view((1,) * len(slot.prepend) + shape))])
    return out


def row_batches(slots: dict[str, Slot], budget_bytes: int) -> list[list[tuple[str, int, int]]]:
    """(name, first row, rows) blocks of at most ~budget_bytes, grouped into batches of about that size.

    Tools read one batch per checkpoint at a time: memory stays bounded whatever the tensor sizes.
    """
    blocks = []
    for name, slot in slots.items():
        row_bytes = max(1, slot.nbytes // max(1, slot.shape[0]))
        step = max(1, budget_bytes // row_bytes)
        blocks += [(name, r, min(step, slot.shape[0] - r), row_bytes) for r in range(0, slot.shape[0], step)]
    batches, used = [[]], 0
    for name, r, rows, row_bytes in blocks:
        if batches[-1] and used + rows * row_bytes > budget_bytes:
            batches.append([])
            used = 0
        batches[-1].append((name, r, rows))
        used += rows * row_bytes
    return [b for b in batches if b]


def block_region(slot: Slot, row: int, dest: torch.Tensor) -> Region:
    """The region that reads rows [row, row + len(dest)) of a parameter into `dest`."""
    return Region(slot.key, slot.offsets(row), dest.view((1,) * len(slot.prepend) + tuple(dest.shape)))


def resolve_keys(
    cfg: ModelConfig, slots: dict[str, Slot], stored: dict[str, StoredTensor], where: Path
) -> dict[str, Slot]:
    """Point every slot at the key its checkpoint really uses (local or TE naming) and check shapes.

    Errors name the missing megatron tensors, the checkpoint's unexpected ones, and shape mismatches
    (vocabulary rows may differ: padding depends on the TP size the checkpoint was written for).
    """
    resolved: dict[str, Slot] = {}
    missing, mismatched = [], []
    for name, slot in slots.items():
        candidates = [slot.key, te_key(cfg, slot)]
        key = next((k for k in candidates if k in stored), None)
        if key is None:
            missing.append(name if name == slot.key else f"{name} (key {slot.key})")
            continue
        s = stored[key]
        want = slot.global_shape
        if (
            name in VOCAB_PARAMS
            and len(s.shape) == 2
            and s.shape[1] == want[1]
            and s.shape[0] >= cfg.vocab_size
        ):
            slot = dataclasses.replace(slot, shape=s.shape)
        elif s.shape != want:
            mismatched.append(
                f"{name} (key {key}): checkpoint {list(s.shape)}, model.yaml gives {list(want)}"
            )
            continue
        resolved[name] = dataclasses.replace(slot, key=key, dtype=s.dtype)
    if missing:
        raise MissingTensors(
            f"{where} lacks tensors the model in model.yaml has: {name_list(missing)} "
            f"(is model.yaml the config this checkpoint was trained with?)"
        )
    if mismatched:
        raise ShapeMismatch(f"{where}: shape mismatch for " + "; ".join(mismatched[:12]))
    used = {s.key for s in resolved.values()}
    extra = [k for k in stored if is_model_key(k) and k not in used]
    if extra:
        raise UnexpectedTensors(
            f"{where} holds tensors the model in model.yaml does not have: {name_list(extra)}"
        )
    return resolved


# ---------------------------------------------------------------------------------------------
# Writing


def sharded_pieces(slot: Slot, pieces: Sequence[torch.Tensor]) -> list:
    """ShardedTensors for a parameter given as equal row pieces (a regular grid along dim 0)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    n, p = len(pieces), len(slot.prepend)
    axes = [(axis, index, size) for axis, (index, size) in enumerate(slot.prepend)]
    out = []
    for i, piece in enumerate(pieces):
        grid = axes + ([(p, i, n)] if n > 1 else [])
        out.append(ShardedTensor.from_rank_offsets(slot.key, piece, *grid, replica_id=0, prepend_axis_num=p))
    return out


class ShardedSource:
    """Stands in for a model chunk in runtime.checkpoint.save_checkpoint: it only has to say what to save."""

    def __init__(self, sharded_tensors: Sequence):
        self._state = {f"{t.key}#{i}": t for i, t in enumerate(sharded_tensors)}

    def sharded_state_dict(self) -> dict[str, Any]:
        return self._state


def write_checkpoint(
    root: Path, step: int, sharded_tensors: Sequence, objects: Sequence = (), common: dict | None = None
) -> Path:
    """Save a complete checkpoint <root>/step_<step>/ that runtime.checkpoint.load_checkpoint loads.

    `objects`: the model's extra-state ShardedObjects (Structure.objects), saved as they are.
    """
    from megatron_opd.runtime.checkpoint import save_checkpoint

    init_single_process()
    return save_checkpoint(root, step, [ShardedSource([*sharded_tensors, *objects])], common=common)


# ---------------------------------------------------------------------------------------------
# Model directories (megatron_opd.models.model_dir): model.yaml + checkpoints/step_* (+ hf/)



@dataclass(frozen=True)
class MegatronModel:
    step_dir: Path
    model_dir: Path | None
    cfg: ModelConfig
    model_yaml: Path

    @property
    def hf_side_dir(self) -> Path | None:
        d = self.model_dir / HF_SIDE_DIR if self.model_dir else None
        return d if d is not None and d.is_dir() else None

    @property
    def read_paths(self) -> list[Path]:
        """Everything a tool reads of this model (an output must not overlap any of it)."""
        paths = [self.step_dir, self.model_yaml]
        if self.model_dir is not None:
            paths += [self.model_dir / "tokenizer.json", self.model_dir / HF_SIDE_DIR]
        return paths

    def check_manifest(self) -> None:
        """The files read that the model directory's manifest.json lists must match it."""
        from megatron_opd.models.hf.manifest import check_manifest

        if self.model_dir is not None:
            check_manifest(self.model_dir, scope=self.read_paths)


def read_model_yaml(path: Path) -> ModelConfig:
    from megatron_opd.config import load_config

    return load_config(path, cls=ModelConfig)


def write_model_yaml(directory: Path, cfg: ModelConfig) -> Path:
    import yaml

    from megatron_opd.config import to_dict

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def open_megatron(path: str | Path, model_config: str | Path | None = None) -> MegatronModel:
    """A model directory (its newest complete checkpoint) or one step_* directory, with its ModelConfig."""
    from megatron_opd.runtime.checkpoint import COMPLETE, latest_complete

    path = Path(path)
    if (path / "model.yaml").is_file():
        model_dir, step_dir = path, latest_complete(path / "checkpoints")
        if step_dir is None:
            raise CheckpointError(
                f"{path} is a model directory without a complete checkpoint under checkpoints/"
            )
    elif (path / ".metadata").is_file():
        step_dir = path
        if not (path / COMPLETE).is_file():
            raise CheckpointError(
                f"{path} is an incomplete checkpoint (no {COMPLETE} marker): its save did not finish"
            )
        model_dir = path.parent.parent if (path.parent.parent / "model.yaml").is_file() else None
    else:
        raise CheckpointError(
            f"{path} is neither a model directory (model.yaml + checkpoints/) nor a checkpoint directory (step_*)"
        )
    yaml_path = Path(model_config) if model_config else (model_dir / "model.yaml" if model_dir else None)
    if yaml_path is None:
        raise CheckpointError(f"{path}: no model.yaml found next to the checkpoint; pass --model-config")
    return MegatronModel(step_dir, model_dir, read_model_yaml(yaml_path), yaml_path)
