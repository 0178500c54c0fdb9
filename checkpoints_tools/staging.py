"""File-backed tensors: how the tools hand megatron a whole model without holding it in memory.

megatron's `dist_checkpointing.save` takes the complete sharded state dict in one call, and its
writer clones every CPU tensor whose storage is larger than the tensor ("a view"). So every
tensor we give it must (a) own its storage and (b) not live in anonymous memory if the model
is to exceed RAM. Both hold for tensors made with `torch.frombuffer` over an `mmap`:

- `mapped_tensor` (megatron_opd.models.hf.hf_dir) reads a byte range of an existing file (a
  safetensors shard) with a private, copy-on-write mapping: pages are read on demand and are
  clean, so the kernel can drop them.
- `Arena` is a scratch file in the output directory for tensors that must be computed (a
  re-padded vocabulary, a dtype cast, a merged weight): a shared mapping whose dirty pages the
  kernel writes back to the file under memory pressure instead of keeping them resident.

The cost is disk: an arena needs as many bytes as the tensors placed in it, and is deleted on close.
"""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import torch

from megatron_opd.models.hf.hf_dir import mapped_tensor

_ALIGN = 64


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class Arena:
    """A scratch file that hands out file-backed tensors; `close()` unmaps and deletes it."""

    def __init__(self, path: str | os.PathLike, nbytes: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.capacity = max(int(nbytes), _ALIGN)
        self._used = 0
        with open(self.path, "w+b") as f:
            f.truncate(self.capacity)  # sparse: blocks are allocated as pages are written
            self._mm = mmap.mmap(f.fileno(), self.capacity, access=mmap.ACCESS_WRITE)

    @staticmethod
    def bytes_for(shapes_and_dtypes) -> int:
        """Capacity needed for tensors of these (shape, dtype) pairs."""
        total = 0
        for shape, dtype in shapes_and_dtypes:
            total += -(-math.prod(shape) * _element_size(dtype) // _ALIGN) * _ALIGN
        return total

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * _element_size(dtype)
        if self._used + nbytes > self.capacity:
            raise RuntimeError(
                f"staging arena {self.path} is full ({self.capacity} bytes; {nbytes} more requested)"
            )
        tensor = mapped_tensor(self._mm, self._used, tuple(shape), dtype)
        self._used += -(-nbytes // _ALIGN) * _ALIGN
        return tensor

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        # A fresh sparse file reads as zeros, but a reused region would not: be explicit.
        return self.empty(shape, dtype).zero_()

    def close(self) -> None:
        """Delete the file. Tensors still referencing the mapping stay valid until collected."""
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # tensors still export the buffer; the mapping dies with them
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "Arena":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
