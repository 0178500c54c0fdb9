"""Errors the checkpoint tools raise: each message names the file, the tensor or the field at fault.

Entry points print the message (no traceback) and exit with status 2; library callers catch
`CheckpointToolError` or one of its kinds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Iterable


class CheckpointToolError(Exception):
    """A checkpoint cannot be read, converted or written; the message says why and what to do."""


class UnknownArchitecture(CheckpointToolError):
    pass


class UnsupportedConfig(CheckpointToolError):
    """The architecture is known but this configuration of it has no faithful megatron equivalent."""


class MissingTensors(CheckpointToolError):
    pass


class UnexpectedTensors(CheckpointToolError):
    pass


class ShapeMismatch(CheckpointToolError):
    pass


class CorruptCheckpoint(CheckpointToolError):
    """A file is truncated, unreadable or disagrees with its index."""


def name_list(names: Iterable[str], limit: int = 12) -> str:
    """'a, b, c' with at most `limit` names and a count of the rest."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def add_output_flags(p: argparse.ArgumentParser) -> None:
    """The flags every tool that writes a directory shares."""
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_tool(job: Callable[[], str | Path]) -> int:
    """Run an entry point's job: 'wrote DIR' and 0, or a one-line 'error: ...' and 2."""
    try:
        out = job()
    except CheckpointToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
