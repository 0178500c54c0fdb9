"""Where a conversion writes its output directory: never over an input, and beside the old output until done.

Everything that writes a directory (export, so the rollout engine's HF export too, and the
checkpoints_tools commands convert, reshard and merge) claims its output and writes through it:

- `claim_output(output, inputs, overwrite)` runs as soon as the paths to be read are known,
  before anything is written or any tensor read. It refuses
  an output that is, contains or is inside any input (paths resolved, so symlinks and relative
  paths cannot hide an overlap), a path that is a file, and a non-empty directory without
  `--overwrite`.
- `Output.writing()` yields a fresh sibling directory `.NAME.partial-XXXXXXXX`. When the body
  finishes, its files are made 0644 and its directories 0755 (an output is a release: readable by
  everyone whatever the umask or the temporary directory's mode), the old output is renamed
  away, the new one renamed in, and the old one deleted. If the body fails, the partial directory
  is deleted and the old output is exactly as it was.

The output's parent directory must hold both copies for a moment (a rename cannot cross file
systems, and a copy would not be atomic). A crash between the two renames leaves the old output
as `.NAME.old-XXXXXXXX` beside the new one's partial directory: nothing is lost.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from megatron_opd.models.hf.errors import CheckpointError

FILE_MODE = 0o644
DIR_MODE = 0o755


@dataclass(frozen=True)
class Output:
    path: Path  # resolved: where the finished output will be

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        """A new, empty directory beside `path` to write into; swapped in when the body returns."""
        parent, name = self.path.parent, self.path.name
        try:
            parent.mkdir(parents=True, exist_ok=True)
            partial = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent))
        except OSError as e:
            raise CheckpointError(f"cannot write beside {self.path}: {e}") from None
        try:
            yield partial
            make_world_readable(partial)
            _swap_in(partial, self.path)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise


def claim_output(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], overwrite: bool) -> Output:
    """Check where a tool will write, before it touches anything (see the module docstring)."""
    target = Path(output).resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if target == source:
            relation = "is"
        elif source.is_relative_to(target):
            relation = "contains"
        elif target.is_relative_to(source):
            relation = "is inside"
        else:
            continue
        raise CheckpointError(
            f"--output {output} {relation} the input {given}"
            + (f" (both resolve to {target})" if relation == "is" and Path(output) != Path(given) else "")
            + ": writing there would destroy the input; choose an output directory outside it"
        )
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"--output {output} is a file, not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise CheckpointError(
            f"--output {output} exists and is not empty; pass --overwrite to replace it "
            f"(the old one is kept until the new one is complete)"
        )
    return Output(target)


def make_world_readable(root: Path) -> None:
    """Files 0644, directories 0755 (symlinks are left alone)."""
    for directory, dirs, files in os.walk(root):
        os.chmod(directory, DIR_MODE)
        for f in files:
            p = os.path.join(directory, f)
            if not os.path.islink(p):
                os.chmod(p, FILE_MODE)


def _swap_in(new: Path, target: Path) -> None:
    """Put `new` at `target`; an existing `target` is renamed away first and deleted last."""
    if not target.exists():
        os.rename(new, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    try:
        shutil.rmtree(old)
    except OSError as e:
        warnings.warn(f"replaced {target}, but could not delete the old copy {old}: {e}")
