"""Resiliency hooks: stop signals, the stop marker, settings from the environment, heartbeats.

The collective part runs on a real 2-rank gloo world (spawn_world). Heartbeats to a real NVRx rank
monitor, and a hung rank found by them and restarted by ft_launcher, are tested on real SLURM in
tests/test_slurm_jobs.py, with the signal forwarding, requeue and resume.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from megatron_opd.runtime.resiliency import Resiliency, ResiliencyConfig
from megatron_opd.runtime.spawn import spawn_world

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_signal_stops_and_marker_written_after_close(tmp_path, restore_signals):
    marker = tmp_path / "logs" / "stopped"
    r = Resiliency(ResiliencyConfig(stop_marker=str(marker)))
    r.on_step(1)
    assert not r.should_stop()
    os.kill(os.getpid(), signal.SIGUSR1)
    r.on_step(2)
    assert r.should_stop() and r.received == "SIGUSR1"
    assert not marker.exists(), "the marker must wait for close(), after the checkpoint"
    r.close()
    assert marker.read_text().splitlines() == ["step 2", "signal SIGUSR1"]


def test_no_marker_without_a_stop(tmp_path, restore_signals):
    marker = tmp_path / "stopped"
    r = Resiliency(ResiliencyConfig(stop_marker=str(marker)))
    r.on_step(1)
    assert not r.should_stop()
    r.close()
    assert not marker.exists()


def test_config_from_env():
    cfg = ResiliencyConfig.from_env(
        {"OPD_STOP_SIGNALS": "SIGTERM", "OPD_HEARTBEATS": "off", "OPD_STOP_MARKER": "/x/stopped"}
    )
    assert (cfg.stop_signals, cfg.heartbeats, cfg.stop_marker) == (["SIGTERM"], "off", "/x/stopped")
    assert ResiliencyConfig.from_env({}) == ResiliencyConfig()
    with pytest.raises(ValueError, match="OPD_HEARTBEATS='yes'"):
        ResiliencyConfig.from_env({"OPD_HEARTBEATS": "yes"})


def test_heartbeats_on_without_ft_launcher_is_an_error(monkeypatch, restore_signals):
    monkeypatch.delenv("FT_RANK_MONITOR_IPC_SOCKET", raising=False)
    with pytest.raises(RuntimeError, match="start the ranks with ft_launcher"):
        Resiliency(ResiliencyConfig(heartbeats="on"))
    assert not Resiliency(ResiliencyConfig(heartbeats="auto")).monitored


def _signal_on_rank1_stops_all(marker: str) -> tuple[bool, bool, str | None]:
    import torch.distributed as dist

    from megatron_opd.runtime.distributed import init_process_group

    init_process_group()
    r = Resiliency(ResiliencyConfig(stop_marker=marker))
    first = r.should_stop()
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    r.on_step(3)
    second = r.should_stop()
    r.close()
    return first, second, r.received


def test_a_signal_on_one_rank_stops_every_rank(tmp_path):
    marker = tmp_path / "stopped"
    results = spawn_world(_signal_on_rank1_stops_all, 2, (str(marker),), timeout_s=120)
    assert [(a, b) for a, b, _ in results] == [(False, True), (False, True)]
    assert [received for _, _, received in results] == [None, "SIGTERM"]
    # Rank 0 writes the marker even though the signal reached rank 1 only.
    assert marker.read_text().splitlines() == ["step 3", "signal on another rank"]


def test_a_signal_before_the_trainer_exists_is_held_not_fatal(restore_signals):
    from megatron_opd.runtime.resiliency import hold_stop_signals

    hold_stop_signals()
    os.kill(os.getpid(), signal.SIGTERM)  # would end this process without the hold
    r = Resiliency(ResiliencyConfig())
    assert r.received == "SIGTERM" and r.should_stop()
    assert Resiliency(ResiliencyConfig()).received is None  # taken over once
