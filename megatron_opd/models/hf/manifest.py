"""manifest.json: what a conversion wrote, with a sha256 and size per file, and how (tool, arguments, inputs).

Every output directory of a conversion (export, and the checkpoints_tools commands) gets one.
`verify_manifest` re-hashes a directory and lists the files missing, changed or not listed
(`python -m checkpoints_tools.manifest DIR`); `check_manifest` is what a reader calls on its
input, so that a file damaged or altered since it was written is refused by name before
anything is converted.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from megatron_opd.models.hf.errors import CorruptCheckpoint

MANIFEST = "manifest.json"


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: str | Path, tool: str, details: dict[str, Any] | None = None) -> Path:
    directory = Path(directory)
    files = {
        str(p.relative_to(directory)): {"sha256": sha256(p), "bytes": p.stat().st_size}
        for p in _files(directory)
    }
    manifest = {
        "tool": tool,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **(details or {}),
        "files": files,
    }
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return path


def verify_manifest(directory: str | Path) -> list[str]:
    """Problems found (empty: every listed file is present and unchanged, and nothing is unlisted)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        return [f"{path} does not exist"]
    listed = json.loads(path.read_text())["files"]
    problems = []
    for rel, meta in listed.items():
        p = directory / rel
        if not p.is_file():
            problems.append(f"missing: {rel}")
        elif p.stat().st_size != meta["bytes"] or sha256(p) != meta["sha256"]:
            problems.append(f"changed: {rel}")
    for p in _files(directory):
        rel = str(p.relative_to(directory))
        if rel not in listed:
            problems.append(f"not in manifest: {rel}")
    return problems


def check_manifest(directory: str | Path, scope: Iterable[str | Path] | None = None) -> None:
    """Refuse files that differ from `directory`/manifest.json, when there is one.

    Only listed files are checked, and with `scope` only those at or under one of its paths (a
    model directory's manifest also lists checkpoints that training may since have pruned).
    Raises CorruptCheckpoint naming the first file that is missing or whose size or sha256 differs.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        return
    try:
        listed = json.loads(path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"{path} is not a manifest ({e}); restore it or delete it") from None
    within = [Path(p).resolve() for p in scope] if scope is not None else None
    for rel, meta in sorted(listed.items()):
        file = directory / rel
        if within is not None and not any(file.resolve().is_relative_to(s) for s in within):
            continue
        if not file.is_file():
            problem = "is missing"
        elif file.stat().st_size != meta["bytes"]:
            problem = f"has {file.stat().st_size} bytes, the manifest lists {meta['bytes']}"
        elif (digest := sha256(file)) != meta["sha256"]:
            problem = f"has sha256 {digest[:16]}..., the manifest lists {meta['sha256'][:16]}..."
        else:
            continue
        raise CorruptCheckpoint(
            f"{file} {problem} ({path}): the file changed after the manifest was written; "
            f"restore it from the original, or delete {MANIFEST} if the change is intended"
        )
