"""Process groups and megatron parallel state, from torchrun's or SLURM's environment.

`init_runtime(layout, seed)` is the single entry into a parallel job: it reads who this process
is (torchrun variables, else SLURM's, else a world of one), picks the backend (CUDA + NCCL with
a GPU, CPU + gloo through `cpu_compat` without), initialises `torch.distributed` and megatron's
`parallel_state`, and seeds every RNG the way megatron expects.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import numpy as np
import torch
import torch.distributed as dist

from megatron_opd.runtime.layout import ParallelLayout


class LaunchEnvError(RuntimeError):
    """The process environment does not say who this rank is; the message names the variable."""


@dataclass(frozen=True)
class ProcessEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


def _require_int(env: Mapping[str, str], name: str, source: str) -> int:
    if name not in env:
        raise LaunchEnvError(f"{source} launch detected but {name} is not set in the environment")
    try:
        return int(env[name])
    except ValueError:
        raise LaunchEnvError(f"{name}={env[name]!r} is not an integer") from None


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a SLURM host list such as 'gpu[001-003,007],login1' into host names."""
    hosts: list[str] = []
    for prefix, ranges, _ in re.findall(r"([^,\[]+)(?:\[([^\]]+)\])?(,|$)", hostlist):
        if not ranges:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            width = len(lo)
            hosts.extend(f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1))
    return hosts


def process_env(env: Mapping[str, str] | None = None) -> ProcessEnv:
    """Who this process is: torchrun's variables first, then SLURM's, else a world of one."""
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        source = "torchrun"
        rank = _require_int(env, "RANK", source)
        world = _require_int(env, "WORLD_SIZE", source)
        local = int(env.get("LOCAL_RANK", rank))
        addr = env.get("MASTER_ADDR")
        if addr is None:
            raise LaunchEnvError("torchrun launch detected but MASTER_ADDR is not set in the environment")
        port = _require_int(env, "MASTER_PORT", source)
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        source = "slurm"
        rank = _require_int(env, "SLURM_PROCID", source)
        world = _require_int(env, "SLURM_NTASKS", source)
        local = _require_int(env, "SLURM_LOCALID", source)
        addr = env.get("MASTER_ADDR")
        if addr is None:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
            if not nodelist:
                raise LaunchEnvError(
                    "SLURM launch detected but neither MASTER_ADDR nor SLURM_JOB_NODELIST is set"
                )
            addr = expand_hostlist(nodelist)[0]
        if "MASTER_PORT" in env:
            port = _require_int(env, "MASTER_PORT", source)
        else:
            # Every task of the job must agree on the port without talking: derive it from the job.
            port = 20000 + _require_int(env, "SLURM_JOB_ID", source) % 20000
    else:
        return ProcessEnv(0, 1, 0, "127.0.0.1", 0, "single")
    if not 0 <= rank < world:
        raise LaunchEnvError(f"rank {rank} is outside the world of {world} ranks")
    return ProcessEnv(rank, world, local, addr, port, source)


def use_cuda() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda() else torch.device("cpu")


def init_process_group(timeout_minutes: int = 10) -> ProcessEnv:
    """Initialise torch.distributed (idempotent) and return this process's identity."""
    penv = process_env()
    if not use_cuda():
        from megatron_opd.runtime import cpu_compat

        cpu_compat.enable()
        # Ranks on one machine share its cores; oversubscribed BLAS threads slow every rank down.
        # OMP_NUM_THREADS, when set (torchrun sets it), is the operator's choice and wins.
        if "OMP_NUM_THREADS" not in os.environ:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    else:
        from megatron_opd.runtime.cpu_compat import without_transformer_engine

        without_transformer_engine()
    if dist.is_initialized():
        return penv
    if use_cuda():
        torch.cuda.set_device(penv.local_rank % torch.cuda.device_count())
    port = penv.master_port
    if penv.source == "single":
        from megatron_opd.runtime.spawn import free_port

        port = free_port()
    dist.init_process_group(
        # With a GPU, CUDA tensors go over NCCL and the small CPU bookkeeping tensors (sample
        # ledger, evaluation counts, stop flags) over gloo, through the same groups.
        backend="cpu:gloo,cuda:nccl" if use_cuda() else "gloo",
        init_method=f"tcp://{penv.master_addr}:{port}",
        rank=penv.rank,
        world_size=penv.world_size,
        timeout=timedelta(minutes=timeout_minutes),
    )
    return penv


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, then megatron's model-parallel RNG tracker.

    Megatron derives per-TP-rank and per-EP-rank streams from `seed` inside its tracker; the
    default stream is the same on every rank, so replicas initialise identically.
    """
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def init_runtime(layout: ParallelLayout, seed: int, *, timeout_minutes: int = 10) -> ParallelLayout:
    """Initialise process groups and megatron parallel state for `layout`; return it resolved."""
    from megatron.core import parallel_state

    penv = init_process_group(timeout_minutes)
    resolved = layout.resolve(penv.world_size)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=resolved.tp,
        pipeline_model_parallel_size=resolved.pp,
        context_parallel_size=resolved.cp,
        expert_model_parallel_size=resolved.ep,
        distributed_timeout_minutes=timeout_minutes,
    )
    seed_everything(seed)
    return resolved


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def standalone_group(
    backend: str, master_address: str, master_port: int, rank: int, world_size: int, timeout_s: float = 300.0
) -> dist.ProcessGroup:
    """A process group outside torch.distributed's default world (TCP rendezvous on
    master_address:master_port, rank 0 hosting the store): what SGLang's
    `/init_weights_update_group` builds to join a trainer and rollout servers that belong to
    different jobs' worlds. Collectives run on the returned object (`broadcast_from`)."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0, timeout=timeout)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, world_size)
    raise ValueError(f"weight-update group backend {backend!r}: use nccl (GPUs) or gloo (CPU)")


def broadcast_from(group: dist.ProcessGroup, tensor: torch.Tensor, root: int = 0) -> None:
    """Broadcast `tensor` in place from `root` over a `standalone_group`."""
    options = dist.BroadcastOptions()
    options.rootRank = root
    group.broadcast([tensor], options).wait()


def replica_group_and_src() -> tuple[dist.ProcessGroup, int]:
    """This data-parallel replica's ranks (TP x PP x CP, megatron's model-parallel group) and its
    first rank: the one that talks to servers and owns the replica's host-side state."""
    from megatron.core import parallel_state

    group = parallel_state.get_model_parallel_group()
    return group, min(dist.get_process_group_ranks(group))


def broadcast_object(obj, src: int, group: dist.ProcessGroup):
    """`obj` of rank `src`, on every rank of `group`."""
    holder = [obj if dist.get_rank() == src else None]
    if dist.get_world_size(group) > 1:
        dist.broadcast_object_list(holder, src=src, group=group)
    return holder[0]


def first_error(error: str | None) -> str | None:
    """Collective: the first rank's error message, if any rank has one, on every rank, so that
    all ranks raise together instead of the others hanging in their next collective."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def on_replica_source(compute, src: int, group: dist.ProcessGroup):
    """`compute()` run on rank `src` only (servers, verifiers, judges), its result on every rank of
    `group`. If it raises, `src` raises its error and the group's other ranks a RuntimeError with
    its message, instead of waiting for a result that never comes."""
    result, error = None, None
    if dist.get_rank() == src:
        try:
            result = ("ok", compute())
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
            result = ("error", f"{type(e).__name__}: {e}")
    status, value = broadcast_object(result, src, group)
    if error is not None:
        raise error
    if status == "error":
        raise RuntimeError(f"rank {src} failed: {value}")
    return value
