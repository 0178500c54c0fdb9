"""Real jobs on a real single-node SLURM (slurmctld + slurmd + munge, started by .ci/slurm-setup.sh).

Each test renders a job with `launchers.slurm`, submits it with the real sbatch and watches it
run: the trainer under torchrun or ft_launcher, embedded teacher servers as their own job steps,
per-role logs, the preemption signal, requeue and resume, a hung rank found by heartbeats; and
the recipe as a chain of jobs with afterok dependencies (`megatron-opd submit` of a recipe config).
The jobs run this checkout's code (PYTHONPATH) with this interpreter, and write into tmp dirs.

Without SLURM the tests start it (as root, with apt); where that is impossible they skip, unless
OPD_REQUIRE_SLURM=1 (CI), which turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / ".ci" / "slurm-setup.sh"


def _slurm_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    if "is UP" not in ping.stdout:
        return False
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.split()
    return any(s in ("idle", "mixed", "allocated", "completing") for s in state)


@pytest.fixture(scope="module")
def slurm():
    """A working SLURM: the one that runs, or one started by .ci/slurm-setup.sh."""
    if _slurm_up():
        return
    why = ""
    if os.geteuid() != 0:
        why = "SLURM is not running and starting it needs root"
    elif not shutil.which("apt-get") and not shutil.which("slurmctld"):
        why = "SLURM is not running and neither apt-get nor slurmctld is available to start it"
    else:
        result = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=600)
        if result.returncode == 0 and _slurm_up():
            return
        why = f".ci/slurm-setup.sh failed (status {result.returncode}):\n{result.stderr[-3000:]}"
    if os.environ.get("OPD_REQUIRE_SLURM") == "1":
        pytest.fail(f"OPD_REQUIRE_SLURM=1 but {why}")
    pytest.skip(why)


# ---------------------------------------------------------------------------------------------
# Helpers


def _free_port() -> int:
    from megatron_opd.runtime.spawn import free_port

    return free_port()


def _tiny_model() -> dict:
    return yaml.safe_load((REPO / "configs/tiny/opd.yaml").read_text())["model"]


def _cluster(tmp: Path, **trainer) -> dict:
    """A colocated one-node cluster section: every role on this machine, small --mem each."""
    return {
        "layout": "colocated",
        "gpus_per_node": 0,
        "cpus_per_node": 2,
        "exclusive": False,
        "time": "00:15:00",
        "signal_seconds": 120,
        "max_requeues": 2,
        "python": sys.executable,
        "env": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        "workdir": str(tmp),
        "base_port": _free_port(),
        "health_timeout_s": 180,
        "trainer": {"nodes": 1, "procs_per_node": 2, "mem": "4000M", "rdzv_port": _free_port(), "stop_timeout_s": 30, **trainer},
    }


def _submit(job: dict, tmp: Path) -> tuple[str, Path]:
    """Write the job YAML, submit it through the CLI entry (a subprocess, like a user); return (id, log dir)."""
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "launchers.slurm", str(path)], capture_output=True, text=True, env=env, cwd=tmp, timeout=120
    )
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().splitlines()[-1]
    assert job_id.isdigit(), result.stdout
    return job_id, tmp / "runs" / job["run"]["name"] / "slurm"


def _job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    match = re.search(r"JobState=(\S+)", out)
    return match.group(1) if match else "GONE"


def _job_field(job_id: str, key: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    match = re.search(rf"\b{key}=(\S+)", out)
    return match.group(1) if match else ""


def _wait_for(predicate, timeout_s: float, what: str, logs: Path | None = None, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{_dump(logs) if logs else ''}")


def _dump(logs: Path) -> str:
    parts = []
    for f in sorted(logs.rglob("*.log")):
        text = f.read_text(errors="replace").splitlines()
        parts.append(f"==== {f}\n" + "\n".join(line for line in text[-40:] if "warn" not in line.lower()))
    return "\n".join(parts)


def _wait_done(job_id: str, logs: Path, timeout_s: float) -> str:
    state = _wait_for(
        lambda: (s := _job_state(job_id)) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "GONE") and s,
        timeout_s, f"job {job_id} to end", logs, poll_s=1.0,
    )  # fmt: skip
    return state


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _pid_of_server(port: int) -> int | None:
    """The embedded teacher server process listening on `port` (started by our job)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv]
        if "megatron_opd.serving" in words and "--port" in words and words[words.index("--port") + 1] == str(port):
            return int(proc.name)
    return None


