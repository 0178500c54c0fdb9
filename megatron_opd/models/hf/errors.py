"""Errors of HF <-> megatron conversion: each message names the file, the tensor or the field at fault.

Library callers (the training runtime, the rollout engine, the teacher server) catch
`CheckpointError` or one of its kinds; the command-line tools print the message with no
traceback and exit with status 2 (checkpoints_tools.errors.run_tool).
"""

from __future__ import annotations

from typing import Iterable


class CheckpointError(Exception):
    """A checkpoint cannot be read, converted or written; the message says why and what to do."""


class UnknownArchitecture(CheckpointError):
    pass


class UnsupportedConfig(CheckpointError):
    """The architecture is known but this configuration of it has no faithful megatron equivalent."""


class MissingTensors(CheckpointError):
    pass


class UnexpectedTensors(CheckpointError):
    pass


class ShapeMismatch(CheckpointError):
    pass


class CorruptCheckpoint(CheckpointError):
    """A file is truncated, unreadable, disagrees with its index or with its manifest."""


def name_list(names: Iterable[str], limit: int = 12) -> str:
    """'a, b, c' with at most `limit` names and a count of the rest."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
