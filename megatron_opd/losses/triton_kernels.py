"""Triton kernels for the reverse KL's two row passes, used on CUDA when Triton imports.

The PyTorch composition in `vocab_parallel` spends ~15 elementwise passes over float32 copies of
the logits per step: on an H100 that ran at 2-5% of the copy bandwidth (docs/losses.md). These
kernels read each logit of a row shard once for the statistics and once more for the gradient
(the 5 logit-sized passes the benchmark models), in the logits' own dtype, accumulating in float32.
One program per row walks the shard in blocks with an online max, so nothing [rows, V] is ever
allocated besides the gradient itself.

Semantics are those of `vocab_parallel.local_kl_statistics` and `kl_grad_`, -inf columns and
rows without mass included; `MEGATRON_OPD_LOSS_KERNELS=torch` turns the kernels off,
`=triton` forces them (on CPU tensors too, under TRITON_INTERPRET=1, for debugging).
"""

from __future__ import annotations

import functools
import os

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOAT32_LOWEST = -3.4028234663852886e38  # torch.finfo(torch.float32).min: see local_kl_statistics


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the row passes over these tensors run as Triton kernels."""
    choice = os.environ.get("MEGATRON_OPD_LOSS_KERNELS", "auto")
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"MEGATRON_OPD_LOSS_KERNELS={choice!r}: use auto, torch or triton")
    if choice == "torch" or not all(t.dtype in SUPPORTED_DTYPES for t in tensors):
        return False
    if choice == "triton":
        return True
    return all(t.is_cuda for t in tensors) and _triton_importable()


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def kl_statistics_kernel(
        z_ptr, u_ptr, out_ptr, z_stride, u_stride, valid, inv_t, lowest, BLOCK: tl.constexpr
    ):
        # Per row: (max a, max b, sum exp(a - max a), sum exp(b - max b), sum e (a' - b')) with
        # a = z/T, b = u/T; the running sums are rescaled whenever a block raises a maximum.
        row = tl.program_id(0).to(tl.int64)
        z_row, u_row = z_ptr + row * z_stride, u_ptr + row * u_stride
        max_a = tl.full((), lowest, tl.float32)
        max_b = tl.full((), lowest, tl.float32)
        sum_a = tl.zeros((), tl.float32)
        sum_b = tl.zeros((), tl.float32)
        weighted = tl.zeros((), tl.float32)
        for start in range(0, valid, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < valid
            a = tl.load(z_row + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_t
            b = tl.load(u_row + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_t
            new_a = tl.maximum(max_a, tl.max(a, axis=0))
            new_b = tl.maximum(max_b, tl.max(b, axis=0))
            rescale_a = tl.exp(max_a - new_a)
            shift = (max_a - new_a) - (max_b - new_b)
            # As in combine_kl_statistics: an underflowed rescale drops the old terms entirely.
            weighted = tl.where(rescale_a > 0, rescale_a * (weighted + sum_a * shift), 0.0)
            sum_a = sum_a * rescale_a
            sum_b = sum_b * tl.exp(max_b - new_b)
            e = tl.exp(a - new_a)
            sum_a += tl.sum(e, axis=0)
            sum_b += tl.sum(tl.exp(b - new_b), axis=0)
            # Columns with e = 0 contribute nothing (0 * -inf, 0 * nan); a teacher -inf under
            # student mass contributes +inf.
            weighted += tl.sum(tl.where(e > 0, e * ((a - new_a) - (b - new_b)), 0.0), axis=0)
            max_a, max_b = new_a, new_b
        out = out_ptr + row * 5
        tl.store(out, max_a)
        tl.store(out + 1, max_b)
        tl.store(out + 2, sum_a)
        tl.store(out + 3, sum_b)
        tl.store(out + 4, weighted)

    @triton.jit
    def kl_grad_kernel(
        z_ptr, u_ptr, g_ptr, norms_ptr, scale_ptr, z_stride, u_stride, g_stride, valid, width, inv_t,
        BLOCK: tl.constexpr,
    ):
        # g = p (log p - log q - KL) * scale with p = exp(a - log Z_z), log q = b - log Z_u; NaN
        # (0 * inf: p = 0 columns, padding, zero scale on an infinite KL) becomes 0.
        row = tl.program_id(0).to(tl.int64)
        z_row, u_row, g_row = z_ptr + row * z_stride, u_ptr + row * u_stride, g_ptr + row * g_stride
        log_z = tl.load(norms_ptr + row * 3)
        offset = tl.load(norms_ptr + row * 3 + 1) - tl.load(norms_ptr + row * 3 + 2)  # log Z_u - KL
        scale = tl.load(scale_ptr + row)
        for start in range(0, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < valid
            a = tl.load(z_row + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_t
            b = tl.load(u_row + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_t
            log_p = a - log_z
            g = tl.exp(log_p) * (log_p - b + offset) * scale
            g = tl.where(g == g, g, 0.0)
            tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=cols < width)

    return kl_statistics_kernel, kl_grad_kernel


def _block(width: int) -> int:
    return min(4096, max(16, 1 << (max(width, 1) - 1).bit_length()))


def _row_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def kl_statistics(z: torch.Tensor, u: torch.Tensor, valid: int, temperature: float) -> torch.Tensor:
    """[rows, 5] float32 shard statistics of `local_kl_statistics`, from the first `valid`
    columns of z and u [rows, width] (any float dtype; z and u are left untouched)."""
    statistics_kernel, _ = _kernels()
    z, u = _row_major(z), _row_major(u)
    out = torch.empty(z.shape[0], 5, dtype=torch.float32, device=z.device)
    if z.shape[0]:
        statistics_kernel[(z.shape[0],)](
            z, u, out, z.stride(0), u.stride(0), valid, 1.0 / temperature, FLOAT32_LOWEST,
            BLOCK=_block(valid), num_warps=8,
        )
    return out


def kl_grad(
    z: torch.Tensor,
    u: torch.Tensor,
    norms: torch.Tensor,
    scale: torch.Tensor,
    valid: int,
    temperature: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """`kl_grad_` over rows of z and u [rows, width] into `out` [rows, width] (may be u itself):
    p (log p - log q - KL) * scale on the first `valid` columns, 0 on the padding after them."""
    _, grad_kernel = _kernels()
    z, u = _row_major(z), _row_major(u)
    if out.stride(-1) != 1:
        raise ValueError("the gradient buffer must be row-major")
    norms = norms.to(torch.float32).contiguous()
    scale = scale.to(torch.float32).contiguous()
    if z.shape[0]:
        grad_kernel[(z.shape[0],)](
            z, u, out, norms, scale, z.stride(0), u.stride(0), out.stride(0), valid, z.shape[1],
            1.0 / temperature, BLOCK=_block(z.shape[1]), num_warps=8,
        )
    return out
