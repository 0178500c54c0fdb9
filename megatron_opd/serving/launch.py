"""Start our servers (and the real sglang-router in front of them) as subprocesses.

Used by the default job, the benchmark and the tests:

    with start_teacher_server(model_dir="runs/math-teacher") as server:
        pool = TeacherPool({"math": TeacherConfig(endpoints=[server.url], domains=["add"])}, ...)

A server is `python -m megatron_opd.serving ... --port 0`: it binds a free port itself
and prints it in its ready line, which this module reads from the server's log file (a pipe
could fill and stall the server). Several servers start in parallel with `wait=False` followed
by `wait_ready(handles)`. Nothing here imports torch.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import megatron_opd

REPO_ROOT = Path(megatron_opd.__file__).resolve().parents[1]
_READY = re.compile(r"teacher server ready at (http://\S+)")
# A server is always a world of one, even when started from inside a torchrun/SLURM rank.
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID")


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra or {})
    return env


@dataclass
class ServerHandle:
    """A started server process: `.url` once ready, `.stop()` (SIGTERM, then kill), `.kill()`."""

    process: subprocess.Popen
    log_path: Path
    name: str
    url: str = ""
    _log: object = field(default=None, repr=False)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 15.0) -> int | None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: a crash, for failover tests."""
        if self.alive():
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_all(handles: Sequence[ServerHandle], timeout_s: float = 15.0) -> None:
    """SIGTERM every server at once, then wait for each (stopping in turn would add up)."""
    for h in handles:
        if h.alive():
            h.process.send_signal(signal.SIGTERM)
    for h in handles:
        h.stop(timeout_s)


def _spawn(cmd: list[str], name: str, log_path: str | os.PathLike | None, env: dict[str, str]) -> ServerHandle:
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix=f"{name}-", suffix=".log")
        os.close(fd)
    log = open(log_path, "wb")
    # Its own session: a Ctrl-C on the launcher's terminal must not take the servers down while
    # the trainer's ranks still finish their step and save; the launcher stops them afterwards.
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=str(REPO_ROOT),
        start_new_session=True,
    )
    return ServerHandle(process=proc, log_path=Path(log_path), name=name, _log=log)


def start_teacher_server(
    *,
    model_dir: str | os.PathLike = "",
    random_init: bool = False,
    model_config: str | os.PathLike = "",
    tokenizer: str | os.PathLike = "",
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str = "",
    weights_dir: str | os.PathLike = "",
    weight_groups: bool = False,
    seed: int = 1234,
    threads: int = 1,
    extra_args: Sequence[str] = (),
    log_path: str | os.PathLike | None = None,
    wait: bool = True,
    startup_timeout_s: float = 180.0,
) -> ServerHandle:
    """Launch `python -m megatron_opd.serving` (a teacher or rollout server) and, by default, wait
    for its ready line."""
    cmd = [sys.executable, "-m", "megatron_opd.serving", "--host", host, "--port", str(port), "--seed", str(seed)]
    if model_dir:
        cmd += ["--model-dir", str(model_dir)]
    if random_init:
        cmd += ["--random-init"]
    if model_config:
        cmd += ["--model-config", str(model_config)]
    if tokenizer:
        cmd += ["--tokenizer", str(tokenizer)]
    env = subprocess_env()
    if api_key:  # through the environment: a command line is readable by every user (ps)
        env["MEGATRON_OPD_SERVER_API_KEY"] = api_key
        cmd += ["--api-key-env", "MEGATRON_OPD_SERVER_API_KEY"]
    if weights_dir:
        cmd += ["--weights-dir", str(weights_dir)]
    if weight_groups:
        cmd += ["--weight-groups"]
    if threads:
        cmd += ["--threads", str(threads)]
    cmd += list(extra_args)
    handle = _spawn(cmd, "teacher-server", log_path, env)
    if wait:
        wait_ready([handle], startup_timeout_s)
    return handle


def wait_ready(handles: Sequence[ServerHandle], timeout_s: float = 180.0) -> None:
    """Wait until every teacher server printed its ready line; stop them all on failure."""
    deadline = time.monotonic() + timeout_s
    pending = [h for h in handles if not h.url]
    while pending:
        for h in list(pending):
            match = _READY.search(h.log_path.read_text(errors="replace"))
            if match:
                h.url = match.group(1)
                pending.remove(h)
            elif not h.alive():
                for other in handles:
                    other.stop()
                raise RuntimeError(f"{h.name} exited with code {h.process.returncode} before it was ready:\n{h.log_tail()}")
        if pending and time.monotonic() > deadline:
            for other in handles:
                other.stop()
            raise TimeoutError(f"{pending[0].name} was not ready after {timeout_s:.0f} s:\n{pending[0].log_tail()}")
        if pending:
            time.sleep(0.1)


def start_router(
    worker_urls: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    policy: str = "round_robin",
    health_check_interval_s: int = 2,
    health_failure_threshold: int = 2,
    extra_args: Sequence[str] = (),
    log_path: str | os.PathLike | None = None,
    startup_timeout_s: float = 60.0,
) -> ServerHandle:
    """The real `sglang-router` (pip install sglang-router) in front of `worker_urls`.

    The router retries a failed /generate on another worker by itself, but sends other requests
    (/get_model_info) to a dead worker until its health check marks it unhealthy: 3 failed checks
    60 s apart by default, so we check every `health_check_interval_s` seconds instead.

    Ready when it forwards GET /get_model_info to a worker (its /health answers before any worker
    is registered; it has no /model_info route). The workers must be up first: the router
    health-checks them at start-up.
    """
    from megatron_opd.runtime.spawn import free_port

    port = port or free_port(host)
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", host, "--port", str(port),
           "--worker-urls", *worker_urls, "--policy", policy,
           "--health-check-interval-secs", str(health_check_interval_s),
           "--health-failure-threshold", str(health_failure_threshold), *extra_args]  # fmt: skip
    handle = _spawn(cmd, "sglang-router", log_path, subprocess_env())
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + startup_timeout_s
    while True:
        if not handle.alive():
            raise RuntimeError(f"sglang-router exited with code {handle.process.returncode}:\n{handle.log_tail()}")
        try:
            with urllib.request.urlopen(url + "/get_model_info", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            handle.stop()
            raise TimeoutError(f"sglang-router at {url} was not ready after {startup_timeout_s:.0f} s:\n{handle.log_tail()}")
        time.sleep(0.2)
    handle.url = url
    return handle
