"""Progress display and metrics files for long runs (rank 0 only).

Metrics go to `metrics.jsonl` (one JSON object per logged step) and TensorBoard event files in the
run directory, both readable by standard tools. Progress is a rich progress bar on a terminal and
periodic lines with rate and ETA otherwise (CI logs, SLURM logs).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Appends to `metrics.jsonl` and TensorBoard events from step `start` on.

    Rows of steps after `start` (logged by an attempt that was interrupted before its next
    checkpoint, and redone by this one) are dropped from metrics.jsonl, as the sample ledger drops
    them; TensorBoard is told to hide its events of those steps (`purge_step`: the event files are
    append-only, TensorBoard discards the earlier events from that step on when it reads them).
    A fresh run (`start` = -1) keeps nothing of an earlier attempt that never checkpointed."""

    def __init__(self, run_dir: Path, enabled: bool, start: int = -1):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= start]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        self._jsonl = open(path, "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start + 1)
        except ImportError:  # tensorboard is a declared dependency; JSONL still works without it
            self._tb = None

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{prefix + k: v for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(prefix + k, v, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _format(metrics: dict[str, Any], keys: list[str]) -> str:
    parts = []
    for k in keys:
        v = metrics.get(k)
        if isinstance(v, float):
            parts.append(f"{k} {v:.4g}")
        elif v is not None:
            parts.append(f"{k} {v}")
    return "  ".join(parts)


class Progress:
    """A progress bar (terminal) or periodic lines with rate and ETA (logs)."""

    def __init__(self, title: str, total: int, start: int, *, enabled: bool, mode: str = "auto", every: int = 10):
        self.total, self.done, self.start_step = total, start, start
        self.enabled, self.every = enabled, max(1, every)
        self.t0 = time.monotonic()
        self.title = title
        self.mode = ("bar" if sys.stderr.isatty() else "lines") if mode == "auto" else mode
        self._bar = None
        if enabled and self.mode == "bar":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress
            from rich.progress import TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self._task = self._bar.add_task(title, total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, metrics: dict[str, Any], keys: list[str]) -> None:
        self.done = step
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=_format(metrics, keys))
            return
        if self.mode == "lines" and (step % self.every == 0 or step == self.total):
            elapsed = time.monotonic() - self.t0
            rate = (step - self.start_step) / elapsed if elapsed > 0 else 0.0
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            print(
                f"[{self.title}] step {step}/{self.total}  {rate:.2f} it/s  eta {eta:.0f}s  {_format(metrics, keys)}",
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
