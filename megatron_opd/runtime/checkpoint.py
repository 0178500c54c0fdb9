"""Checkpoints in megatron's dist_checkpointing (torch_dist) format, with resume.

A checkpoint is a directory `<root>/step_<NNNNNNNN>/` holding the model's sharded state, the
optimizer's (`dp_reshardable`, which also loads under another TP/PP/DP layout), and one common
state dict (step, scheduler, data cursors, whatever the stage adds). Every rank's RNG states are
saved as a sharded object per (pp, tp, dp) rank, restored when the layout is the same and
skipped with a warning otherwise.

Completion is explicit: the last act of a save is an atomic rename that writes
`<dir>/COMPLETE` after every rank has finished, and `latest_complete` only ever returns
directories that carry it, so an interrupted save is never mistaken for a checkpoint. The marker
is JSON `{"step": N, "id": "<uuid4 hex>"}`: `checkpoint_id` names one save uniquely, so a
server and a trainer can prove they hold the same weights (the teacher pool checks a
hidden-signal teacher's head this way). Markers of older saves hold just "N\n" and have no id.

A load that fails on a damaged file (truncated, garbled, missing) raises CorruptCheckpointError
naming the file and the newest earlier complete checkpoint to fall back to. The files are only
examined after a load has failed (`find_corruption`), so an intact load costs nothing extra.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

_STEP_DIR = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"
# Megatron's distributed optimizer must use this format on CPU and for cross-layout loads
# ('fully_sharded_model_space' fails on gloo; see docs/architecture.md).
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable", "chained_optim_avoid_prefix": True}


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def latest_complete(root: str | os.PathLike) -> Path | None:
    """The newest checkpoint directory under `root` whose save finished, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).is_file()]
    return max(done, key=lambda p: p.name, default=None)


def checkpoint_step(path: str | os.PathLike) -> int:
    match = _STEP_DIR.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint directory (expected step_NNNNNNNN)")
    return int(match.group(1))


def read_common_state(path: str | os.PathLike) -> dict[str, Any]:
    """The common state a complete checkpoint was saved with (step, layout, what the trainer added),
    read without a process group or a model."""
    from megatron.core import dist_checkpointing

    try:
        return dict(dist_checkpointing.load_common_state_dict(str(path))["common"])
    except Exception as e:
        corruption = find_corruption(path)
        if corruption is None:
            raise
        raise CorruptCheckpointError(corruption.describe(RESUME_FALLBACK)) from e


def checkpoint_id(path: str | os.PathLike) -> str | None:
    """The unique id of the complete checkpoint at `path` (None for a marker written before ids)."""
    marker = Path(path) / COMPLETE
    try:
        text = marker.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)") from None
    try:
        value = json.loads(text)
    except ValueError:
        raise ValueError(f"{marker} is neither a step number nor JSON: {text[:80]!r}") from None
    return str(value["id"]) if isinstance(value, dict) and value.get("id") else None


