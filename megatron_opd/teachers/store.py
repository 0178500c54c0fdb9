"""`TeacherStore`: teacher signals on disk (zarr v3), written by many ranks at once, read lazily.

Layout, one self-contained zarr group per (step, writer):

    <root>/step_00000003/part_0001/            zarr group written by rank 1 alone
        zarr.json                                attrs: sample_ids, per teacher {kind, rows, weight_version}
        <teacher>/offsets      int64 [n + 1]     response-token offsets of the teacher's n samples
        <teacher>/hidden       [tokens, d]       or topk_ids + topk_logprobs [tokens, k],
                                                 sampled_logprobs [tokens], logits [tokens, V]
        COMPLETE                                 written last, by atomic rename

Why this shape: zarr 3 has no locking, and writers that share a shard (or race on one array's
`zarr.json` through append/resize) lose rows (notes/infra.md). Here no two writers ever touch
the same file: every part is its own group with its own metadata, pre-sized arrays, written
once. Signals are ragged (one row per response token), stored flat along the token axis with
offsets; chunks hold about 1 MiB of rows, compressed with Blosc-zstd and bit-shuffle.

Reading lists the complete parts of a step and opens arrays lazily: `read(step, sample_ids)`
decompresses only the chunks holding those samples' rows. After a restart, `write` finds the
COMPLETE marker and rewrites nothing (it checks that the sample ids are the same); a part
without the marker was interrupted and is written again from scratch.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from megatron_opd.data.trajectories import SIGNAL_FIELDS, TeacherSignals

COMPLETE = "COMPLETE"
FORMAT = 1
_STEP = re.compile(r"^step_(\d{8})$")
_PART = re.compile(r"^part_(\d{4,})$")
CHUNK_BYTES = 1 << 20


class StoreError(RuntimeError):
    """The store's content contradicts a request (missing sample, different ids on rewrite)."""


def _compressor():
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


@dataclass(frozen=True)
class _Loc:
    part: Path
    teacher: str
    index: int  # position among the teacher's samples in that part


