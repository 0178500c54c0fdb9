"""Resiliency hooks of the training loop: preemption signals and (under ft_launcher) heartbeats.

The trainer calls `on_step(step)` after every optimizer step and stops cleanly, with a checkpoint,
when `should_stop()` says so. `should_stop` is collective: a signal seen by any rank stops every
rank at the same step, so the checkpoint they write together is complete.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ResiliencyConfig:
    # Signals that mean "save and exit" (SLURM sends SIGUSR1 before the time limit with
    # `#SBATCH --signal=USR1@<seconds>`, and SIGTERM on preemption or scancel).
    stop_signals: list[str] = None  # type: ignore[assignment]

    def __post_init__(self):
        if self.stop_signals is None:
            self.stop_signals = ["SIGTERM", "SIGUSR1"]


class Resiliency:
    def __init__(self, cfg: ResiliencyConfig | None = None):
        self.cfg = cfg or ResiliencyConfig()
        self.received: str | None = None
        for name in self.cfg.stop_signals:
            signal.signal(getattr(signal, name), self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def on_step(self, step: int) -> None:
        pass

    def should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        pass
