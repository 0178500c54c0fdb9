"""Errors the checkpoint tools raise: each message names the file, the tensor or the field at fault.

Entry points print the message (no traceback) and exit with status 2; library callers catch
`CheckpointToolError` or one of its kinds.
"""

from __future__ import annotations

from typing import Iterable


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