@pytest.fixture
def cancel_on_failure():
    """scancel the test's jobs if it fails, so that a broken job does not hold the node."""
    jobs: list[str] = []
    yield jobs
    for job_id in jobs:
        if _job_state(job_id) not in ("COMPLETED", "FAILED", "CANCELLED", "GONE"):
            subprocess.run(["scancel", job_id], capture_output=True)


# ---------------------------------------------------------------------------------------------
# Tests


def test_tiny_job_teachers_preemption_requeue_resume(slurm, tmp_path, cancel_on_failure):
    """One real OPD job, watched through its life:

    attempt 0: two embedded teacher replicas (job steps), /health waited on, 2 trainer ranks
    under torchrun talking to them; replica 1 is killed mid-run: the trainer's client fails over
    to replica 0 and the batch script restarts replica 1; then SLURM's warning signal (USR1 to
    the batch shell) makes the ranks save a checkpoint and stop, and the job requeues itself.
    attempt 1: same script; the trainer resumes from that checkpoint and finishes. The sample
    ledger lists every step's samples exactly once; each role wrote its own log per attempt.
    """
    from megatron_opd.data.tokenizer import CharTokenizer
    from megatron_opd.models.config import ModelConfig
    from megatron_opd.models.model_dir import write_model_dir

    # Enough steps that replica 1 is back (about 10 s) long before the trainer could finish; the
    # step rate varies 5x with the load on this shared machine.
    steps = 150
    teacher_dir = tmp_path / "teacher"
    write_model_dir(teacher_dir, ModelConfig(**_tiny_model()), CharTokenizer())
    cluster = _cluster(tmp_path)
    cluster["teachers"] = {
        "arith": {
            "backend": "embedded",
            "model_path": str(teacher_dir),
            "extra_args": ["--random-init", "--threads", "1"],
            "replicas": 2,
            "restart_delay_s": 1,
            "router": False,  # the trainer's client fails over between the replicas itself
            "mem": "1500M",
        }
    }
    job = {
        "stage": "opd",
        "run": {"name": "tiny-opd", "output_dir": str(tmp_path / "runs"), "progress": "lines", "log_every": 1},
        "parallel": {"tp": 2},
        "model": _tiny_model(),
        "train": {"steps": steps, "micro_batch_size": 8, "global_batch_size": 8, "checkpoint_every": 0,
                  "eval_every": 0, "eval_at_start": False},
        "data": {"domains": ["add"], "eval_size": 16},
        "teachers": {"arith": {"domains": ["add"], "signal": "logits", "retry_backoff_s": 0.2}},
        "rollout": {"engine": "embedded", "max_new_tokens": 6},
        "cluster": cluster,
    }  # fmt: skip
    job_id, log_dir = _submit(job, tmp_path)
    cancel_on_failure.append(job_id)
    first = log_dir / f"job-{job_id}-0"
    trainer_log = first / f"trainer-{os.uname().nodename.split('.')[0]}.log"

    def step_reached(log: Path, n: int) -> bool:
        found = re.findall(r"\[opd\] step (\d+)/", _read(log))
        return bool(found) and int(found[-1]) >= n

    # The trainer starts only after every replica answered /health.
    _wait_for(lambda: step_reached(trainer_log, 2), 150, "the trainer's step 2", log_dir)
    batch_log = log_dir / f"job-{job_id}.log"
    assert batch_log.read_text().count("ready: http://") == 2

    # Crash replica 1 (SIGKILL): the client fails over, the batch script restarts the replica.
    port1 = cluster["base_port"] + 1
    pid = _wait_for(lambda: _pid_of_server(port1), 10, f"the server on port {port1}")
    os.kill(pid, signal.SIGKILL)
    replica1_log = next(first.glob("teacher-arith-1-*.log"))
    _wait_for(lambda: _read(replica1_log).count("teacher server ready") >= 2, 90, "replica 1 to be restarted", log_dir)
    assert "teacher-arith-1 exited with status" in batch_log.read_text()
    assert not step_reached(trainer_log, steps), "the trainer finished before the preemption signal: raise steps"

    # SLURM's warning signal, exactly as --signal=B:USR1@N delivers it: to the batch shell only.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    second = log_dir / f"job-{job_id}-1"
    _wait_for(second.exists, 120, "the requeued attempt", log_dir)
    assert (first / "stopped").exists(), "rank 0 did not write the stop marker after its checkpoint"
    stopped_step = int(re.search(r"step (\d+)", (first / "stopped").read_text()).group(1))
    assert 2 <= stopped_step < steps
    assert f"stopped by SIGUSR1 at step {stopped_step}" in _read(trainer_log)

    state = _wait_done(job_id, log_dir, 240)
    assert state == "COMPLETED", f"job ended {state}\n{_dump(log_dir)}"
    assert _job_field(job_id, "Restarts") == "1"
    text = batch_log.read_text()
    assert "requeueing job" in text and "trainer finished with status 0" in text

    # The second attempt resumed from the stop checkpoint and finished the run.
    trainer2 = second / trainer_log.name
    assert f"resumed from {tmp_path / 'runs' / 'tiny-opd' / 'checkpoints' / f'step_{stopped_step:08d}'}" in _read(trainer2)
    summary = json.loads((tmp_path / "runs/tiny-opd/summary.json").read_text())
    assert summary["stopped_early"] == 0.0

    # No sample lost or repeated across the interruption.
    from megatron_opd.stages.trainer import read_ledger

    ledger = read_ledger(tmp_path / "runs/tiny-opd")
    assert [e["step"] for e in ledger] == list(range(1, steps + 1))
    ids = [i for e in ledger for i in e["samples"]]
    assert len(ids) == steps * 8 and len(set(ids)) == len(ids)

    # One log per role and node, per attempt.
    for attempt in (first, second):
        names = sorted(p.name.rsplit("-", 1)[0] for p in attempt.glob("*.log"))
        assert names == ["teacher-arith-0", "teacher-arith-1", "trainer"], names


