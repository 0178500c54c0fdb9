"""Run one function on N local ranks as a torchrun-style world (tests, benchmarks, the local job).

Each rank is a fresh `spawn`ed process with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT set exactly as torchrun sets them, so the code under test initialises its process
groups through the same path as a real job. The parent enforces a deadline, kills the whole
world on the first failure, and re-raises with the failing rank's traceback.

A launcher that runs worlds (`megatron-opd train` with run.nproc > 1, `megatron-opd run`) wraps
its work in `forward_stop_signals()`: SIGTERM, SIGINT and SIGUSR1 to the launcher then reach every
rank of every world in flight as the ranks' stop signal (they save a checkpoint and return), each
world is given `stop_timeout_s` (OPD_STOP_TIMEOUT_S, default 300) to do so before it is killed,
no new world starts (`StopRequested`), and a second signal kills the ranks at once. Without it
the launcher would die of the signal and its ranks with it (they die with their parent), saving
nothing.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence


_LIVE: set = set()  # rank processes of every world in flight, for terminate_all()
DEFAULT_STOP_TIMEOUT_S = 300.0


@dataclass
class _Stop:
    signal: str | None = None  # the signal the launcher received
    at: float = 0.0  # time.monotonic() when it did


_STOP = _Stop()


class StopRequested(RuntimeError):
    """The launcher was asked to stop before this world started; it was not started."""


def terminate_all() -> None:
    """Kill every rank of every world this process started (e.g. on Ctrl-C in a launcher whose
    worlds run in other threads, which the interrupt does not reach)."""
    for p in list(_LIVE):
        if p.is_alive():
            p.kill()


def stop_requested() -> str | None:
    """The stop signal the launcher received inside `forward_stop_signals()`, if any."""
    return _STOP.signal


def _rank_stop_signal() -> signal.Signals:
    """What the ranks treat as "save and stop": SIGTERM unless OPD_STOP_SIGNALS leaves it out."""
    names = [s.strip() for s in os.environ.get("OPD_STOP_SIGNALS", "").split(",") if s.strip()]
    if not names or "SIGTERM" in names:
        return signal.SIGTERM
    return getattr(signal, names[0])


def _forward(procs) -> None:
    sig = _rank_stop_signal()
    for p in procs:
        if p.is_alive():
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass


def _say(text: str) -> None:
    os.write(2, f"[megatron-opd] {text}\n".encode())  # no print(): a handler may interrupt one


def _on_stop_signal(signum, frame) -> None:
    name = signal.Signals(signum).name
    if _STOP.signal is None:
        _STOP.signal, _STOP.at = name, time.monotonic()
        live = [p for p in list(_LIVE) if p.is_alive()]  # list(): one atomic copy
        _say(f"{name}: asking {len(live)} ranks to save a checkpoint and stop (again to kill them now)")
        _forward(live)
    else:
        _say(f"{name} again: killing the ranks")
        terminate_all()


@contextmanager
def forward_stop_signals(signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)) -> Iterator[None]:
    """Within this block, a stop signal to this process is forwarded to the ranks instead of
    ending it (see the module docstring). Only the main thread can install handlers; elsewhere
    this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in signals}
    for s in signals:
        signal.signal(s, _on_stop_signal)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _STOP.signal, _STOP.at = None, 0.0


def _stop_timeout_s() -> float:
    value = os.environ.get("OPD_STOP_TIMEOUT_S", "")
    try:
        return float(value) if value else DEFAULT_STOP_TIMEOUT_S
    except ValueError:
        raise ValueError(f"OPD_STOP_TIMEOUT_S={value!r} is not a number of seconds") from None


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
    stop_timeout_s: float | None = None,
) -> list[Any]:
    """Run `fn(*args)` on `world_size` ranks; return the per-rank return values, rank order.

    `fn` must be importable by name (a module-level function) and its return value picklable.
    After a stop signal forwarded by `forward_stop_signals`, the ranks get `stop_timeout_s`
    (default: OPD_STOP_TIMEOUT_S or 300 s) to return before they are killed.
    """
    if not 1 <= world_size <= 16:
        raise ValueError(f"world_size must be between 1 and 16, got {world_size}")
    if _STOP.signal:
        raise StopRequested(f"not started: the launcher received {_STOP.signal}")
    stop_timeout_s = _stop_timeout_s() if stop_timeout_s is None else stop_timeout_s
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
        _LIVE.add(p)
    if _STOP.signal:  # it came while the ranks were starting: they were not in _LIVE yet
        _forward(procs)
    deadline = time.monotonic() + timeout_s
    values: dict[int, Any] = {}
    failure: str | None = None
    try:
        while len(values) < world_size and failure is None:
            now = time.monotonic()
            if _STOP.signal and now > _STOP.at + stop_timeout_s:
                failure = (
                    f"stopped by {_STOP.signal}: ranks {sorted(set(range(world_size)) - set(values))} did not "
                    f"save and return within {stop_timeout_s:.0f} s (OPD_STOP_TIMEOUT_S) and were killed; a "
                    f"rerun resumes from the newest complete checkpoint"
                )
                break
            remaining = deadline - now
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
            _LIVE.discard(p)
        results.close()
    if failure is not None:
        raise WorldFailed(failure)
    return [values[r] for r in range(world_size)]
