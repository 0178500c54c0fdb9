"""This rank's weights of a model, read from its model directory without collectives, and bound
to (or released from) a model whose parameters live on the meta device.

    structure = build_gpt_model(cfg, layout, on_device="meta")      # no memory
    plan = weight_plan(structure, skip=("output_layer.",))           # what this rank reads, once
    tensors = read_weights(plan, model_dir.latest_checkpoint())      # host tensors, any thread
    bind_weights(structure, to_device(tensors))                      # the model now runs
    release_weights(structure)                                       # back on meta: memory freed

Why not `runtime.checkpoint.load_checkpoint`: megatron's load is collective (it plans with every
rank of the world), so it cannot run on a background thread while the training loop runs its own
collectives, and it loads into allocated parameters. Here the plan comes from megatron's own
`sharded_state_dict()` of the model under the job's layout (key, global offset and extent of every
shard this rank holds; SwiGLU's split fc1 through megatron's factory merge), and the regions are
read with torch.distributed.checkpoint in a single process (`models/hf/megatron_io.read_regions`,
no_dist), so any rank reads its own shards on its own, under any TP/PP/EP layout, whatever layout
the checkpoint was saved with. Vocabulary rows follow megatron's `allow_shape_mismatch`: rows past
the stored (differently padded) vocabulary are zero, as they are padding.

`read_weights` (megatron dist checkpoints) is the one place a model directory's weights are read
for a model built by `models/gpt.py`; Hugging Face model directories (models/hf/load.py,
`rank_state_dict`) give the same {parameter name: this rank's tensor}.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

# A validation read (`check_readable`) holds at most about this much at once.
CHECK_BUDGET_BYTES = 8 << 20


@dataclass(frozen=True)
class Piece:
    """One stored shard to read: `extent` elements of checkpoint tensor `key` from `offsets`
    (global, prepended axes included) into a destination of `local_shape`."""

    key: str
    offsets: tuple[int, ...]
    local_shape: tuple[int, ...]
    prepend: int  # leading axes of size 1 (megatron stacks layers under one key)
    allow_shape_mismatch: bool  # vocabulary rows: the stored padding may differ


@dataclass
class ParamPlan:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    # A plain shard: one piece read straight into the parameter's buffer. A factory (SwiGLU's
    # fc1 under TP): the structure it builds, a Piece per ShardedTensor, and its merge function.
    # No tensor is kept: the plan must not hold references to the (meta) parameters it describes.
    piece: Piece | None = None
    pieces: Any = None
    merge: Any = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class WeightPlan:
    params: dict[str, ParamPlan] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.params.values())


def _piece(st) -> Piece:
    if st.flattened_range is not None:
        raise ValueError(f"internal: {st.key} is a flattened shard (optimizer state), not a model parameter")
    return Piece(st.key, tuple(st.global_offset), tuple(st.local_shape), st.prepend_axis_num, st.allow_shape_mismatch)


def weight_plan(model: torch.nn.Module, *, skip: Sequence[str] = ()) -> WeightPlan:
    """What this rank reads for every parameter of `model` (parameters may be on meta), from
    megatron's own sharded state dict under the current parallel layout. Names starting with one
    of `skip` are left out (an in-job teacher's output layer: the loss applies its own head)."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace, nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    sharded = model.sharded_state_dict()
    plan = WeightPlan()
    for name, param in model.named_parameters():
        if any(name.startswith(s) for s in skip):
            continue
        entry = sharded.get(name)
        p = ParamPlan(name, tuple(param.shape), param.dtype)
        if isinstance(entry, ShardedTensor):
            if tuple(entry.local_shape) != p.shape:
                raise ValueError(f"internal: {name} has shape {p.shape}, its shard {tuple(entry.local_shape)}")
            p.piece = _piece(entry)
        elif isinstance(entry, ShardedTensorFactory):
            built = entry.build()
            for st in nested_values(built):
                if not isinstance(st, ShardedTensor):
                    raise ValueError(f"internal: {name}'s factory builds a {type(st).__name__}")
            p.pieces, p.merge = dict_list_map_outplace(_piece, built), entry.merge_fn
        else:
            raise ValueError(f"internal: {name} has no shard in the model's sharded state dict ({type(entry).__name__})")
        plan.params[name] = p
    return plan


def _regions(piece: Piece, dest: torch.Tensor, stored: dict[str, Any]) -> list:
    """The region(s) that fill `dest` (of piece.local_shape) from the checkpoint; rows past a
    differently padded stored vocabulary are zeroed instead (never tokens)."""
    from megatron_opd.models.hf.megatron_io import Region

    view = dest.view((1,) * piece.prepend + piece.local_shape)
    if piece.allow_shape_mismatch and piece.key in stored:
        size = stored[piece.key].shape
        for dim, (o, n) in enumerate(zip(piece.offsets, view.shape)):
            keep = max(0, min(n, size[dim] - o))
            if keep < n:
                view.narrow(dim, keep, n - keep).zero_()
                view = view.narrow(dim, 0, keep)
        if view.numel() == 0:
            return []
    return [Region(piece.key, piece.offsets, view)]


def read_weights(
    plan: WeightPlan,
    checkpoint: str | Path,
    *,
    names: Sequence[str] | None = None,
    pin_memory: bool = False,
) -> dict[str, torch.Tensor]:
    """{parameter name: this rank's tensor} for `plan` (or its `names`) from a torch_dist
    checkpoint, on the host (pinned when asked: the source of asynchronous copies to a GPU). No
    collectives: safe on a background thread. A damaged file is `CorruptCheckpoint` naming it; a
    missing tensor `MissingTensors`; another shape `ShapeMismatch` (models/hf/errors.py)."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace

    from megatron_opd.models.hf.megatron_io import read_regions, stored_tensors

    checkpoint = Path(checkpoint)
    stored = stored_tensors(checkpoint)
    wanted = [plan.params[n] for n in (names if names is not None else plan.params)]
    out: dict[str, torch.Tensor] = {}
    regions = []
    pending: list[tuple[ParamPlan, Any]] = []
    for p in wanted:
        buffer = torch.empty(p.shape, dtype=p.dtype, pin_memory=pin_memory)
        if p.piece is not None:
            regions += _regions(p.piece, buffer, stored)
            out[p.name] = buffer
            continue

        def dest(piece: Piece, p=p) -> torch.Tensor:
            t = torch.empty(piece.local_shape, dtype=p.dtype)
            regions.extend(_regions(piece, t, stored))
            return t

        pending.append((p, dict_list_map_outplace(dest, p.pieces)))
        out[p.name] = buffer
    read_regions(checkpoint, regions)
    for p, loaded in pending:
        out[p.name].copy_(p.merge(loaded))
    return out


def check_readable(plan: WeightPlan, checkpoint: str | Path, budget_bytes: int = CHECK_BUDGET_BYTES) -> None:
    """Read every byte of this rank's shards once, about `budget_bytes` at a time, and drop them:
    a missing, truncated or garbled file fails here (same errors as `read_weights`) instead of at
    the first step that needs the model."""
    batch: list[str] = []
    used = 0
    for name, p in plan.params.items():
        if batch and used + p.nbytes > budget_bytes:
            read_weights(plan, checkpoint, names=batch)
            batch, used = [], 0
        batch.append(name)
        used += p.nbytes
    if batch:
        read_weights(plan, checkpoint, names=batch)


def bind_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Make `tensors` the data of `model`'s parameters of those names (no copy: the tensors become
    the parameters, on their device). The parameter objects, and megatron's attributes on them,
    stay what they were, so the modules keep working."""
    for name, t in tensors.items():
        param = model.get_parameter(name)
        if tuple(t.shape) != tuple(param.shape) or t.dtype != param.dtype:
            raise ValueError(f"{name}: binding a {t.dtype} tensor of shape {tuple(t.shape)} to a {param.dtype} parameter of {tuple(param.shape)}")
        new = torch.nn.Parameter(t, requires_grad=False)
        new.__dict__.update(param.__dict__)  # swap_tensors swaps the Python attributes too
        torch.utils.swap_tensors(param, new)


def release_weights(model: torch.nn.Module, names: Sequence[str]) -> None:
    """Put those parameters back on the meta device: their memory is freed once no one else holds it."""
    for name in names:
        param = model.get_parameter(name)
        if param.device.type == "meta":
            continue
        empty = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"), requires_grad=False)
        empty.__dict__.update(param.__dict__)
        torch.utils.swap_tensors(param, empty)


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of `model`'s parameters that hold memory (not on meta)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")


@functools.lru_cache(maxsize=1)
def _libc_malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def return_freed_host_memory() -> None:
    """Give freed host memory back to the operating system (glibc's `malloc_trim`; a no-op
    elsewhere). glibc raises its mmap threshold each time a large block is freed, so later
    weight buffers come from its heap, and freed heap memory stays in the process: without this,
    a process that swaps teachers in and out grows to about the sum of every teacher it held."""
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)
