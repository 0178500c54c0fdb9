"""Checkpoints in megatron's dist_checkpointing (torch_dist) format, with resume.

A checkpoint is a directory `<root>/step_<NNNNNNNN>/` holding the model's sharded state, the
optimizer's (`dp_reshardable`, which also loads under another TP/PP/DP layout), and one common
state dict (step, scheduler, data cursors, whatever the stage adds). Every rank's RNG states are
saved as a sharded object per (pp, tp, dp) rank, restored when the layout is the same and
skipped with a warning otherwise.

Completion is explicit: the last act of a save is an atomic rename that writes
`<dir>/COMPLETE` after every rank has finished, and `latest_complete` only ever returns
directories that carry it, so an interrupted save is never mistaken for a checkpoint.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import warnings
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

    return dict(dist_checkpointing.load_common_state_dict(str(path))["common"])


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
        tmp.write_text(f"{step}\n")
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
    chunks = [_unwrap(c) for c in model_chunks]
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
