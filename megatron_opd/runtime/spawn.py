"""Run one function on N local ranks as a torchrun-style world (tests, benchmarks, the local job).

Each rank is a fresh `spawn`ed process with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT set exactly as torchrun sets them, so the code under test initialises its process
groups through the same path as a real job. The parent enforces a deadline, kills the whole
world on the first failure, and re-raises with the failing rank's traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import time
import traceback
from typing import Any, Callable, Sequence


class WorldFailed(RuntimeError):
    """A rank raised, died or the world ran past its deadline; the message holds the traceback."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _rank_main(fn, rank, world_size, port, args, env, results):
    # Each rank leads its own process group, so the harness can also reap what a rank started
    # (checkpoint writers, multiprocessing managers) when the rank dies without cleaning up; and
    # dies with its parent, which no longer shares a terminal process group with it.
    os.setpgrp()
    _die_with_parent()
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        # Plain pickle copies tensor storage; multiprocessing's own reducer would share it through
        # file descriptors that die with this process.
        value = pickle.dumps(fn(*args))
        results.put((rank, "ok", value))
    except BaseException:  # noqa: BLE001 - reported to the parent verbatim
        results.put((rank, "error", traceback.format_exc()))
    finally:
        _destroy_process_group()


def _die_with_parent() -> None:
    """Linux prctl(PR_SET_PDEATHSIG, SIGKILL); elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


def _destroy_process_group() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort at exit
        pass


def _other_failures(procs, results, values, first: str, grace_s: float = 2.0) -> str:
    """What the other ranks did in the moments after the first failure (a rank that died hard is
    often the cause of another rank's connection error, which may be reported first)."""
    notes = []
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p.is_alive() for p in procs):
        try:
            rank, status, value = results.get(timeout=0.2)
        except queue.Empty:
            continue
        if status == "error" and f"rank {rank} failed" not in first:
            notes.append(f"rank {rank} also failed:\n{value}")
    for rank, p in enumerate(procs):
        if not p.is_alive() and p.exitcode not in (0, None) and rank not in values:
            notes.append(f"rank {rank} exited with exit code {p.exitcode}")
    return "".join("\n" + n for n in notes)


def spawn_world(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    timeout_s: float = 180.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run `fn(*args)` on `world_size` ranks; return the per-rank return values, rank order.

    `fn` must be importable by name (a module-level function) and its return value picklable.
    """
    if not 1 <= world_size <= 16:
        raise ValueError(f"world_size must be between 1 and 16, got {world_size}")
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, rank, world_size, port, tuple(args), dict(env or {}), results),
            name=f"rank{rank}",
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    values: dict[int, Any] = {}
    failure: str | None = None
    try:
        while len(values) < world_size and failure is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                failure = (
                    f"world of {world_size} ranks ran past its {timeout_s:.0f} s deadline; "
                    f"ranks still running: {sorted(set(range(world_size)) - set(values))}"
                )
                break
            try:
                rank, status, value = results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                if dead:
                    p = dead[0]
                    # A rank that died hard may still have a report in flight.
                    try:
                        rank, status, value = results.get(timeout=1.0)
                    except queue.Empty:
                        failure = f"{p.name} died with exit code {p.exitcode} and no traceback"
                        break
                else:
                    continue
            if status == "ok":
                values[rank] = pickle.loads(value)
            else:
                failure = f"rank {rank} failed:\n{value}"
    finally:
        if failure is not None:
            failure += _other_failures(procs, results, values, failure)
            for p in procs:
                if p.is_alive():
                    p.kill()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        results.close()
    if failure is not None:
        raise WorldFailed(failure)
    return [values[r] for r in range(world_size)]
