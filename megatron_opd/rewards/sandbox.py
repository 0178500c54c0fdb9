"""Run untrusted Python in a sandboxed subprocess, with limits, and say what it did.

`run_sandboxed(SandboxRun(program, tests=..., stdin=...), SandboxLimits(...))` starts
`python -I -S sandbox_child.py` in a new session with an empty environment (PATH, HOME and
TMPDIR only, HOME and TMPDIR being the scratch directory), all other descriptors closed, in a
fresh scratch directory that is deleted afterwards. The child isolates itself before running the
code (sandbox_child.py says how) and reports what it achieved in `SandboxResult.isolation`.

What the isolation is, where the kernel allows each part (it does with CAP_SYS_ADMIN, i.e. as
root, and without it where unprivileged user namespaces are enabled):
- network: an own network namespace with no interface up: no connection to anything, 127.0.0.1
  included;
- files: an own mount namespace in which every mount is read-only except the scratch directory,
  so writes outside it fail whatever the file permissions; reads are NOT restricted (the code can
  read what the uid running the trainer can read: do not run the trainer with secrets on disk
  that untrusted code must not see);
- processes: an own pid namespace (the code sees and can signal only its own processes; when
  its first process dies the kernel kills the rest), the whole process group killed on overrun;
- privileges: no capabilities and no_new_privs, so the code cannot undo any of the above;
- limits: RLIMIT_CPU (killed at the limit), RLIMIT_AS (allocations beyond it fail:
  MemoryError), RLIMIT_FSIZE (stdout and stderr count too), RLIMIT_NOFILE, RLIMIT_NPROC (the
  kernel counts it per user and does not enforce it for uid 0; for another user, whose uid
  already runs the trainer's threads, a small value means no new process or thread), no core
  dumps; and a wall-clock limit after which the process group is killed with SIGKILL.
Where the kernel refuses a namespace, the result's `isolation` says so, and only the Python guard
stands there: an audit hook in the child that refuses sockets, subprocesses, fork, exec,
signals, writes outside the scratch directory, ctypes and the routes to the harness's objects.
The guard is defence in depth against ordinary code, not a security boundary: in-process Python
cannot be made tamper-proof against code written to escape it. Not provided at all: limits on
reading files, on CPU share or on disk use beyond RLIMIT_FSIZE per file, seccomp filtering.

Test results cannot be forged by exiting early: in "tests" mode the child reports passes on a
line that starts with a per-run random nonce, written after the last test, so sys.exit(0) or
os._exit(0) before the tests finish is a failure. Code that defeats the guard could find the
nonce; for untrusted code where that matters use stdin/stdout tests (compared here, outside).
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

CHILD_PROGRAM = Path(__file__).with_name("sandbox_child.py")
_RESULT_BYTES = 1 << 20  # more than a report ever needs; the rest of what the code writes there is dropped


@dataclass(frozen=True)
class SandboxLimits:
    """Limits on one sandboxed run (the CPU, memory, file and process ones are rlimits)."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30
    file_size_bytes: int = 16 << 20
    open_files: int = 64
    max_processes: int = 1

    def __post_init__(self):
        for name in ("wall_seconds", "cpu_seconds", "memory_bytes", "file_size_bytes", "open_files",
                     "max_processes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"sandbox limits: {name} must be > 0, not {getattr(self, name)!r}")


@dataclass(frozen=True)
class SandboxRun:
    """What to run: `program` (Python source); with `tests` (Python blocks run after it in its
    namespace) in tests mode, else as a script reading `stdin` (stdio mode)."""

    program: str
    tests: tuple[str, ...] | None = None
    stdin: str = ""


@dataclass(frozen=True)
class SandboxResult:
    """What happened. `passed`/`total`/`failure` come from the child's result line (tests mode;
    None when there is none: the code exited early or was killed). `exit_code` is the child's
    status, negative for a signal. `killed` says why the sandbox killed it ("wall clock", "cpu
    time"), None when it ended by itself."""

    exit_code: int
    killed: str | None
    stdout: str
    stderr: str
    passed: int | None
    total: int | None
    failure: str
    isolation: dict[str, str]
    wall_seconds: float
    cpu_seconds: float
    pid: int

    @property
    def timed_out(self) -> bool:
        return self.killed is not None


@dataclass(frozen=True)
class SandboxOptions:
    """How to sandbox: `namespaces` and `python_guard` exist so each layer can be tested alone;
    production keeps both on."""

    python: str = sys.executable
    namespaces: bool = True
    python_guard: bool = True
    scratch_root: str | None = None


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already empty


def _kill_children_first(pid: int) -> None:
    """Kill the harness's children (the pid-namespace init), let the harness reap them and
    exit, then kill the whole group. Killing the group at once would orphan the init to a
    system init that reaps it whenever it likes, leaving it visible after we return."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        try:
            os.kill(int(child), signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 1.0
    while children and time.monotonic() < deadline:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            break
        time.sleep(0.005)
    _killpg(pid)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


def _tail(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - limit))
        text = f.read().decode("utf-8", errors="replace")
    return text if size <= limit else f"[{size - limit} earlier bytes not shown]\n{text}"


def run_sandboxed(run: SandboxRun, limits: SandboxLimits = SandboxLimits(),
                  options: SandboxOptions = SandboxOptions()) -> SandboxResult:
    """Run `run` in the sandbox and wait for it (at most limits.wall_seconds). Thread-safe."""
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="opd-sandbox-", dir=options.scratch_root) as top_name:
        top = Path(top_name)
        scratch = top / "scratch"
        scratch.mkdir(mode=0o700)
        (scratch / "solution.py").write_text(run.program, encoding="utf-8")
        config_path = top / "config.json"
        with open(os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump({"nonce": nonce, "scratch": str(scratch), "program": str(scratch / "solution.py"),
                       "tests": list(run.tests) if run.tests is not None else None,
                       "limits": asdict(limits), "namespaces": options.namespaces,
                       "python_guard": options.python_guard}, f)
        (top / "stdin").write_text(run.stdin, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": str(scratch), "TMPDIR": str(scratch), "LANG": "C.UTF-8"}
        read_fd, write_fd = os.pipe()
        try:
            with open(top / "stdin", "rb") as stdin, open(top / "stdout", "wb") as stdout, \
                    open(top / "stderr", "wb") as stderr:
                started = time.monotonic()
                process = subprocess.Popen(
                    [options.python, "-I", "-S", str(CHILD_PROGRAM), str(write_fd), str(config_path)],
                    stdin=stdin, stdout=stdout, stderr=stderr, pass_fds=(write_fd,), close_fds=True,
                    start_new_session=True, env=env, cwd=scratch)
            os.close(write_fd)
            write_fd = -1
            report, killed, status, rusage = _wait(process, read_fd, started + limits.wall_seconds)
            wall = time.monotonic() - started
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)
        cpu = rusage.ru_utime + rusage.ru_stime
        exit_code = os.waitstatus_to_exitcode(status)
        # A pid-namespace init's death by signal N is reported by its waiting parent as 128 + N.
        killed_by_kernel = exit_code in (-signal.SIGKILL, 128 + signal.SIGKILL)
        # The kernel's SIGKILL at RLIMIT_CPU (rusage, tick-sampled, reads a few % under the
        # precise runtime the limit is checked against).
        if killed is None and killed_by_kernel and cpu >= 0.8 * limits.cpu_seconds:
            killed = "cpu time"
        isolation, passed, total, failure = {}, None, None, ""
        for line in report.decode("utf-8", errors="replace").splitlines():
            marker, _, rest = line.partition(" ")
            if marker != nonce:
                continue  # written by the untrusted code, not the harness
            kind, _, body = rest.partition(" ")
            if kind == "isolation":
                isolation = json.loads(body)
            elif kind == "result" and passed is None:
                passed_text, total_text, failure_hex = (body.split(" ") + [""])[:3]
                expected_total = len(run.tests) if run.tests is not None else 0
                if int(total_text) != expected_total or not 0 <= int(passed_text) <= expected_total:
                    raise RuntimeError(f"sandbox: the harness reported {passed_text}/{total_text} tests "
                                       f"passed for {expected_total} tests")
                passed, total = int(passed_text), int(total_text)
                failure = bytes.fromhex(failure_hex).decode("utf-8", errors="replace")
        return SandboxResult(exit_code=exit_code, killed=killed,
                             stdout=_tail(top / "stdout", limits.file_size_bytes),
                             stderr=_tail(top / "stderr", 4000), passed=passed, total=total,
                             failure=failure, isolation=isolation, wall_seconds=wall, cpu_seconds=cpu,
                             pid=process.pid)


def _wait(process: subprocess.Popen, read_fd: int, deadline: float):
    """Wait for the child until `deadline`, reading its reports; kill its process group on
    overrun, and after it ends in any case (nothing it started may outlive it). Returns
    (report bytes, why killed or None, wait status, rusage)."""
    pid, chunks, size, killed = process.pid, [], 0, None

    def read(timeout: float) -> bool:
        nonlocal size
        ready, _, _ = select.select([read_fd], [], [], max(0.0, timeout))
        if not ready:
            return True
        chunk = os.read(read_fd, 65536)
        if chunk and size < _RESULT_BYTES:
            chunks.append(chunk)
            size += len(chunk)
        return bool(chunk)

    open_pipe = True
    while True:
        # WNOWAIT: the child stays a zombie, so its pid (= its process group id) cannot be
        # reused before the group is killed below.
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            killed = "wall clock"
            _kill_children_first(pid)
            break
        if open_pipe:
            open_pipe = read(min(left, 0.05))
        else:
            time.sleep(min(left, 0.01))
    _killpg(pid)
    _, status, rusage = os.wait4(pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    # What is left in the pipe; every writer is dead, unless one escaped the group (then stop
    # after a moment rather than wait for it).
    drain_until = time.monotonic() + 1.0
    while open_pipe and time.monotonic() < drain_until:
        open_pipe = read(0.05)
    return b"".join(chunks), killed, status, rusage
