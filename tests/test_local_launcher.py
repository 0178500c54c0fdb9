"""The local launchers under stops: `megatron-opd train` with run.nproc=2 and `megatron-opd run`.

Every launcher here is a real `megatron-opd` process in its own session, with its real spawned
rank worlds and (for `run`) its real teacher server on 127.0.0.1:
- SIGTERM, or a Ctrl-C (SIGINT to its process group), to `megatron-opd train` (two ranks): exit 75
  at once, a complete checkpoint at the step it stopped, no process of the job left (every
  process group it made is empty), and the resumed run ends with the same per-step losses and
  samples as an uninterrupted one;
- a Ctrl-C on `megatron-opd run` while it distils (two ranks, one teacher server): the same, plus
  the server stopped (its port refuses connections), and the rerun skips the finished expert and
  resumes the distillation exactly;
- a phase is done only when it reached its last step: a preempted student warm start and a
  preempted expert (MEGATRON_OPD_FAULT=signal, SIGUSR1 as SLURM's warning) make `run` exit 75, and
  each rerun resumes the unfinished phase instead of using it half-trained.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatron_opd.config import derive, dump_config, load_config

REPO = Path(__file__).resolve().parents[1]
EXIT_STOPPED_EARLY = 75


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_opd.cli", *args]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MEGATRON_OPD_FAULT"}
    return dict(env, PYTHONPATH=str(REPO), **extra)


def _run(args: list[str], log: Path, **env: str) -> subprocess.CompletedProcess:
    out = subprocess.run(args, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=900)
    log.write_text(out.stdout + "\n--- stderr ---\n" + out.stderr)
    return out


def _tail(out: subprocess.CompletedProcess) -> str:
    return out.stdout[-4000:] + "\n--- stderr ---\n" + out.stderr[-4000:]


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return rows


def _per_step(run_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in _rows(run_dir) if key in r}


def _ledger(run_dir: Path) -> list[dict]:
    from megatron_opd.stages.trainer import read_ledger

    return read_ledger(run_dir)


def _wait_for(condition, timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{log.read_text()[-4000:]}" if log and log.exists() else ""))


class Launcher:
    """A `megatron-opd` command in its own session, its output in a file."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        self._out = open(log, "w")
        self.proc = subprocess.Popen(
            args, cwd=REPO, env=_env(), stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def process_groups(self) -> set[int]:
        """Every process group this launcher's process tree uses now (its own, each rank's)."""
        groups = {self.proc.pid}
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                groups.add(os.getpgid(child.pid))
            except ProcessLookupError:
                pass
        return groups

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        finally:
            self._out.close()

    def kill(self, groups: set[int] = frozenset()) -> None:
        """Clean up after a failed test: SIGKILL its session and `groups` (all of ours)."""
        for group in {self.proc.pid, *groups}:
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait()


def _alive_in(groups: set[int]) -> list[str]:
    left = []
    for p in psutil.process_iter(["pid", "status", "cmdline"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) in groups:
                left.append(f"{p.pid}: {' '.join(p.info['cmdline'] or [])[:200]}")
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return left


def _assert_nothing_left(groups: set[int]) -> None:
    deadline = time.monotonic() + 15
    while _alive_in(groups) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive_in(groups), f"processes left behind: {_alive_in(groups)}"


def _stopped_checkpoint(run_dir: Path) -> int:
    from megatron_opd.runtime.checkpoint import checkpoint_step, latest_complete

    latest = latest_complete(run_dir / "checkpoints")
    assert latest is not None, f"no complete checkpoint under {run_dir}"
    return checkpoint_step(latest)


def _signal_after_step(launcher: Launcher, run_dir: Path, step: int, sig: signal.Signals, *, to_group: bool) -> set[int]:
    """Once `run_dir` logged `step`, send `sig` to the launcher (or to its process group, as a
    Ctrl-C on its terminal does). Returns the process groups of its process tree just before."""
    def reached() -> bool:
        return any(r["step"] >= step and ("train/loss" in r or "train/kl" in r) for r in _rows(run_dir))

    _wait_for(reached, 600, f"step {step} of {run_dir}", launcher.log)
    groups = launcher.process_groups()
    assert len(groups) >= 3, f"expected the launcher and two ranks in their own groups, got {groups}"
    if to_group:
        os.killpg(launcher.proc.pid, sig)
    else:
        os.kill(launcher.proc.pid, sig)
    return groups


# -- `megatron-opd train`, two ranks, SIGINT ------------------------------------------------------------

SFT = [
    str(REPO / "configs/tiny/sft.yaml"),
    "run.nproc=2",
    "parallel.tp=2",
    "run.progress=none",
    "run.log_every=1",
    "train.steps=50",
    "train.micro_batch_size=16",
    "train.global_batch_size=16",
    "train.eval_every=0",
    "train.checkpoint_every=0",
]


@pytest.fixture(scope="module")
def straight_sft(tmp_path_factory) -> Path:
    """The uninterrupted run the stopped ones must equal."""
    out = tmp_path_factory.mktemp("straight")
    done = _run(_cli("train", *SFT, f"run.output_dir={out}", "run.name=straight"), out / "straight.log")
    assert done.returncode == 0, _tail(done)
    return out / "straight"


@pytest.mark.parametrize("sig, to_group", [(signal.SIGTERM, False), (signal.SIGINT, True)], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_signal_to_the_train_launcher_saves_exits_75_and_resumes_exactly(straight_sft, tmp_path, sig, to_group):
    run_dir = tmp_path / "stopped"
    launcher = Launcher(_cli("train", *SFT, f"run.output_dir={tmp_path}", "run.name=stopped"), tmp_path / "stopped.log")
    groups: set[int] = set()
    try:
        groups = _signal_after_step(launcher, run_dir, 2, sig, to_group=to_group)
        t0 = time.monotonic()
        rc = launcher.wait(120)
        waited = time.monotonic() - t0
        _assert_nothing_left(groups)
    finally:
        launcher.kill(groups)
    log = launcher.log.read_text()
    assert rc == EXIT_STOPPED_EARLY, log[-4000:]
    assert waited < 60, f"the launcher took {waited:.0f} s to stop"
    step = _stopped_checkpoint(run_dir)
    assert 2 <= step < 50, log[-3000:]
    assert f"stopped by SIGTERM at step {step}" in log  # what the launcher forwards, whatever it got
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["step"], summary["finished"], summary["stopped_early"]) == (step, False, 1.0)
    assert [e["step"] for e in _ledger(run_dir)] == list(range(1, step + 1))

    resumed = _run(_cli("train", *SFT, f"run.output_dir={tmp_path}", "run.name=stopped"), tmp_path / "resumed.log")
    assert resumed.returncode == 0, _tail(resumed)
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{step:08d}'}" in resumed.stdout
    a, b = _per_step(straight_sft, "train/loss"), _per_step(run_dir, "train/loss")
    assert sorted(a) == sorted(b) == list(range(1, 51))
    assert a == b, "the resumed run's losses differ from the uninterrupted run's"
    assert _ledger(straight_sft) == _ledger(run_dir)


# -- `megatron-opd run`: one expert, a teacher server, two OPD ranks --------------------------------


def _pipeline_config(path: Path, *, opd_steps: int, student_steps: int = 0, expert_steps: int = 3) -> Path:
    sft = ["run.nproc=1", "parallel.tp=1", "train.global_batch_size=16", "train.micro_batch_size=16",
           "train.eval_at_start=false", "train.checkpoint_every=0"]
    cfg = derive(
        load_config(REPO / "configs/tiny/opd.yaml"),
        [
            "run.name=tiny",
            "run.progress=none",
            "run.log_every=1",
            "data.domains=[add]",
            "data.eval_size=8",
            f"train.steps={opd_steps}",
            "train.global_batch_size=8",
            "train.micro_batch_size=8",
            f"train.eval_every={opd_steps}",
            "train.checkpoint_every=0",
        ],
        teachers={"arith": {"domains": ["add"], "signal": "hidden"}},
        **{
            "pipeline.expert_overrides": sft + [f"train.steps={expert_steps}", f"train.eval_every={expert_steps}"],
            "pipeline.expert_overrides_by_teacher": {},
            "pipeline.expert_rl_overrides_by_teacher": {},  # SFT-only experts
            "pipeline.student_overrides": (
                sft + [f"train.steps={student_steps}", "train.eval_every=1000"] if student_steps else []
            ),
        },
    )
    dump_config(cfg, path)
    return path


def _server_urls(pipeline_dir: Path) -> list[str]:
    import re

    urls = []
    for log in sorted((pipeline_dir / "logs").glob("teacher-*.log")):
        urls += re.findall(r"teacher server ready at (http://\S+)", log.read_text(errors="replace"))
    return urls


def _refuses_connections(url: str) -> bool:
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        return True
    return False


@pytest.mark.slow
def test_ctrl_c_on_the_run_launcher_saves_stops_its_servers_and_resumes_exactly(tmp_path):
    config = _pipeline_config(tmp_path / "job.yaml", opd_steps=12)
    straight = _run(_cli("run", str(config), f"run.output_dir={tmp_path / 'a'}"), tmp_path / "a.log")
    assert straight.returncode == 0, _tail(straight)
    expert = tmp_path / "a/tiny/experts/arith"

    # The same job again with the finished expert of the first: only the distillation runs.
    args = _cli("run", str(config), f"run.output_dir={tmp_path / 'b'}", f"teachers.arith.model_dir={expert}")
    opd_dir = tmp_path / "b/tiny/opd"
    launcher = Launcher(args, tmp_path / "b-stopped.log")
    groups: set[int] = set()
    try:
        # SIGINT to the launcher's process group, as a Ctrl-C on its terminal: the servers (in
        # their own sessions) must keep serving until the ranks have saved.
        groups = _signal_after_step(launcher, opd_dir, 2, signal.SIGINT, to_group=True)
        urls = _server_urls(tmp_path / "b/tiny")
        rc = launcher.wait(180)
        _assert_nothing_left(groups)
    finally:
        launcher.kill(groups)
    log = launcher.log.read_text()
    assert rc == EXIT_STOPPED_EARLY, log[-4000:]
    assert "SFT:" not in log, "the finished expert was trained again"
    step = _stopped_checkpoint(opd_dir)
    assert 2 <= step < 12, log[-3000:]
    assert f"OPD stopped at step {step} of 12" in log
    assert not (tmp_path / "b/tiny/summary.json").exists(), "a stopped pipeline reported"
    assert urls and all(_refuses_connections(u) for u in urls), f"a teacher server still listens: {urls}"

    resumed = _run(args, tmp_path / "b-resumed.log")
    assert resumed.returncode == 0, _tail(resumed)
    assert f"resumed from {opd_dir / 'checkpoints' / f'step_{step:08d}'}" in resumed.stdout
    a, b = _per_step(tmp_path / "a/tiny/opd", "train/kl"), _per_step(opd_dir, "train/kl")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-6, f"step {s}: {a[s]} vs {b[s]} after the stop"
    assert _ledger(tmp_path / "a/tiny/opd") == _ledger(opd_dir)
    assert json.loads((tmp_path / "b/tiny/summary.json").read_text())["opd_steps"] == 12


# -- item 5: a phase is done only when it reached its last step -------------------------------------


@pytest.mark.slow
def test_run_resumes_a_preempted_warm_start_and_a_preempted_expert(tmp_path):
    def read_summary(run_dir: Path) -> dict | None:
        path = run_dir / "summary.json"
        return json.loads(path.read_text()) if path.exists() else None

    config = _pipeline_config(tmp_path / "job.yaml", opd_steps=2, student_steps=5, expert_steps=3)
    args = _cli("run", str(config), f"run.output_dir={tmp_path}")
    student, expert, opd = tmp_path / "tiny/student_sft", tmp_path / "tiny/experts/arith", tmp_path / "tiny/opd"
    preempt = {"MEGATRON_OPD_FAULT": "signal:0:2"}  # rank 0 gets SIGUSR1 after step 2 (first attempt)

    # The warm start (the longest job, first) is preempted: nothing after it runs.
    first = _run(args, tmp_path / "1.log", **preempt)
    assert first.returncode == EXIT_STOPPED_EARLY, _tail(first)
    assert read_summary(student)["step"] == 2 and not read_summary(student)["finished"]
    assert read_summary(expert) is None and not opd.exists()

    # The rerun resumes the warm start to its end; then the expert is preempted.
    second = _run(args, tmp_path / "2.log", **preempt)
    assert second.returncode == EXIT_STOPPED_EARLY, _tail(second)
    assert f"resumed from {student / 'checkpoints' / 'step_00000002'}" in second.stdout
    assert (read_summary(student)["step"], read_summary(student)["finished"]) == (5, True)
    assert read_summary(expert)["step"] == 2 and not read_summary(expert)["finished"]
    assert not opd.exists()

    # The last rerun resumes the expert, skips the finished warm start, and distils.
    third = _run(args, tmp_path / "3.log")
    assert third.returncode == 0, _tail(third)
    assert f"resumed from {expert / 'checkpoints' / 'step_00000002'}" in third.stdout
    assert "student (5 steps)" not in third.stdout
    assert (read_summary(expert)["step"], read_summary(expert)["finished"]) == (3, True)
    for run_dir, steps in ((student, 5), (expert, 3)):
        assert [e["step"] for e in _ledger(run_dir)] == list(range(1, steps + 1)), run_dir
    assert read_summary(opd)["finished"] and read_summary(tmp_path / "tiny")["opd_steps"] == 2
