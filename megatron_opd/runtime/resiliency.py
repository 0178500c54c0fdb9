"""Resiliency hooks of the training loop: stop signals, ft_launcher heartbeats, the stop marker.

The trainer calls `on_step(step)` after every optimizer step and stops cleanly, with a checkpoint,
when `should_stop()` says so, then `close()` at the end. What happens behind those calls:

- Stop signals (SIGTERM, SIGUSR1: SLURM's `--signal=B:USR1@<s>` warning, forwarded by the batch
  script and the launcher) set a flag; `should_stop` is collective (an all-reduce), so a signal
  seen by any rank stops every rank at the same step and the checkpoint they write together is
  complete.
- Under NVRx's `ft_launcher` (it sets FT_RANK_MONITOR_IPC_SOCKET), a `RankMonitorClient`
  connects to the rank monitor when the trainer starts and sends a heartbeat after every step.
  The monitor's initial timeout covers set-up until the first step ends; its rank timeout each
  later step (plus evaluation and checkpoints). A rank that misses it is a hang: ft_launcher
  stops the group and starts it again (`--max-restarts`), and the ranks resume from the newest
  complete checkpoint.
- After a stop, `close()` on rank 0 (the checkpoint is complete by then) writes the file named by
  OPD_STOP_MARKER: the SLURM batch script requeues the job when it finds it.

A signal that arrives before the trainer's `Resiliency` exists (while a rank imports, builds the
model or loads its checkpoint) is held by `hold_stop_signals()`, which the stage launcher calls
first thing on every rank, and acted on after the first step.

Without a `ResiliencyConfig`, the settings come from the environment (`ResiliencyConfig.from_env`),
so a launcher can set them for every rank without touching the job config:

    OPD_STOP_SIGNALS   comma-separated signal names (default SIGTERM,SIGUSR1)
    OPD_HEARTBEATS     auto (under ft_launcher) | on | off
    OPD_STOP_MARKER    file rank 0 writes after stopping early with a complete checkpoint

To drill the hang detection, the trainer's own fault hook `MEGATRON_OPD_FAULT=hang:RANK:STEP`
(stages/trainer.py) makes a rank hang on the first attempt.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping

import torch
import torch.distributed as dist


# ft_launcher gives each rank the path of its rank monitor's socket in this variable.
_FT_SOCKET_ENV = "FT_RANK_MONITOR_IPC_SOCKET"


@dataclass
class ResiliencyConfig:
    # Signals that mean "save and exit" (SLURM sends SIGUSR1 before the time limit with
    # `#SBATCH --signal=B:USR1@<seconds>`, and SIGTERM on preemption or scancel).
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    # Heartbeats to NVRx's rank monitor: auto = when running under ft_launcher.
    heartbeats: Literal["auto", "on", "off"] = "auto"
    # Written by rank 0 (its content: the step and the signal) once a stop's checkpoint is saved.
    stop_marker: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ResiliencyConfig":
        env = os.environ if env is None else env
        cfg = cls()
        if env.get("OPD_STOP_SIGNALS"):
            cfg.stop_signals = [s.strip() for s in env["OPD_STOP_SIGNALS"].split(",") if s.strip()]
        if env.get("OPD_HEARTBEATS"):
            value = env["OPD_HEARTBEATS"]
            if value not in ("auto", "on", "off"):
                raise ValueError(f"OPD_HEARTBEATS={value!r}; expected auto, on or off")
            cfg.heartbeats = value  # type: ignore[assignment]
        cfg.stop_marker = env.get("OPD_STOP_MARKER", "")
        return cfg


_held: list[str] = []  # stop signals received before a Resiliency existed (hold_stop_signals)


def _hold(signum, frame) -> None:
    _held.append(signal.Signals(signum).name)


def hold_stop_signals(cfg: ResiliencyConfig | None = None) -> None:
    """Record the stop signals from now on instead of dying of them; the next `Resiliency` takes
    them over (a launcher may forward a stop while the ranks are still setting up)."""
    for name in (cfg or ResiliencyConfig.from_env()).stop_signals:
        if hasattr(signal, name):  # Resiliency itself names an unknown one
            signal.signal(getattr(signal, name), _hold)


class Resiliency:
    def __init__(self, cfg: ResiliencyConfig | None = None):
        self.cfg = cfg or ResiliencyConfig.from_env()
        for name in self.cfg.stop_signals:
            if not hasattr(signal, name):
                raise ValueError(f"unknown stop signal {name!r}; use names such as SIGTERM, SIGUSR1")
        self.received: str | None = _held[-1] if _held else None
        _held.clear()
        self.stopped_at: int | None = None  # the step at which should_stop() said yes
        self.last_step = 0
        self._monitor = self._connect_monitor()
        for name in self.cfg.stop_signals:
            signal.signal(getattr(signal, name), self._on_signal)

    # -- signals ----------------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item())
        if stop and self.stopped_at is None:
            self.stopped_at = self.last_step
        return stop

    # -- heartbeats -------------------------------------------------------------------------------

    def _connect_monitor(self):
        wanted = self.cfg.heartbeats
        if wanted == "off" or (wanted == "auto" and not os.environ.get(_FT_SOCKET_ENV)):
            return None
        if not os.environ.get(_FT_SOCKET_ENV):
            raise RuntimeError(
                f"heartbeats are on but {_FT_SOCKET_ENV} is not set: start the ranks with ft_launcher "
                f"(nvidia-resiliency-ext), or set OPD_HEARTBEATS=auto"
            )
        from nvidia_resiliency_ext.fault_tolerance import RankMonitorClient

        client = RankMonitorClient()
        client.init_workload_monitoring()
        return client

    @property
    def monitored(self) -> bool:
        """Heartbeats go to an ft_launcher rank monitor."""
        return self._monitor is not None

    def heartbeat(self) -> None:
        """Tell the rank monitor this rank is alive (after each step; call it inside long phases too)."""
        if self._monitor is not None:
            self._monitor.send_heartbeat()

    def on_step(self, step: int) -> None:
        self.last_step = step
        self.heartbeat()

    @staticmethod
    def _rank() -> int:
        return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))

    # -- end --------------------------------------------------------------------------------------

    def close(self) -> None:
        if self.stopped_at is not None and self.cfg.stop_marker and self._rank() == 0:
            marker = Path(self.cfg.stop_marker)
            marker.parent.mkdir(parents=True, exist_ok=True)
            tmp = marker.with_name(marker.name + ".tmp")
            tmp.write_text(f"step {self.stopped_at}\nsignal {self.received or 'on another rank'}\n")
            os.replace(tmp, marker)
        if self._monitor is not None:
            self._monitor.shutdown_workload_monitoring()
            self._monitor = None
