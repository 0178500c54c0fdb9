"""Who a process is, from torchrun's or SLURM's environment, and the multi-process harness."""

from __future__ import annotations

import os
import time

import pytest

from megatron_opd.runtime.distributed import LaunchEnvError, expand_hostlist, process_env
from megatron_opd.runtime.spawn import WorldFailed, spawn_world


def test_torchrun_env():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    p = process_env(env)
    assert (p.rank, p.world_size, p.local_rank, p.master_addr, p.master_port, p.source) == (
        3, 4, 1, "10.0.0.1", 29500, "torchrun")


def test_torchrun_env_missing_variable_is_named():
    with pytest.raises(LaunchEnvError, match="MASTER_PORT is not set"):
        process_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "x"})
    with pytest.raises(LaunchEnvError, match="RANK is not set"):
        process_env({"WORLD_SIZE": "2"})


def test_slurm_env_master_from_nodelist_and_port_from_job():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[007-009,012],login1", "SLURM_JOB_ID": "123456"}
    p = process_env(env)
    assert (p.rank, p.world_size, p.local_rank, p.source) == (5, 8, 1, "slurm")
    assert p.master_addr == "gpu007"
    assert p.master_port == 20000 + 123456 % 20000
    with pytest.raises(LaunchEnvError, match="SLURM_LOCALID is not set"):
        process_env({k: v for k, v in env.items() if k != "SLURM_LOCALID"})
    with pytest.raises(LaunchEnvError, match="SLURM_JOB_NODELIST"):
        process_env({k: v for k, v in env.items() if k != "SLURM_JOB_NODELIST"})


def test_single_process_without_launcher():
    assert process_env({}).source == "single"


def test_expand_hostlist():
    assert expand_hostlist("a[01-03],b,c[7,9-10]") == ["a01", "a02", "a03", "b", "c7", "c9", "c10"]
    assert expand_hostlist("node1") == ["node1"]


# -- the harness ------------------------------------------------------------------------------

def _rank_and_env():
    import torch.distributed as dist

    from megatron_opd.runtime.distributed import init_process_group

    init_process_group()
    import torch

    t = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(t)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), t.item()


def _fail_on_rank_one():
    if os.environ["RANK"] == "1":
        raise ValueError("boom on purpose")
    time.sleep(30)  # the harness must not wait for this rank


def _hang():
    time.sleep(60)


def test_spawn_world_runs_every_rank():
    out = spawn_world(_rank_and_env, 3, timeout_s=60)
    assert out == [(0, 3, 6.0), (1, 3, 6.0), (2, 3, 6.0)]


def test_spawn_world_reports_failing_rank_traceback():
    start = time.monotonic()
    with pytest.raises(WorldFailed) as e:
        spawn_world(_fail_on_rank_one, 2, timeout_s=60)
    assert "rank 1 failed" in str(e.value) and "ValueError: boom on purpose" in str(e.value)
    assert time.monotonic() - start < 25


def test_spawn_world_deadline():
    with pytest.raises(WorldFailed, match="ran past its 3 s deadline"):
        spawn_world(_hang, 2, timeout_s=3)


# -- a launcher's stop signal reaches its ranks (forward_stop_signals) -------------------------------


def _wait_for_stop(ready_dir: str, honour: bool):
    """A rank that holds stop signals, says it is ready, and returns the one it got (or ignores it)."""
    from megatron_opd.runtime import resiliency

    resiliency.hold_stop_signals()
    open(os.path.join(ready_dir, os.environ["RANK"]), "w").close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if resiliency._held and honour:
            return list(resiliency._held)
        time.sleep(0.05)
    return []


def _signal_when_ready(ready_dir, ranks: int, sig) -> None:
    """Send `sig` to this (launcher) process once every rank is ready, from another thread."""
    import threading

    def send():
        deadline = time.monotonic() + 60
        while len(os.listdir(ready_dir)) < ranks and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), sig)

    threading.Thread(target=send, daemon=True).start()


def test_a_launcher_forwards_its_stop_signal_to_every_rank_and_starts_no_new_world(tmp_path):
    import signal

    from megatron_opd.runtime.spawn import StopRequested, forward_stop_signals, stop_requested

    # What was there before (the default handler in a terminal; SIG_IGN under `nohup cmd &`).
    before = signal.getsignal(signal.SIGINT)
    with forward_stop_signals():
        assert signal.getsignal(signal.SIGINT) is not before
        _signal_when_ready(str(tmp_path), 2, signal.SIGINT)
        out = spawn_world(_wait_for_stop, 2, (str(tmp_path), True), timeout_s=90)
        assert out == [["SIGTERM"], ["SIGTERM"]]  # SIGINT to the launcher, SIGTERM to the ranks
        assert stop_requested() == "SIGINT"
        with pytest.raises(StopRequested, match="received SIGINT"):
            spawn_world(_wait_for_stop, 1, (str(tmp_path), True), timeout_s=30)
    assert stop_requested() is None and signal.getsignal(signal.SIGINT) is before


def test_ranks_that_do_not_stop_are_killed_after_the_stop_timeout(tmp_path):
    import signal

    from megatron_opd.runtime.spawn import forward_stop_signals

    with forward_stop_signals():
        _signal_when_ready(str(tmp_path), 2, signal.SIGTERM)
        start = time.monotonic()
        with pytest.raises(WorldFailed, match="did not save and return within 2 s"):
            spawn_world(_wait_for_stop, 2, (str(tmp_path), False), timeout_s=90, stop_timeout_s=2)
        assert time.monotonic() - start < 40