class TeacherStore:
    def __init__(
        self,
        root: str | os.PathLike,
        *,
        hidden_dtype: str = "float16",
        logprob_dtype: str = "float32",
        chunk_bytes: int = CHUNK_BYTES,
    ):
        self.root = Path(root)
        self.chunk_bytes = chunk_bytes
        self.dtypes = {
            "hidden": np.dtype(hidden_dtype),
            "logits": np.dtype(logprob_dtype),
            "topk_logprobs": np.dtype(logprob_dtype),
            "sampled_logprobs": np.dtype(logprob_dtype),
            "topk_ids": np.dtype("int32"),
        }
        for key, dt in self.dtypes.items():
            if key != "topk_ids" and dt not in (np.float16, np.float32):
                raise ValueError(f"TeacherStore stores float16 or float32 (zarr rejects bfloat16), got {dt} for {key}")

    # -- paths --------------------------------------------------------------------------------

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def part_dir(self, step: int, rank: int) -> Path:
        return self.step_dir(step) / f"part_{rank:04d}"

    def is_written(self, step: int, rank: int) -> bool:
        return (self.part_dir(step, rank) / COMPLETE).is_file()

    def steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _STEP.match(p.name)) and self.parts(int(m.group(1))))

    def parts(self, step: int) -> list[int]:
        d = self.step_dir(step)
        if not d.is_dir():
            return []
        return sorted(int(m.group(1)) for p in d.iterdir() if (m := _PART.match(p.name)) and (p / COMPLETE).is_file())

    # -- writing ------------------------------------------------------------------------------

    def write(self, step: int, rank: int, sample_ids: Sequence[str], signals: Sequence[TeacherSignals]) -> bool:
        """Write this rank's signals for `step` (rows index `sample_ids`). False if already written."""
        import zarr

        part = self.part_dir(step, rank)
        ids = [str(s) for s in sample_ids]
        if len(set(ids)) != len(ids):
            raise StoreError(f"step {step} rank {rank}: sample ids are not unique")
        if (part / COMPLETE).is_file():
            stored = zarr.open_group(store=str(part), mode="r").attrs["sample_ids"]
            if stored != ids:
                raise StoreError(
                    f"{part} already holds a complete write of {len(stored)} samples that differ from the "
                    f"{len(ids)} given now (first stored {stored[:3]}, given {ids[:3]}); refusing to overwrite"
                )
            return False
        if part.exists():
            shutil.rmtree(part)  # an interrupted write of this very part
        group = zarr.open_group(store=str(part), mode="w", zarr_format=3)
        teachers: dict[str, dict] = {}
        claimed: set[int] = set()
        for sig in signals:
            if sig.teacher in teachers:
                raise StoreError(f"step {step} rank {rank}: two TeacherSignals for teacher {sig.teacher!r}")
            rows = sig.rows.tolist()
            if claimed & set(rows) or any(not 0 <= r < len(ids) for r in rows):
                raise StoreError(f"step {step} rank {rank}: teacher {sig.teacher!r} rows {rows} overlap another teacher or fall outside {len(ids)} samples")
            claimed |= set(rows)
            lens = sig.response_lens.tolist()
            tgroup = group.create_group(sig.teacher)
            tgroup.create_array("offsets", data=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64))
            for key in SIGNAL_FIELDS[sig.kind]:
                value = getattr(sig, key)
                flat = torch.cat([value[i, :n] for i, n in enumerate(lens)]) if lens else value[:, :0].flatten(0, 1)
                flat = flat.detach().cpu().numpy().astype(self.dtypes[key], copy=False)
                row_bytes = flat.dtype.itemsize * int(np.prod(flat.shape[1:], dtype=np.int64))
                chunk_rows = int(min(max(self.chunk_bytes // row_bytes, 16), 1 << 16))
                arr = tgroup.create_array(
                    key, shape=flat.shape, chunks=(chunk_rows, *flat.shape[1:]), dtype=flat.dtype, compressors=[_compressor()]
                )
                if flat.size:
                    arr[...] = flat
            teachers[sig.teacher] = {"kind": sig.kind, "rows": rows, "weight_version": sig.weight_version}
        group.attrs.update({"format": FORMAT, "step": step, "rank": rank, "sample_ids": ids, "teachers": teachers})
        tmp = part / (COMPLETE + ".tmp")
        tmp.write_text(f"{len(ids)}\n")
        os.replace(tmp, part / COMPLETE)
        return True

    # -- reading ------------------------------------------------------------------------------

    def open_step(self, step: int) -> "StepReader":
        parts = self.parts(step)
        if not parts:
            raise StoreError(f"{self.step_dir(step)} holds no complete part (steps written: {self.steps()})")
        return StepReader(self, step, [self.part_dir(step, r) for r in parts])

    def read(self, step: int, sample_ids: Sequence[str], width: int | None = None) -> list[TeacherSignals]:
        return self.open_step(step).read(sample_ids, width)


class StepReader:
    """The complete parts of one step: an index sample id -> location, arrays opened on demand."""

    def __init__(self, store: TeacherStore, step: int, parts: list[Path]):
        import zarr

        self.store, self.step = store, step
        self._groups = {}
        self._loc: dict[str, _Loc] = {}
        self._kinds: dict[str, str] = {}
        self._versions: dict[tuple[Path, str], str] = {}
        self._offsets: dict[tuple[Path, str], np.ndarray] = {}
        for part in parts:
            group = zarr.open_group(store=str(part), mode="r")
            self._groups[part] = group
            attrs = group.attrs.asdict()
            ids = attrs["sample_ids"]
            for teacher, info in attrs["teachers"].items():
                self._kinds.setdefault(teacher, info["kind"])
                self._versions[(part, teacher)] = info["weight_version"]
                for j, row in enumerate(info["rows"]):
                    sid = ids[row]
                    if sid in self._loc:
                        raise StoreError(f"step {step}: sample {sid!r} is stored twice ({self._loc[sid].part.name} and {part.name})")
                    self._loc[sid] = _Loc(part, teacher, j)

    @property
    def sample_ids(self) -> list[str]:
        return list(self._loc)

    def _location(self, sample_id: str) -> _Loc:
        try:
            return self._loc[sample_id]
        except KeyError:
            raise StoreError(f"step {self.step}: no stored signal for sample {sample_id!r} ({len(self._loc)} samples stored)") from None

    def _offsets_of(self, part: Path, teacher: str) -> np.ndarray:
        key = (part, teacher)
        if key not in self._offsets:
            self._offsets[key] = self._groups[part][f"{teacher}/offsets"][...]
        return self._offsets[key]

    def read(self, sample_ids: Sequence[str], width: int | None = None) -> list[TeacherSignals]:
        """Signals for `sample_ids`, one TeacherSignals per teacher; rows are positions in `sample_ids`."""
        locs = [self._location(s) for s in sample_ids]
        by_teacher: dict[str, list[int]] = {}
        for i, loc in enumerate(locs):
            by_teacher.setdefault(loc.teacher, []).append(i)
        spans = {}
        for i, loc in enumerate(locs):
            off = self._offsets_of(loc.part, loc.teacher)
            spans[i] = (int(off[loc.index]), int(off[loc.index + 1]))
        longest = max((b - a for a, b in spans.values()), default=0)
        R = longest if width is None else width
        if R < longest:
            raise StoreError(f"step {self.step}: width {width} is shorter than the longest stored response ({longest} tokens)")
        out = []
        for teacher, rows in by_teacher.items():
            kind = self._kinds[teacher]
            fields = {}
            for key in SIGNAL_FIELDS[kind]:
                pieces = [self._groups[locs[i].part][f"{teacher}/{key}"][spans[i][0] : spans[i][1]] for i in rows]
                trailing = pieces[0].shape[1:]
                # Ids widen to long (the trainer's index type); floats keep the stored dtype.
                dtype = torch.long if key == "topk_ids" else getattr(torch, str(pieces[0].dtype))
                value = torch.zeros((len(rows), R, *trailing), dtype=dtype)
                for b, piece in enumerate(pieces):
                    value[b, : piece.shape[0]] = torch.from_numpy(np.asarray(piece)).to(dtype)
                fields[key] = value
            versions = {self._versions[(locs[i].part, teacher)] for i in rows}
            out.append(
                TeacherSignals(
                    teacher=teacher,
                    kind=kind,
                    rows=torch.tensor(rows, dtype=torch.long),
                    response_lens=torch.tensor([spans[i][1] - spans[i][0] for i in rows], dtype=torch.long),
                    weight_version=versions.pop() if len(versions) == 1 else "",
                    **fields,
                )
            )
        return out