def test_hung_rank_detected_by_ft_launcher_heartbeats(slurm, tmp_path, cancel_on_failure):
    """Rank 1 hangs after step 5 on the first attempt (the trainer's fault hook MEGATRON_OPD_FAULT):
    ft_launcher's rank monitor
    misses its heartbeats, restarts the group, the ranks resume from the step-4 checkpoint and the
    job completes with every sample trained once.

    The rank timeout must exceed a step plus a checkpoint save (about 6 s on 2 busy cores here):
    the trainer sends its heartbeat after each step, and saves come between two heartbeats."""
    steps = 8
    cluster = _cluster(
        tmp_path,
        launcher="ft_launcher",
        max_restarts=2,
        initial_heartbeat_timeout_s=90,
        heartbeat_timeout_s=20,
        launcher_args=["--ft-restart-check-interval=1", "--ft-workload-check-interval=1", "--monitor-interval=1"],
        env={"MEGATRON_OPD_FAULT": "hang:1:5"},
    )
    job = {
        "stage": "sft",
        "run": {"name": "tiny-hang", "output_dir": str(tmp_path / "runs"), "progress": "lines", "log_every": 1},
        "parallel": {"tp": 1},
        "model": {**_tiny_model(), "max_seq_len": 32},
        "train": {"steps": steps, "micro_batch_size": 8, "global_batch_size": 16, "checkpoint_every": 2,
                  "eval_every": 0, "eval_at_start": False},
        "data": {"domains": ["add", "sort"], "eval_size": 16},
        "cluster": cluster,
    }  # fmt: skip
    job_id, log_dir = _submit(job, tmp_path)
    cancel_on_failure.append(job_id)
    state = _wait_done(job_id, log_dir, 300)
    assert state == "COMPLETED", f"job ended {state}\n{_dump(log_dir)}"
    trainer_log = next((log_dir / f"job-{job_id}-0").glob("trainer-*.log")).read_text(errors="replace")
    assert "[sft] step 5/" in trainer_log
    # Found by the missing heartbeats of a rank that had been sending them, not by a start-up timeout.
    assert "Did not get subsequent heartbeat" in trainer_log
    assert "Did not get initial heartbeat" not in trainer_log
    run_dir = tmp_path / "runs/tiny-hang"
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000004'}" in trainer_log
    assert _job_field(job_id, "Restarts") == "0", "a hang is handled inside the job, not by a requeue"

    from megatron_opd.stages.trainer import read_ledger

    ledger = read_ledger(run_dir)
    assert [e["step"] for e in ledger] == list(range(1, steps + 1))
    ids = [i for e in ledger for i in e["samples"]]
    assert len(ids) == steps * 16 and len(set(ids)) == len(ids)


