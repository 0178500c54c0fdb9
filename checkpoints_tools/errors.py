"""How the entry points report errors: the message of a CheckpointError on one line, exit status 2.

The error kinds themselves belong to the conversion library (megatron_opd.models.hf.errors).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from megatron_opd.models.hf.errors import CheckpointError


def add_output_flags(p: argparse.ArgumentParser) -> None:
    """The flags every tool that writes a directory shares."""
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty output directory (the old one stays until the new one is complete)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_tool(job: Callable[[], str | Path]) -> int:
    """Run an entry point's job: 'wrote DIR' and 0, or a one-line 'error: ...' and 2."""
    try:
        out = job()
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
