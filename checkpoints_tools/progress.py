"""Progress bars (rich) for the tools: per tensor or shard where we drive the loop, by bytes on disk
where megatron's writer drives it (a thread watches the checkpoint directory grow)."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Callable, Iterator

from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@contextlib.contextmanager
def counting(enabled: bool, description: str, total: int) -> Iterator[Callable[..., None]]:
    """Yields advance(n=1) for a bar over `total` items (a no-op when disabled)."""
    if not enabled:
        yield lambda n=1: None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


@contextlib.contextmanager
def reporting(enabled: bool, description: str) -> Iterator[Callable[[int, int], None]]:
    """Yields update(done, total) for a bar over items whose total the library reports as it goes
    (a no-op when disabled)."""
    if not enabled:
        yield lambda done, total: None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as progress:
        task = progress.add_task(description, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


@contextlib.contextmanager
def bytes_on_disk(
    enabled: bool, description: str, directory: Path, total: int, pattern: str = "*.distcp"
) -> Iterator[None]:
    """Shows the bytes appearing under `directory` (files matching `pattern`) while the body runs."""
    if not enabled:
        yield
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn())
    with Progress(*columns) as progress:
        task = progress.add_task(description, total=total)
        stop = threading.Event()

        def watch():
            while not stop.wait(0.5):
                try:
                    done = sum(p.stat().st_size for p in directory.glob(pattern))
                except OSError:
                    continue  # a file vanished between glob and stat (the writer renames)
                progress.update(task, completed=min(done, total))

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            progress.update(task, completed=total)