def test_grpo_job_with_its_rollout_pool(slurm, tmp_path, cancel_on_failure, monkeypatch):
    """A real GRPO job (stages/grpo.py) with its rollout pool beside the trainer: one embedded
    SGLang-compatible rollout server (random weights) as its own job step, /health waited on,
    then 2 trainer ranks (TP=2) under torchrun sampling through it (rollout.engine=sglang, the
    router-free endpoint and the key's variable name passed by the script). The trainer pushes
    its weights before the first rollout and after every step (disk sync), so every update is
    on-policy (ratio 1: the server's log-probs of its samples are the trainer's); the job
    completes with every step's samples in the ledger once and each role's own log."""
    from megatron_opd.data.tokenizer import CharTokenizer
    from megatron_opd.models.config import ModelConfig
    from megatron_opd.models.model_dir import write_model_dir

    monkeypatch.setenv("OPD_ROLLOUT_KEY", "test-rollout-key")  # sbatch exports it to the job
    steps = 4
    server_dir = tmp_path / "rollout-model"
    write_model_dir(server_dir, ModelConfig(**_tiny_model()), CharTokenizer())
    cluster = _cluster(tmp_path)
    cluster["api_key_env"] = "OPD_ROLLOUT_KEY"
    cluster["rollout"] = {
        "backend": "embedded",
        "model_path": str(server_dir),
        "extra_args": ["--random-init", "--threads", "1"],
        "replicas": 1,
        "router": False,
        "mem": "1500M",
    }
    job = {
        "stage": "grpo",
        "run": {"name": "tiny-grpo", "output_dir": str(tmp_path / "runs"), "progress": "lines", "log_every": 1},
        "parallel": {"tp": 2},
        "model": _tiny_model(),
        "train": {"steps": steps, "micro_batch_size": 8, "global_batch_size": 8, "checkpoint_every": 2,
                  "eval_every": 0, "eval_at_start": False},
        "data": {"domains": ["add"], "eval_size": 16},
        "rollout": {"engine": "sglang", "max_new_tokens": 4, "weight_sync": "disk"},
        "grpo": {"group_size": 4},
        "cluster": cluster,
    }  # fmt: skip
    job_id, log_dir = _submit(job, tmp_path)
    cancel_on_failure.append(job_id)
    state = _wait_done(job_id, log_dir, 600)
    assert state == "COMPLETED", f"job ended {state}\n{_dump(log_dir)}"
    run_dir = tmp_path / "runs/tiny-grpo"
    assert json.loads((run_dir / "summary.json").read_text())["finished"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if "train/loss" in r}
    assert sorted(train) == list(range(1, steps + 1))
    for s, r in train.items():
        assert abs(r["train/ratio"] - 1.0) < 1e-4, (s, r["train/ratio"])
        assert "train/reward/add" in r and r["train/rollout_tokens_per_s"] > 0
    assert sorted(p.name for p in (run_dir / "rollout_weights").iterdir()) == [f"step_{steps:08d}"]
    from megatron_opd.stages.trainer import read_ledger

    ids = [i for e in read_ledger(run_dir) for i in e["samples"]]
    assert len(ids) == steps * 8 and len(set(ids)) == len(ids)
    first = log_dir / f"job-{job_id}-0"
    names = sorted(p.name.rsplit("-", 1)[0] for p in first.glob("*.log"))
    assert names == ["rollout-0", "trainer"], names
    assert "trainer finished with status 0" in (log_dir / f"job-{job_id}.log").read_text()



