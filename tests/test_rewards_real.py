"""The real-domain verifiers: math (math-verify), code (the sandbox), exact and regex match.

The sandbox tests run real subprocesses against a real listening socket and real files; each
isolation layer (kernel namespaces, the Python guard) is also tested alone, and a kernel layer
the machine does not grant is skipped with the reason the sandbox reported.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from megatron_opd.rewards.code import CodeVerifier, extract_code
from megatron_opd.rewards.match import ExactMatch, RegexMatch
from megatron_opd.rewards.math import MathVerifier, last_boxed
from megatron_opd.rewards.sandbox import SandboxLimits, SandboxOptions, SandboxRun, run_sandboxed
from megatron_opd.rewards.types import RewardError, RewardInput

FAST = SandboxLimits(wall_seconds=1.5, cpu_seconds=5, memory_bytes=256 << 20)
GUARD_ONLY = SandboxOptions(namespaces=False)
KERNEL_ONLY = SandboxOptions(python_guard=False)


def sample(response: str, sample_id: str = "s/0", domain: str = "d", **fields) -> RewardInput:
    return RewardInput(prompt="p", response=response, sample_id=sample_id, domain=domain, fields=fields)


def gone(pid: int, within: float = 3.0) -> bool:
    """True when `pid` no longer exists (or is a zombie nobody has reaped yet)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def group_empty(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def require_kernel(result, concern: str, achieved: str) -> None:
    assert result.isolation, f"the sandbox harness failed: {result.stderr}"
    if not result.isolation.get(concern, "").startswith(achieved):
        pytest.skip(f"the kernel did not grant this layer here: {concern} = {result.isolation.get(concern)!r}")


# ---------------------------------------------------------------- math

@pytest.fixture(scope="module")
def math_verifier():
    verifier = MathVerifier(timeout_seconds=5)  # math-verify's default; 2 shared cores can be slow
    yield verifier
    verifier.close()


@pytest.mark.parametrize("answer, response", [
    ("0.5", r"So the probability is \boxed{\frac{1}{2}}."),
    (r"\frac{1}{2}", r"\boxed{0.5}"),
    (r"\frac{1}{2}", r"Simplifying, \boxed{2/4}"),
    (0.5, r"\boxed{1/2}"),                                   # a JSON number as the gold answer
    ("3", "The answer is 3."),                               # no box: the last expression
    (r"[1, 2)", r"The solution set is \boxed{[1,2)}"),
    (r"\{1, 2\}", r"\boxed{\{2, 1\}}"),
    ("x^2 + 2x + 1", r"$\boxed{(x+1)^2}$"),
    ("1/2", r"first \boxed{3}, then on reflection \boxed{\frac{1}{2}}"),  # the last box counts
])
def test_math_equivalent(math_verifier, answer, response):
    [result] = math_verifier.score([sample(response, answer=answer)])
    assert (result.score, result.timed_out, result.info["reason"]) == (1.0, False, "equivalent"), result


@pytest.mark.parametrize("answer, response", [
    ("3", r"\boxed{4}"),
    ("1/2", r"\boxed{0.4999}"),
    (r"[1, 2)", r"\boxed{(1, 2]}"),
    (r"\{1, 2\}", r"\boxed{\{1, 2, 3\}}"),
    ("3", r"first \boxed{3}, then on reflection \boxed{\frac{1}{2}}"),
])
def test_math_not_equivalent(math_verifier, answer, response):
    [result] = math_verifier.score([sample(response, answer=answer)])
    assert (result.score, result.timed_out, result.info["reason"]) == (0.0, False, "not equivalent"), result


def test_math_response_without_an_answer(math_verifier):
    [result] = math_verifier.score([sample("I am not sure how to solve this.", answer="1/2")])
    assert (result.score, result.timed_out, result.info["reason"]) == (0.0, False, "no answer found")


def test_last_boxed():
    assert last_boxed(r"a \boxed{1} b \boxed{\frac{1}{2}} c") == r"\frac{1}{2}"
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed(r"\boxed{1} and then \boxed{\frac{1}{") is None  # truncated: never closed
    assert last_boxed(r"\boxed{2} then the word \boxed alone") == "2"
    assert last_boxed("no box") is None


def test_math_time_out_is_reported_not_a_silent_zero():
    # 9^(9^9) against 3: SymPy evaluates a 370-million-digit power; math-verify's 1 s alarm stops it.
    started = time.monotonic()
    [result] = MathVerifier(timeout_seconds=1).score([sample(r"\boxed{9^{9^{9}}}", answer="3")])
    assert result.timed_out and result.score == 0.0
    assert "took over 1s" in result.info["reason"]
    assert time.monotonic() - started < 10


def test_math_from_a_thread_runs_in_the_worker_and_agrees():
    """signal.alarm only works in the main thread: from another thread the verifier uses its
    worker process, with the same results, time-outs included."""
    cases = [sample(r"\boxed{2/4}", answer="0.5"), sample(r"\boxed{4}", answer="3"),
             sample(r"\boxed{9^{9^{9}}}", answer="3"), sample("nothing", answer="1")]
    verifier = MathVerifier(timeout_seconds=1)
    try:
        inline = verifier.score(cases)
        assert verifier._worker is None
        threaded = []
        worker = threading.Thread(target=lambda: threaded.extend(verifier.score(cases)))
        worker.start()
        worker.join(120)
        assert verifier._worker is not None
        assert [(r.score, r.timed_out, r.info["reason"]) for r in threaded] == \
            [(r.score, r.timed_out, r.info["reason"]) for r in inline] == [
                (1.0, False, "equivalent"), (0.0, False, "not equivalent"),
                (0.0, True, "a comparison took over 1s"), (0.0, False, "no answer found")]
        # a bad row is the same error from the worker as inline
        errors = []

        def score_bad_row():
            try:
                verifier.score([sample(r"\boxed{1}", sample_id="gsm/19", domain="math")])
            except RewardError as error:
                errors.append(str(error))

        worker = threading.Thread(target=score_bad_row)
        worker.start()
        worker.join(120)
        assert len(errors) == 1 and errors[0].startswith(
            "math verifier: sample 'gsm/19' (domain 'math') has no 'answer' field"), errors
    finally:
        verifier.close()


def test_math_refuses_inline_scoring_off_the_main_thread():
    errors = []

    def score():
        try:
            MathVerifier(use_worker=False).score([sample(r"\boxed{1}", answer="1")])
        except RuntimeError as error:
            errors.append(str(error))

    worker = threading.Thread(target=score)
    worker.start()
    worker.join(60)
    assert len(errors) == 1 and "use_worker=False outside the main thread" in errors[0]


def test_math_worker_is_killed_past_its_hard_limit_and_restarts():
    # timeout_seconds=0 turns math-verify's own alarm off, so only the hard limit stops this.
    verifier = MathVerifier(timeout_seconds=0, use_worker=True, hard_timeout_seconds=1.0)
    try:
        [first] = verifier.score([sample(r"\boxed{1/2}", answer="0.5")])
        pid = verifier._worker._process.pid
        started = time.monotonic()
        [hung] = verifier.score([sample(r"\boxed{9^{9^{9}}}", answer="3")])
        assert time.monotonic() - started < 20  # unstopped, this comparison runs for minutes
        assert hung.timed_out and hung.score == 0.0 and "hard limit" in hung.info["reason"]
        assert gone(pid)
        [after] = verifier.score([sample(r"\boxed{\frac{1}{2}}", answer="0.5", sample_id="s/1")])
        assert (first.score, after.score, after.timed_out) == (1.0, 1.0, False)
        assert verifier._worker._process.pid != pid
    finally:
        verifier.close()


def test_math_bad_input_names_field_sample_and_verifier(math_verifier):
    with pytest.raises(RewardError, match=r"math verifier: sample 'gsm/17' \(domain 'math'\) has no 'answer' field"):
        math_verifier.score([sample(r"\boxed{1}", sample_id="gsm/17", domain="math", solution="1")])
    with pytest.raises(RewardError, match=r"math verifier: sample 'gsm/18' .* is not an answer math-verify can parse"):
        math_verifier.score([sample(r"\boxed{1}", sample_id="gsm/18", domain="math", answer="")])


# ---------------------------------------------------------------- code: scoring

def code_verifier(**kwargs) -> CodeVerifier:
    return CodeVerifier(limits=kwargs.pop("limits", FAST), **kwargs)


def test_extract_code():
    response = "First try:\n```python\nx = 1\n```\nBetter:\n```py\ndef f():\n    return 2\n```\nDone."
    assert extract_code(response) == ("def f():\n    return 2\n", "last fenced block")
    assert extract_code("def f(): return 2") == ("def f(): return 2", "whole response")


def test_code_passes_and_fails():
    verifier = code_verifier()
    good = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```"
    results = verifier.score([
        sample(good, tests="assert add(1, 2) == 3\nassert add(-1, 1) == 0"),
        sample("def add(a, b):\n    return a - b", tests=["assert add(0, 0) == 0", "assert add(1, 2) == 3"]),
        sample("def add(a, b): return a +", tests="assert add(1, 2) == 3"),  # a syntax error
    ])
    assert [(r.score, r.timed_out, r.info["passed"], r.info["total"]) for r in results] == \
        [(1.0, False, 1, 1), (0.0, False, 1, 2), (0.0, False, 0, 1)]
    assert results[0].info["source"] == "last fenced block"
    assert results[1].info["reason"] == "test 1: AssertionError (line 1)"
    assert "SyntaxError" in results[2].info["reason"]
    [partial] = code_verifier(partial_credit=True).score(
        [sample("def add(a, b):\n    return a - b", tests=["assert add(0, 0) == 0", "assert add(1, 2) == 3"])])
    assert partial.score == 0.5


def test_code_stdin_stdout_cases():
    program = "import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))"
    cases = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5", "output": "10"}, {"input": "7", "output": "8"}]
    [result] = code_verifier(partial_credit=True).score([sample(program, tests=cases)])
    assert (result.info["passed"], result.info["total"], result.score) == (2, 3, 2 / 3)
    assert result.info["reason"] == "case 2: wrong output: expected '8', got '7\\n'"
    [crash] = code_verifier().score([sample("raise SystemExit(3)", tests=cases[:1])])
    assert crash.score == 0.0 and crash.info["reason"].startswith("case 0: exit status 3")


def test_code_cannot_fake_a_pass():
    """The pass count is reported after the last test, on a line only the harness can mark,
    built from names the code cannot patch."""
    results = code_verifier().score([
        sample("import os\nos._exit(0)", tests="assert False"),
        sample("import sys\nsys.exit(0)", tests="assert False"),
        sample("print('x result 1 1')", tests="assert False"),  # a forged report lacks the nonce
        sample("import builtins\nbuiltins.len = lambda x: 0\nbuiltins.range = lambda *a: iter(())\n"
               "builtins.enumerate = lambda x: iter(())", tests=["assert False", "assert False"]),
    ])
    assert [r.score for r in results] == [0.0, 0.0, 0.0, 0.0]
    assert (results[3].info["passed"], results[3].info["total"]) == (0, 2)
    assert results[0].info["reason"].startswith("no test result")
    assert results[1].info["reason"] == "the solution exited before the tests"


def test_code_runs_samples_concurrently():
    verifier = code_verifier(workers=4, limits=SandboxLimits(wall_seconds=10))
    started = time.monotonic()
    results = verifier.score([sample("import time\ntime.sleep(2.0)", sample_id=f"s/{i}", tests="pass")
                              for i in range(4)])
    elapsed = time.monotonic() - started
    assert [r.score for r in results] == [1.0] * 4
    assert elapsed < 6.0, f"4 two-second samples on 4 workers took {elapsed:.1f}s: not concurrent"


# ---------------------------------------------------------------- code: limits

def test_infinite_loop_is_killed_within_the_limit_and_leaves_no_process():
    started = time.monotonic()
    result = run_sandboxed(SandboxRun("while True:\n    pass", tests=("pass",)), FAST)
    elapsed = time.monotonic() - started
    assert result.killed == "wall clock" and result.timed_out and result.passed is None
    assert elapsed < FAST.wall_seconds + 3.0  # the margin: killing, reaping, deleting the scratch
    assert group_empty(result.pid) and gone(result.pid)
    [scored] = code_verifier().score([sample("while True:\n    pass", tests="pass")])
    assert scored.timed_out and scored.score == 0.0
    assert scored.info["reason"] == "killed at the 1.5s wall clock limit"


def test_cpu_limit_kills_a_busy_loop():
    # A generous wall clock: on a loaded machine one CPU second can take many wall seconds.
    limits = SandboxLimits(wall_seconds=120, cpu_seconds=1, memory_bytes=256 << 20)
    result = run_sandboxed(SandboxRun("while True:\n    pass"), limits)
    assert result.killed == "cpu time" and result.cpu_seconds >= 0.8
    assert group_empty(result.pid)


def test_processes_it_starts_die_with_it():
    """Kernel layer alone (no guard): a forked child that leaves the process group is killed
    with the pid namespace."""
    program = ("import os\nif os.fork() == 0:\n    os.setsid()\n    print(os.readlink('/proc/self'), flush=True)\n"
               "    while True:\n        pass\nwhile True:\n    pass\n")
    limits = SandboxLimits(wall_seconds=2.0, cpu_seconds=30, memory_bytes=256 << 20, max_processes=1 << 20)
    result = run_sandboxed(SandboxRun(program), limits, KERNEL_ONLY)
    require_kernel(result, "processes", "own pid namespace")
    escaped = int(result.stdout.split()[0])
    assert result.killed == "wall clock" and gone(escaped)


def test_memory_hog_fails_without_harming_the_caller():
    before = resource.getrlimit(resource.RLIMIT_AS)
    results = code_verifier().score([
        sample("data = bytearray(8 << 30)", tests="pass"),
        sample("chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))", tests="pass", sample_id="s/1"),
    ])
    for result in results:
        assert result.score == 0.0 and not result.timed_out
        assert "MemoryError" in result.info["reason"]
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    assert len(bytearray(512 << 20)) == 512 << 20  # this process can still allocate beyond the sandbox's limit


def test_file_size_limit_covers_files_and_stdout():
    limits = SandboxLimits(wall_seconds=10, file_size_bytes=1 << 20)
    big_file = run_sandboxed(SandboxRun("open('big', 'wb').write(b'x' * (2 << 20))"), limits)
    flood = run_sandboxed(SandboxRun("import sys\nwhile True:\n    sys.stdout.write('y' * 65536)"), limits)
    for result in (big_file, flood):
        assert result.exit_code != 0 and not result.timed_out
    assert "File too large" in big_file.stderr or big_file.exit_code == -25  # EFBIG, or SIGXFSZ
    assert len(flood.stdout) <= 1 << 20


# ---------------------------------------------------------------- code: isolation

@pytest.fixture
def listening_server():
    """A real TCP server on 127.0.0.1 that records every connection it accepts."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.1)
    accepted, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except (socket.timeout, OSError):
                continue
            accepted.append(connection)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    server.close()


def connect_program(port: int) -> str:
    return f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')\n"


def test_the_server_is_reachable_outside_the_sandbox(listening_server):
    port, accepted = listening_server
    socket.create_connection(("127.0.0.1", port), timeout=1).close()
    deadline = time.monotonic() + 2
    while not accepted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(accepted) == 1  # so the sandbox tests below would see a connection that got through


@pytest.mark.parametrize("options, refusal", [
    (SandboxOptions(), "PermissionError: sandbox: socket.__new__ is not allowed"),
    (GUARD_ONLY, "PermissionError: sandbox: socket.__new__ is not allowed"),
    (KERNEL_ONLY, "Network is unreachable"),
], ids=["both", "guard-only", "kernel-only"])
def test_no_network(listening_server, options, refusal):
    port, accepted = listening_server
    result = run_sandboxed(SandboxRun(connect_program(port)), FAST, options)
    if options is KERNEL_ONLY:
        require_kernel(result, "network", "own network namespace")
    assert result.exit_code == 1 and refusal in result.stderr, result
    time.sleep(0.2)
    assert accepted == []


@pytest.mark.parametrize("options, refusal", [
    (SandboxOptions(), "outside the scratch directory) is not allowed"),
    (GUARD_ONLY, "outside the scratch directory) is not allowed"),
    (KERNEL_ONLY, "Read-only file system"),
], ids=["both", "guard-only", "kernel-only"])
def test_cannot_write_outside_the_scratch_directory(tmp_path, options, refusal):
    target = tmp_path / "open to all"
    target.mkdir()
    target.chmod(0o777)  # so file permissions alone would not stop the write
    victim = target / "escaped.txt"
    program = (f"import os\nopen('inside.txt', 'w').write('ok')\nassert open('inside.txt').read() == 'ok'\n"
               f"print(os.getcwd(), flush=True)\nopen({str(victim)!r}, 'w').write('escaped')\n")
    result = run_sandboxed(SandboxRun(program), FAST, options)
    if options is KERNEL_ONLY:
        require_kernel(result, "filesystem", "read-only except the scratch directory")
    assert result.exit_code == 1 and refusal in result.stderr, result
    assert not victim.exists()
    scratch = Path(result.stdout.split()[0])
    assert scratch.name == "scratch" and not scratch.exists()  # deleted after the run


def test_guard_refuses_other_ways_out(tmp_path):
    outside = str(tmp_path / "x")
    attempts = {
        "import subprocess": "importing _posixsubprocess is not allowed",
        "import pty\npty.fork()": "sandbox: os.fork",
        "import os\nos.system('true')": "os.system is not allowed",
        "import os\nos.fork()": "os.fork is not allowed",
        "import os\nos.kill(1, 0)": "os.kill is not allowed",
        "import ctypes": "importing ctypes is not allowed",
        "import os\nos.symlink('/etc/passwd', 'link')\nopen('link', 'a')": "writing /etc/passwd",
        f"import os\nos.rename('solution.py', {outside!r})": "os.rename on",
        "import os\nfd = os.open('/tmp', os.O_RDONLY)": "opening the directory /tmp",
        "open('/proc/self/mem', 'rb')": "opening /proc/",
        "import gc\ngc.get_objects()": "gc.get_objects is not allowed",
    }
    verifier = code_verifier(options=GUARD_ONLY, workers=4)
    results = verifier.score([sample(program, sample_id=f"g/{i}", tests="pass")
                              for i, program in enumerate(attempts)])
    for (program, refusal), result in zip(attempts.items(), results):
        assert result.score == 0.0 and refusal in result.info["reason"], (program, result.info["reason"])
    assert not Path(outside).exists()


def test_standard_library_still_works_under_the_guard():
    program = ("import collections, dataclasses, enum, typing, logging, json, re, math, tempfile, os\n"
               "Point = collections.namedtuple('Point', 'x y')\nT = typing.TypeVar('T')\n"
               "class Color(enum.Enum):\n    RED = 1\n"
               "with tempfile.NamedTemporaryFile('w', delete=False) as f:\n    f.write('x')\n"
               "assert os.path.dirname(f.name) == os.getcwd()\n"
               "print(json.dumps([Point(1, 2).x, Color.RED.value, math.comb(5, 2)]))\n")
    [result] = code_verifier().score([sample(program, tests=[{"input": "", "output": "[1, 1, 10]"}])])
    assert result.score == 1.0, result.info


def test_the_code_cannot_undo_the_kernel_isolation():
    """Without capabilities, remounting the file system writable fails even with the guard off."""
    program = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
               "print(libc.mount(None, b'/', None, 32 | 4096, None), ctypes.get_errno())\n")
    result = run_sandboxed(SandboxRun(program), FAST, KERNEL_ONLY)
    require_kernel(result, "filesystem", "read-only except the scratch directory")
    assert result.isolation["capabilities"] == "none"
    assert result.stdout.split() == ["-1", "1"]  # EPERM


def _readable_by_others(path: Path) -> bool:
    path = path.resolve()
    return all(parent.stat().st_mode & 0o005 == 0o005 for parent in [path, *path.parents] if parent.is_dir()) \
        and (path.is_dir() or path.stat().st_mode & 0o004)


@pytest.fixture
def world_writable_directory():
    """A fresh directory every user can write to (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="opd-sandbox-test-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


@pytest.mark.parametrize("who", [["--reuid=65534", "--regid=65534", "--clear-groups"], ["--bounding-set=-sys_admin"]],
                         ids=["uid-65534", "root-without-CAP_SYS_ADMIN"])
def test_an_unprivileged_user_gets_the_kernel_layers_too(world_writable_directory, who):
    """Without CAP_SYS_ADMIN (another uid, or a container's root), the child builds its own user
    namespace first, then the same network and mount isolation (where the kernel allows
    unprivileged user namespaces)."""
    repo = Path(__file__).resolve().parents[1]
    python = Path("/usr/bin/python3")
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None or not python.exists():
        pytest.skip("needs root, setpriv and /usr/bin/python3 to run the sandbox without privileges")
    if not (_readable_by_others(repo / "megatron_opd" / "rewards" / "sandbox_child.py")
            and _readable_by_others(python)):
        pytest.skip(f"{repo} or {python} is not readable by uid 65534")
    target = world_writable_directory
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(repo)!r})\n"
        "from megatron_opd.rewards.sandbox import SandboxLimits, SandboxOptions, SandboxRun, run_sandboxed\n"
        f"program = \"import socket\\ntry:\\n    socket.create_connection(('127.0.0.1', 1), timeout=1)\\n"
        f"except OSError as e:\\n    print(e.errno)\\nopen({str(target / 'escaped')!r}, 'w')\\n\"\n"
        f"result = run_sandboxed(SandboxRun(program), SandboxLimits(wall_seconds=5), "
        f"SandboxOptions(python={str(python)!r}, python_guard=False, scratch_root={str(target)!r}))\n"
        "print(json.dumps({'isolation': result.isolation, 'stdout': result.stdout, 'stderr': result.stderr}))\n")
    done = subprocess.run([setpriv, *who, str(python), "-c", script],
                          capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["isolation"], report
    if report["isolation"].get("user") != "own user namespace":
        pytest.skip(f"unprivileged user namespaces are off here: {report['isolation']}")
    assert report["isolation"]["network"] == "own network namespace (no interfaces up)"
    assert report["isolation"]["filesystem"] == "read-only except the scratch directory"
    assert report["isolation"]["capabilities"] == "none"
    assert report["stdout"].split() == [str(errno.ENETUNREACH)]
    assert "Read-only file system" in report["stderr"] and not (target / "escaped").exists()


# ---------------------------------------------------------------- code: bad input

def test_code_bad_input_names_field_sample_and_verifier():
    verifier = code_verifier()
    with pytest.raises(RewardError, match=r"code verifier: sample 'x/17' \(domain 'code'\) has no 'tests' field"):
        verifier.score([sample("pass", sample_id="x/17", domain="code", answer="1")])
    with pytest.raises(RewardError, match=r"sample 'x/18' .*field 'tests' is an empty list"):
        verifier.score([sample("pass", sample_id="x/18", domain="code", tests=[])])
    with pytest.raises(RewardError, match=r"sample 'x/19' .*field 'tests' item 1 is \{'in': '1'\}"):
        verifier.score([sample("pass", sample_id="x/19", domain="code",
                               tests=[{"input": "1", "output": "1"}, {"in": "1"}])])
    with pytest.raises(RewardError, match=r"field 'tests' is a int, expected str or list"):
        verifier.score([sample("pass", sample_id="x/20", domain="code", tests=3)])
    # tests that would fail every response, or pass every response, are the dataset's bug
    with pytest.raises(RewardError, match=r"sample 'x/22' .*field 'tests' does not compile"):
        verifier.score([sample("pass", sample_id="x/22", domain="code", tests="assert f(1) ==")])
    with pytest.raises(RewardError, match=r"sample 'x/23' .*field 'tests' is .*a literal and not test code"):
        verifier.score([sample("pass", sample_id="x/23", domain="code", tests='[{"input": "1", "output": "2"}]')])
    with pytest.raises(RewardError, match=r"sample 'x/24' .*field 'tests' item 1 is '3', a literal"):
        verifier.score([sample("pass", sample_id="x/24", domain="code", tests=["assert True", "3"])])


def test_a_verifier_that_raises_names_verifier_domain_and_sample():
    broken = CodeVerifier(limits=FAST, options=SandboxOptions(python="/nonexistent/python"))
    with pytest.raises(RewardError, match=r"code verifier raised on sample 'x/21' \(domain 'code'\): FileNotFoundError"):
        broken.score([sample("pass", sample_id="x/21", domain="code", tests="pass")])
    with pytest.raises(RewardError, match=r"exact verifier raised on sample 'e/1' \(domain 'd'\): AttributeError"):
        ExactMatch().score([RewardInput("p", None, "e/1", "d", {"answer": "1"})])


# ---------------------------------------------------------------- exact and regex

def test_exact_match():
    answers = [sample("  42\n", answer="42"), sample("Hello World", answer="hello world"),
               sample("a  b\n c", answer="a b c"), sample("3", answer=3), sample("4", answer=3)]
    assert [r.score for r in ExactMatch().score(answers)] == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert [r.score for r in ExactMatch(casefold=True).score(answers)] == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert [r.score for r in ExactMatch(collapse_whitespace=True).score(answers)] == [1.0, 0.0, 1.0, 1.0, 0.0]
    with pytest.raises(RewardError, match=r"exact verifier: sample 's/0' \(domain 'd'\) has no 'answer' field"):
        ExactMatch().score([sample("1")])


def test_regex_match():
    cases = [sample("The answer is 42.\n", pattern=r"The answer is \d+\."),
             sample("I think the answer is 42.", pattern=r"the answer is \d+"),
             sample("no digits", pattern=r".*\d.*")]
    assert [r.score for r in RegexMatch().score(cases)] == [1.0, 0.0, 0.0]
    assert [r.score for r in RegexMatch(mode="search").score(cases)] == [1.0, 1.0, 0.0]
    with pytest.raises(RewardError, match=r"regex verifier: sample 'r/1' .*'pattern' that does not compile"):
        RegexMatch().score([sample("x", sample_id="r/1", pattern="(unclosed")])
    with pytest.raises(RewardError, match=r"regex verifier: sample 'r/2' .* has no 'pattern' field"):
        RegexMatch().score([sample("x", sample_id="r/2", answer="x")])
    with pytest.raises(ValueError, match="mode must be 'fullmatch' or 'search'"):
        RegexMatch(mode="match")
