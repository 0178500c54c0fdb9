"""Hugging Face checkpoints on disk: config.json + safetensors shards (+ index), read lazily, written by shard.

Reading parses each shard's safetensors header ourselves (8-byte length, JSON) so that a
truncated or inconsistent file fails with its name and the tensors it cuts off, and maps the
data with `mmap`: `HFCheckpoint.rows(name, a, b)` is a tensor over exactly those bytes of the
file, read on demand, that owns its storage (checkpoints_tools/staging.py says why that matters
to megatron's writer). The pages are clean and file-backed, so the kernel can drop them.

Writing groups tensors into shards of at most `max_shard_bytes`, saves one shard at a time and
writes `model.safetensors.index.json`, the layout transformers and SGLang load.
"""

from __future__ import annotations

import json
import math
import mmap
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from megatron_opd.models.hf.config_json import INDEX, WEIGHT_SUFFIXES, is_hf_model_dir, side_files  # noqa: F401 - re-exported
from megatron_opd.models.hf.errors import CheckpointError, CorruptCheckpoint, name_list


DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def mapped_tensor(mm: mmap.mmap, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor over bytes [offset, offset + numel * itemsize) of a mapping; it owns that storage."""
    numel = math.prod(shape)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mm, dtype=dtype, count=numel, offset=offset).view(shape)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header and check that every tensor's bytes are in the file."""
    size = path.stat().st_size
    if size < 8:
        raise CorruptCheckpoint(f"{path}: {size} bytes is too short for a safetensors file (truncated?)")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > size:
            raise CorruptCheckpoint(
                f"{path} is truncated: its header declares {header_len} bytes but the file has "
                f"{size} bytes in all"
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptCheckpoint(f"{path}: the safetensors header is not valid JSON ({e})") from None
    data_start = 8 + header_len
    infos: dict[str, TensorInfo] = {}
    cut_off: list[str] = []
    needed = data_start
    for name, h in header.items():
        if name == "__metadata__":
            continue
        if h.get("dtype") not in DTYPES:
            raise CorruptCheckpoint(f"{path}: tensor {name} has unsupported dtype {h.get('dtype')!r}")
        dtype = DTYPES[h["dtype"]]
        shape = tuple(int(d) for d in h["shape"])
        begin, end = (int(x) for x in h["data_offsets"])
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes:
            raise CorruptCheckpoint(
                f"{path}: tensor {name} declares {end - begin} bytes but its shape {list(shape)} and "
                f"dtype {h['dtype']} need {nbytes}"
            )
        needed = max(needed, data_start + end)
        if data_start + end > size:
            cut_off.append(name)
        infos[name] = TensorInfo(name, path, dtype, shape, data_start + begin, nbytes)
    if cut_off:
        raise CorruptCheckpoint(
            f"{path} is truncated: {size} bytes on disk, its header needs {needed}; tensors cut off: "
            f"{name_list(cut_off)}"
        )
    return infos


class HFCheckpoint:
    """A Hugging Face model directory, opened lazily. Tensors are memory-mapped views of the files."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(
                f"{self.path} is not a Hugging Face model directory: config.json is missing"
            )
        self.config: dict = json.loads(config_path.read_text())
        index_path = self.path / INDEX
        if index_path.is_file():
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            weight_map = {}
            if not files:
                legacy = sorted(p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
                hint = f" (found {name_list(legacy)}: re-save with safe_serialization=True)" if legacy else ""
                raise CheckpointError(f"{self.path} holds no safetensors weights{hint}")
        self._infos: dict[str, TensorInfo] = {}
        for file in files:
            if not (self.path / file).is_file():
                raise CorruptCheckpoint(f"{index_path} lists {file}, which does not exist")
            for name, info in read_header(self.path / file).items():
                if weight_map and weight_map.get(name) != file:
                    continue  # loaders follow the index; a stray copy elsewhere is not the tensor
                if name in self._infos:
                    raise CorruptCheckpoint(
                        f"tensor {name} is in both {self._infos[name].file.name} and {file}"
                    )
                self._infos[name] = info
        absent = [n for n in weight_map if n not in self._infos]
        if absent:
            raise CorruptCheckpoint(
                f"{index_path} lists tensors that are not in their files: "
                + ", ".join(f"{n} (in {weight_map[n]})" for n in sorted(absent)[:12])
            )
        self._maps: dict[Path, mmap.mmap] = {}

    def names(self) -> list[str]:
        return sorted(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def _map(self, file: Path) -> mmap.mmap:
        if file not in self._maps:
            with open(file, "rb") as f:
                # Private copy-on-write mapping: writable as far as torch.frombuffer is concerned
                # (no read-only warning), while the pages stay the file's own until written.
                self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[file]

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) along dim 0 of tensor `name` as a tensor over the file's bytes."""
        info = self._infos[name]
        n = info.shape[0] if info.shape else 1
        stop = n if stop is None else stop
        row_bytes = info.nbytes // n if n else 0
        shape = ((stop - start), *info.shape[1:]) if info.shape else ()
        return mapped_tensor(self._map(info.file), info.offset + start * row_bytes, shape, info.dtype)

    def tensor(self, name: str) -> torch.Tensor:
        return self.rows(name)

    def side_files(self) -> list[Path]:
        """Files that travel with the weights: config, generation config, tokenizer files, templates."""
        return side_files(self.path)


def copy_side_files(files: Iterable[Path], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in files:
        shutil.copy2(f, out_dir / f.name)
        copied.append(out_dir / f.name)
    return copied


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Group names, in the given order, into shards of at most max_shard_bytes (one tensor may exceed it)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return [s for s in shards if s]


def write_shards(
    out_dir: Path,
    shards: list[list[str]],
    load_shard: Callable[[list[str]], dict[str, torch.Tensor]],
    on_shard: Callable[[int], None] | None = None,
) -> dict[str, str]:
    """Write shard i as model-0000i-of-0000N.safetensors from load_shard(names); returns the weight map.

    Only one shard's tensors are alive at a time.
    """
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = load_shard(names)
        missing = set(names) - set(tensors)
        if missing:
            raise CheckpointError(f"internal: shard {file} lacks {name_list(missing)}")
        save_file({n: tensors[n].contiguous() for n in names}, str(out_dir / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({n: file for n in names})
        del tensors
        if on_shard is not None:
            on_shard(len(names))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def parse_size(text: str) -> int:
    """'5GB', '500MB', '100KB' or a byte count."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    return int(t)