# ---------------------------------------------------------------------------------------------
# The recipe as a chain of jobs (launchers/recipe.py chain, `megatron-opd submit` of a recipe)


def _jobs_now(ids: list[str]) -> dict[str, dict[str, str]]:
    """{job id: its scontrol fields} for the jobs of `ids` the controller still knows."""
    out = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True).stdout
    jobs = {}
    for line in out.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if fields.get("JobId") in ids:
            jobs[fields["JobId"]] = fields
    return jobs


_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED")


def _recipe_config(tmp_path: Path, methods: list[str], **recipe) -> Path:
    """tests/test_recipe.py's cut-down recipe (three domains with a conflicting pair, one seed, a
    few steps) with `methods`, as a chain of one-core jobs on the test node: two at a time on 2
    cores, each batch shell lowering its own priority first so the chain yields to the rest of the suite."""
    from test_recipe import _cut_down

    config = yaml.safe_load(_cut_down(tmp_path).read_text())
    config["recipe"].update(methods=methods, method_overrides={}, **recipe)  # the cut-down's overrides are mixed RL's
    cluster = _cluster(tmp_path)
    config["cluster"] = {
        **{k: cluster[k] for k in ("layout", "gpus_per_node", "exclusive", "python", "env", "workdir")},
        "job_name": "recipe-chain",
        "cpus_per_node": 1,
        "time": "00:20:00",
        "signal_seconds": 120,
        "max_requeues": 1,
        "setup": ["renice -n 19 -p $$ >/dev/null"],
        "trainer": {"nodes": 1, "procs_per_node": 1, "mem": "3000M"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _submit_recipe(path: Path, cancel_on_failure: list[str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """`megatron-opd submit` of the recipe (a subprocess, like a user); ({phase: the phases it
    needs}, {phase: job id}), after checking that the controller holds every job's afterok
    dependencies while the jobs that have some are still pending."""
    from launchers.recipe import phases, plan_seed
    from megatron_opd.config import load_config

    cfg = load_config(path)
    want = {p.id: p.needs for s in cfg.recipe.seeds for p in phases(cfg, plan_seed(cfg, s))}
    want["report"] = [f"seed{s}/report" for s in cfg.recipe.seeds]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    submit = [sys.executable, "-m", "megatron_opd.cli", "submit", str(path)]
    result = subprocess.run(submit, capture_output=True, text=True, env=env, cwd=path.parent, timeout=300)
    # Whatever was submitted is cancelled if the test fails, even when the submission itself failed.
    queued = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True).stdout.splitlines()
    queued = [line.split() for line in queued]
    cancel_on_failure.extend(job_id for job_id, name in queued if name.startswith("recipe-chain-"))
    assert result.returncode == 0, result.stdout + result.stderr
    ids = dict(line.split(" ", 1)[::-1] for line in result.stdout.splitlines())  # phase -> job id
    cancel_on_failure.extend(i for i in ids.values() if i not in cancel_on_failure)
    assert sorted(ids) == sorted(want), result.stdout

    # The dependencies as the controller holds them, before any dependent job could run.
    first = _jobs_now(list(ids.values()))
    for phase, needs in want.items():
        job = first[ids[phase]]
        assert job["JobName"] == f"recipe-chain-{phase.replace('/', '-')}"
        for need in needs:
            assert f"afterok:{ids[need]}" in job["Dependency"], (phase, job["Dependency"])
        if needs:
            assert job["JobState"] == "PENDING", (phase, job["JobState"])
        else:
            assert job["Dependency"] == "(null)", (phase, job["Dependency"])
    return want, ids


def _watch_chain(ids: dict[str, str], logs: Path, timeout_s: float, every_poll=None) -> dict[str, dict[str, str]]:
    """Wait until every job of the chain completed; {phase: its last scontrol fields} (kept as
    they come: the controller forgets an ended job after MinJobAge). A job that ended otherwise
    fails the test at once (its dependents would wait forever); `every_poll(fields)` is called
    on each poll."""
    last: dict[str, dict[str, str]] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        last.update(_jobs_now(list(ids.values())))
        if every_poll:
            every_poll(last)
        states = {phase: last.get(job_id, {}).get("JobState", "GONE") for phase, job_id in ids.items()}
        bad = {phase: s for phase, s in states.items() if s in _ENDED and s != "COMPLETED"}
        assert not bad, f"jobs ended badly: {bad}\n{_dump(logs)}"
        if all(s == "COMPLETED" for s in states.values()):
            return {phase: last[job_id] for phase, job_id in ids.items()}
        assert time.monotonic() < deadline, f"the chain did not finish in {timeout_s:.0f} s: {states}\n{_dump(logs)}"
        time.sleep(1)


def _times(jobs: dict[str, dict[str, str]], key: str) -> dict:
    from datetime import datetime

    return {phase: datetime.fromisoformat(job[key]) for phase, job in jobs.items()}


def _check_order(want: dict[str, list[str]], jobs: dict[str, dict[str, str]]) -> None:
    """Each job started only after every job it needs had ended (SLURM's times, 1 s resolution)."""
    start, end = _times(jobs, "StartTime"), _times(jobs, "EndTime")
    for phase, needs in want.items():
        for need in needs:
            assert start[phase] >= end[need], (phase, start[phase], need, end[need])


def _check_summary(run_dir: Path, methods: list[str], steps: int, samples_per_step: int) -> None:
    """The report: every expert and every method on every domain, the budget and the seed."""
    from test_recipe import DOMAINS

    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["experts"]) == set(DOMAINS)
    assert all(0 <= a <= 1 for a in summary["experts"].values())
    assert list(summary["methods"]) == methods
    for m in methods:
        assert set(summary["methods"][m]) == set(DOMAINS), m
        assert all(0 <= a <= 1 for a in summary["methods"][m].values()), m
    assert summary["budget"]["optimizer_steps"] == steps and summary["budget"]["samples"] == steps * samples_per_step
    assert summary["seeds"] == [7]


# Twelve jobs of one seed, each its own `megatron-opd run` (a Python start and at least one
# world of spawned ranks): two to three minutes on 2 cores.
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_recipe_chain_runs_on_slurm_with_its_dependencies(slurm, tmp_path, cancel_on_failure):
    """`megatron-opd submit` of a cut-down recipe (three domains with a conflicting pair, one seed,
    a few steps, experts by SFT then GRPO; OPD from hidden states with the experts in the trainer,
    OPD from top-k with the experts' servers started by its job, mixed SFT on the experts' samples
    and a TIES merge) submits the whole chain to the real slurmctld:
    one job per phase with afterok dependencies, as the controller shows them before anything
    ran. Every job completes; each started only after the jobs it needs had ended; the experts
    ran in parallel (each needs only the base); and the last job wrote the recipe's summary with
    every expert and every method on every domain, the budget and the seed."""
    methods = ["opd_hidden", "opd_topk", "mixed_sft", "ties"]
    path = _recipe_config(tmp_path, methods)
    assert yaml.safe_load(path.read_text())["recipe"]["hidden_placement"] == "in_job"
    want, ids = _submit_recipe(path, cancel_on_failure)
    logs = tmp_path / "runs" / "cut" / "slurm"
    jobs = _watch_chain(ids, logs, 1800)
    _check_order(want, jobs)
    # The experts in parallel: two of them ran at the same time (one core each on a node of 2 or more).
    start, end = _times(jobs, "StartTime"), _times(jobs, "EndTime")
    sft = [p for p in ids if p.startswith("seed7/experts/") and p.endswith("/sft")]
    assert len(sft) == 3 and all(f"{p[:-3]}grpo" in ids for p in sft)
    node_cpus = int(subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True).stdout.split()[0].rstrip("+"))
    overlap = any(start[a] < end[b] and start[b] < end[a] for a in sft for b in sft if a < b)
    assert node_cpus < 2 or overlap, {p: (start[p], end[p]) for p in sft}
    assert all(job["Restarts"] == "0" for job in jobs.values())
    _check_summary(tmp_path / "runs" / "cut", methods, 4, 24)
    # Top-k's job started the experts' servers on its node; hidden's trainer loaded the experts.
    method_log = lambda m: _read(logs / "seed7" / "methods" / m / f"job-{ids[f'seed7/methods/{m}']}.log")  # noqa: E731
    assert "teacher servers ready" in method_log("opd_topk") and "teacher servers ready" not in method_log("opd_hidden")
    # The table was printed by the last job, into its own log.
    report_log = (logs / "report" / f"job-{ids['report']}.log").read_text()
    assert all(m in report_log for m in methods)


# Seven jobs, one of them twice: about two minutes on 2 cores.
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_recipe_chain_phase_preempted_requeues_and_its_dependents_wait(slurm, tmp_path, cancel_on_failure):
    """SLURM's warning signal (USR1 to the batch shell, as --signal=B:USR1@N sends it) to the OPD
    phase's job (sampled-token signal, from the experts' servers) mid-run: `megatron-opd run recipe.only=...` saves a checkpoint and exits 75, the
    job requeues itself, the second attempt starts new teacher servers and resumes from that
    checkpoint; the phases after it wait for that attempt (afterok holds through the requeue),
    and the chain completes with every sample of the method trained once."""
    from megatron_opd.stages.trainer import read_ledger

    steps = 150  # the OPD phase must outlast the poll that signals it (5-15 steps a second here)
    budget = [f"train.steps={steps}", "train.global_batch_size=24", "train.micro_batch_size=24"]
    path = _recipe_config(tmp_path, ["opd_sampled", "uniform"], budget_overrides=budget)
    config = yaml.safe_load(path.read_text())
    config["pipeline"]["expert_rl_overrides"] = []  # SFT experts: fewer jobs before the one that is stopped
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    want, ids = _submit_recipe(path, cancel_on_failure)
    run_dir = tmp_path / "runs" / "cut"
    logs = run_dir / "slurm"
    opd = ids["seed7/methods/opd_sampled"]
    log = logs / "seed7" / "methods" / "opd_sampled" / f"job-{opd}.log"

    def step() -> int:
        found = re.findall(r"\[opd\] step (\d+)/", _read(log))
        return int(found[-1]) if found else 0

    signalled: list[int] = []

    def signal_once(last: dict[str, dict[str, str]]) -> None:
        if not signalled and last.get(opd, {}).get("JobState") == "RUNNING" and step() >= 5:
            subprocess.run(["scancel", "--batch", "--signal=USR1", opd], check=True)
            signalled.append(step())

    jobs = _watch_chain(ids, logs, 1800, signal_once)
    assert signalled, "the OPD phase ended before it was signalled"
    assert jobs["seed7/methods/opd_sampled"]["Restarts"] == "1"
    assert all(job["Restarts"] == "0" for phase, job in jobs.items() if phase != "seed7/methods/opd_sampled")
    text = _read(log)
    stopped = int(re.search(r"stopped by \w+ at step (\d+); checkpoint saved", text).group(1))
    assert signalled[0] <= stopped < steps, "the OPD phase finished before the signal reached it: raise steps"
    assert f"resumed from {run_dir / 'seed7' / 'methods' / 'opd_sampled' / 'checkpoints' / f'step_{stopped:08d}'}" in text
    assert text.count("teacher servers ready") == 2  # each attempt starts its own
    _check_order(want, jobs)  # the seed's report started after the second attempt ended
    ledger = read_ledger(run_dir / "seed7" / "methods" / "opd_sampled")
    assert [e["step"] for e in ledger] == list(range(1, steps + 1))
    ids_trained = [i for e in ledger for i in e["samples"]]
    assert len(ids_trained) == steps * 24 and len(set(ids_trained)) == len(ids_trained)
    _check_summary(run_dir, ["opd_sampled", "uniform"], steps, 24)