def previous_complete(path: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint beside `path` with an earlier step, or None."""
    path = Path(path)
    if not _STEP_DIR.match(path.name) or not path.parent.is_dir():
        return None
    root, step = path.parent, checkpoint_step(path)
    done = [
        p
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and int(m.group(1)) < step and (p / COMPLETE).is_file()
    ]
    return max(done, key=lambda p: p.name, default=None)


class CorruptCheckpointError(RuntimeError):
    """A file of a checkpoint is missing, truncated or unreadable; the message names it and what to
    fall back to."""


@dataclass(frozen=True)
class Corruption:
    step_dir: Path
    file: Path
    reason: str
    fallback: Path | None  # the newest complete checkpoint before step_dir

    def describe(self, fall_back_how: str) -> str:
        """`fall_back_how` says how the caller's user switches to the fallback, e.g. 'pass it as
        --input'; it is formatted with {fallback} and {step_dir}."""
        head = f"{self.file} is corrupt ({self.reason})"
        if self.fallback is None:
            return (
                f"{head}; there is no earlier complete checkpoint under {self.step_dir.parent}: "
                f"restore the file from a copy, or delete {self.step_dir} and start over"
            )
        how = fall_back_how.format(fallback=self.fallback, step_dir=self.step_dir)
        return f"{head}; fall back to {self.fallback}: {how}"


# How a training job falls back (the tools say it their way).
RESUME_FALLBACK = "delete {step_dir} (resume then starts from it), or start from its weights with train.init_from={fallback}"


def find_corruption(path: str | os.PathLike) -> Corruption | None:
    """The first file of a checkpoint that is missing, truncated or unreadable, or None if every file
    reads. Meant for after a failed load: it reads the whole checkpoint once."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    path = Path(path)

    def corrupt(file: Path, reason: str) -> Corruption:
        return Corruption(path, file, reason, previous_complete(path))

    marker = path / "metadata.json"
    try:
        json.loads(marker.read_text())
    except FileNotFoundError:
        return corrupt(marker, "missing")
    except (ValueError, UnicodeDecodeError) as e:
        return corrupt(marker, f"not valid JSON: {e}")
    try:
        dist_checkpointing.load_common_state_dict(str(path))
    except Exception as e:  # noqa: BLE001 - whatever the unpickler raises on damaged bytes
        return corrupt(path / "common.pt", f"unreadable: {type(e).__name__}: {e}")
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001
        return corrupt(path / ".metadata", f"unreadable: {type(e).__name__}: {e}")
    by_file: dict[str, list] = {}
    for index, info in metadata.storage_data.items():
        by_file.setdefault(info.relative_path, []).append((index, info))
    for name, items in sorted(by_file.items()):  # sizes first: cheap, and the usual damage
        file = path / name
        if not file.is_file():
            return corrupt(file, "missing")
        size, needed = file.stat().st_size, max(info.offset + info.length for _, info in items)
        if size < needed:
            return corrupt(file, f"truncated: {size} bytes on disk, the checkpoint's index needs {needed}")
    for name, items in sorted(by_file.items()):
        with open(path / name, "rb") as f:
            for index, info in sorted(items, key=lambda item: item[1].offset):
                stored = metadata.state_dict_metadata.get(index.fqn)
                if isinstance(stored, BytesStorageMetadata) or getattr(info, "transform_descriptors", None):
                    continue  # pickled objects and transformed streams: their size was checked above
                f.seek(info.offset)
                try:
                    torch.load(io.BytesIO(f.read(info.length)), map_location="cpu", weights_only=True)
                except Exception as e:  # noqa: BLE001
                    return corrupt(
                        path / name, f"tensor {index.fqn} at byte {info.offset} unreadable: {type(e).__name__}: {e}"
                    )
    return None


def _rng_state_object():
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    pp, tp = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()
    dp = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    return ShardedObject("rng_state", state, _layout_shape(), (pp, tp, dp), replica_id=0)


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(model_chunks, optimizer, is_loading: bool, with_rng: bool) -> dict[str, Any]:
    if len(model_chunks) == 1:
        model_sd = model_chunks[0].sharded_state_dict()
    else:
        model_sd = {}
        for i, chunk in enumerate(model_chunks):
            model_sd.update({f"model{i}." + k: v for k, v in chunk.sharded_state_dict().items()})
    state: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=dict(_OPTIMIZER_METADATA)
        )
    if with_rng:
        state["rng_state"] = _rng_state_object()
    return state


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model_chunks: Sequence[torch.nn.Module],
    optimizer=None,
    *,
    common: dict[str, Any] | None = None,
    keep_last: int = 0,
) -> Path:
    """Save a complete checkpoint for `step` (collective: every rank calls it). Returns its dir.

    `common` is small picklable state saved once (scheduler, cursors, step counters).
    `keep_last` > 0 removes older complete checkpoints after this one is complete.
    """
    from megatron.core import dist_checkpointing

    path = step_dir(root, step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        if path.exists():
            shutil.rmtree(path)  # a stale, incomplete save of the same step
        path.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    state = _sharded_state([_unwrap(c) for c in model_chunks], optimizer, False, True)
    state["common"] = dict(common or {}, step=step, layout=_layout_shape())
    dist_checkpointing.save(state, str(path))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        tmp = path / (COMPLETE + ".tmp")
        tmp.write_text(json.dumps({"step": step, "id": uuid.uuid4().hex}) + "\n")
        os.replace(tmp, path / COMPLETE)
        if keep_last > 0:
            done = sorted(p for p in Path(root).iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).exists())
            for old in done[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return path


def load_checkpoint(
    path: str | os.PathLike,
    model_chunks: Sequence[torch.nn.Module],
    optimizer=None,
    *,
    load_rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint into this rank's model shards (any TP/PP layout) and optimizer.

    Returns the common state dict. RNG states are restored when the checkpoint was written by
    the same parallel layout, and skipped (with a warning) otherwise.
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(
            f"{path} is not a complete checkpoint (no {COMPLETE} marker); "
            f"pass a directory returned by latest_complete() or written by save_checkpoint()"
        )
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    chunks = [_unwrap(c) for c in model_chunks]
    try:
        saved_layout = tuple(dist_checkpointing.load_common_state_dict(str(path))["common"]["layout"])
        want_rng = load_rng and saved_layout == _layout_shape()
        if load_rng and not want_rng:
            warnings.warn(
                f"{path} was saved under (pp, tp, dp) = {saved_layout}, this run is {_layout_shape()}; "
                f"RNG states are not restored"
            )
        state = _sharded_state(chunks, optimizer, True, want_rng)
        state["common"] = None  # loaded from the common file
        loaded = dist_checkpointing.load(state, str(path))
    except (Exception, CheckpointException) as e:
        corruption = find_corruption(path)  # None: the files are fine and the error is another one
        if corruption is None:
            raise
        raise CorruptCheckpointError(corruption.describe(RESUME_FALLBACK)) from e
    if len(chunks) == 1:
        chunks[0].load_state_dict(loaded["model"])
    else:
        for i, chunk in enumerate(chunks):
            prefix = f"model{i}."
            chunk.load_state_dict({k[len(prefix):]: v for k, v in loaded["model"].items() if k.startswith(prefix)})
    if optimizer is not None:
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
    if want_rng:
        _set_rng_state(loaded["rng_state"])
    return dict(loaded["common"])


def _layout_shape() -> tuple[int, int, int]:
    from megatron.core import parallel_state

    return (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(with_context_parallel=True),
    )
