"""Reverse KL computed straight from hidden states and vocab-parallel output-layer shards.

z = h W^T (student) and u = g U^T (teacher) are only ever formed for a chunk of tokens at a time,
so the extra memory is O(chunk x V/TP) instead of the O(tokens x V/TP) of materialised logits.

Gradients are formed in the forward, chunk by chunk, for an incoming gradient of 1 per token:
dh_t = dKL_t/dz_t W for every row, and S = sum_t (dKL_t/dz_t)^T h_t. That costs 4 matmuls of
[tokens, d] x [d, V/TP] in all, like an unfused step, where recomputing the logits in the backward
would cost 6. The backward then makes them exact for any incoming per-token gradient g:
- dL/dh_t = g_t dh_t, exactly, row by row;
- dL/dW = sum_t g_t X_t with X_t = (dKL_t/dz_t)^T h_t, which S gives as c S + sum_t (g_t - c) X_t
  for any constant c. c is the most common value of g, so only rows with another value are
  recomputed: none for a plain mean, the masked rows for a masked mean. Pass the response rows
  only (gathered), and nothing is recomputed.
Memory: S is the weight gradient's own buffer (float32 for bf16 weights), dh is [tokens, d].
Rows whose KL is infinite or undefined (see vocab_parallel) get zero gradient.

Teachers: `teacher_weight` may be one shard or a sequence of per-teacher shards with
`teacher_index` naming each row's teacher; rows are grouped by teacher so that one head is in use
at a time. All teachers of one call share the teacher hidden size (it may differ from the
student's).

Tensor parallelism: every rank holds the full hidden states [tokens, d] and its vocabulary shard of
the weights. Each chunk's statistics are combined with one MAX and one SUM all-reduce (the chunk
sequence is the same on every rank). dL/dh from one shard is a partial sum, so the backward
all-reduces it over `group`, exactly like the input gradient of megatron's ColumnParallelLinear;
dL/dW stays local to the shard.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from megatron_opd.losses import triton_kernels
from megatron_opd.losses.vocab_parallel import (
    VocabShard,
    all_reduce_,
    check_temperature,
    combine_kl_statistics,
    compute_dtype,
    fill_no_mass_statistics_,
    kl_grad_,
    local_kl_statistics,
    unit_kl_grad_from_statistics_,
)

DEFAULT_CHUNK_SIZE = 256


def _logits_into(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden @ weight^T into the work buffer `out` (in the compute dtype)."""
    if hidden.dtype == out.dtype:
        return torch.mm(hidden, weight.t(), out=out)
    # bf16 weights: the matmul runs (and accumulates) at its own precision, as megatron's
    # output layer does, and the logits are widened for the softmax statistics.
    return out.copy_(hidden @ weight.t())


def _teacher_order(
    teacher_index: torch.Tensor | None, n_rows: int, n_teachers: int, device: torch.device
) -> tuple[torch.Tensor, list[int]]:
    """Row order grouped by teacher, and the number of rows of each teacher."""
    if teacher_index is None:
        return torch.arange(n_rows, device=device), [n_rows]
    order = torch.argsort(teacher_index, stable=True)
    return order, torch.bincount(teacher_index, minlength=n_teachers).tolist()


def _chunks(order: torch.Tensor, counts: list[int], chunk_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(teacher, row indices) chunks, never mixing teachers within a chunk."""
    start = 0
    for teacher, count in enumerate(counts):
        for s in range(start, start + count, chunk_size):
            yield teacher, order[s : min(s + chunk_size, start + count)]
        start += count


def _accumulate_weight_grad(acc: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """acc += grad_logits^T hidden, with acc possibly wider (float32 for bf16 weights)."""
    if acc.dtype == hidden.dtype:
        acc.addmm_(grad_logits.t(), hidden)
    else:
        acc.add_(grad_logits.t() @ hidden)


def _weight_grad_buffers(
    w: torch.Tensor, valid: int, cdtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight gradient, and where its real rows accumulate: in place, or in float32 beside a
    bf16 gradient (cast once at the end). Padding rows keep a zero gradient."""
    grad_w = torch.zeros_like(w)
    if w.dtype == cdtype:
        return grad_w, grad_w[:valid]
    return grad_w, torch.zeros(valid, w.shape[1], dtype=cdtype, device=w.device)


def _logit_buffers(
    fast: bool, rows: int, valid: int, h: torch.Tensor, g: torch.Tensor, cdtype: torch.dtype, scratch: bool
) -> list[torch.Tensor]:
    """A chunk's student and teacher logit buffers. The Triton kernels read logits in their own
    dtype (bf16 stays bf16: no widened copies); the torch ops work in the compute dtype and, for
    the statistics, need a third scratch buffer."""
    if fast:
        return [torch.empty(rows, valid, dtype=x.dtype, device=h.device) for x in (h, g)]
    return list(torch.empty(3 if scratch else 2, rows, valid, dtype=cdtype, device=h.device))


def _most_common(values: torch.Tensor) -> torch.Tensor:
    if values.numel() == 0:
        return values.new_zeros(())
    unique, counts = torch.unique(values, return_counts=True)
    return unique[counts.argmax()]


class _FusedLinearReverseKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, g, teacher_index, temperature, shard, group, chunk_size, wanted, *teacher_weights):
        cdtype = compute_dtype(h, w, g, *teacher_weights)
        n, valid = h.shape[0], shard.valid
        want_dh, want_dw = wanted
        norms = torch.empty(n, 3, dtype=cdtype, device=h.device)
        unit_dh = torch.zeros_like(h) if want_dh else None
        grad_w, unit_dw = _weight_grad_buffers(w, valid, cdtype) if want_dw else (None, None)
        fast = triton_kernels.use_triton(h, g)
        work = _logit_buffers(fast, min(chunk_size, n), valid, h, g, cdtype, scratch=True)
        order, counts = _teacher_order(teacher_index, n, len(teacher_weights), h.device)
        for teacher, rows in _chunks(order, counts, chunk_size):
            m = rows.numel()
            if valid == 0:
                local = fill_no_mass_statistics_(torch.empty(m, 5, dtype=cdtype, device=h.device))
            else:
                h_rows = h.index_select(0, rows)
                a = _logits_into(work[0][:m], h_rows, w[:valid])
                b = _logits_into(work[1][:m], g.index_select(0, rows), teacher_weights[teacher][:valid])
                if fast:  # the kernels leave a and b holding the logits
                    local = triton_kernels.kl_statistics(a, b, valid, temperature)
                else:
                    local = local_kl_statistics(a, b, work[2][:m], temperature)
            chunk_norms = combine_kl_statistics(local, group)
            norms.index_copy_(0, rows, chunk_norms)
            if valid > 0 and (want_dh or want_dw):
                if fast:
                    unit = torch.where(torch.isfinite(chunk_norms[:, 2]), 1.0 / temperature, 0.0)
                    grad_z = triton_kernels.kl_grad(a, b, chunk_norms, unit, valid, temperature, out=b)
                else:
                    grad_z = unit_kl_grad_from_statistics_(a, b, local, chunk_norms, temperature)
                grad_z = grad_z.to(w.dtype)
                if want_dh:
                    unit_dh.index_copy_(0, rows, grad_z @ w[:valid])
                if want_dw:
                    _accumulate_weight_grad(unit_dw, grad_z, h_rows)
        ctx.save_for_backward(h, w, g, teacher_index, norms, unit_dh, *teacher_weights)
        ctx.temperature, ctx.shard, ctx.group, ctx.chunk_size = temperature, shard, group, chunk_size
        ctx.fast = fast
        ctx.unit_dw, ctx.grad_w = unit_dw, grad_w
        return norms[:, 2].clone()

    @staticmethod
    def backward(ctx, grad_kl):
        h, w, g, teacher_index, norms, unit_dh, *teacher_weights = ctx.saved_tensors
        finite = torch.isfinite(norms[:, 2])
        grad_kl = torch.where(finite, grad_kl.to(norms.dtype), 0.0)
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = unit_dh * grad_kl[:, None].to(unit_dh.dtype)
            # Each shard saw only its own vocabulary columns: sum the partial input gradients.
            all_reduce_(grad_h, dist.ReduceOp.SUM, ctx.group)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(ctx, h, w, g, teacher_index, norms, teacher_weights, grad_kl, finite)
        return (grad_h, grad_w) + (None,) * (7 + len(teacher_weights))


def _weight_grad(
    ctx: Any,
    h: torch.Tensor,
    w: torch.Tensor,
    g: torch.Tensor,
    teacher_index: torch.Tensor | None,
    norms: torch.Tensor,
    teacher_weights: list[torch.Tensor],
    grad_kl: torch.Tensor,
    finite: torch.Tensor,
) -> torch.Tensor:
    """sum_t g_t X_t = c S + sum_t (g_t - c) X_t, recomputing X_t only where g_t differs from c."""
    valid, temperature, cdtype = ctx.shard.valid, ctx.temperature, norms.dtype
    unit_dw, grad_w = ctx.unit_dw, ctx.grad_w
    ctx.unit_dw = ctx.grad_w = None  # handed out below; a second backward recomputes everything
    if unit_dw is None:
        grad_w, unit_dw = _weight_grad_buffers(w, valid, cdtype)
        common = grad_kl.new_zeros(())
    else:
        common = _most_common(grad_kl[finite])
    unit_dw.mul_(common)
    residual = grad_kl - common * finite
    rows = torch.nonzero(residual != 0).squeeze(1)
    if valid > 0 and rows.numel() > 0:
        row_teachers = None if teacher_index is None else teacher_index[rows]
        order, counts = _teacher_order(row_teachers, rows.numel(), len(teacher_weights), h.device)
        scale = residual / temperature
        work = _logit_buffers(ctx.fast, min(ctx.chunk_size, rows.numel()), valid, h, g, cdtype, scratch=False)
        for teacher, chunk in _chunks(rows[order], counts, ctx.chunk_size):
            m = chunk.numel()
            h_rows = h.index_select(0, chunk)
            a = _logits_into(work[0][:m], h_rows, w[:valid])
            b = _logits_into(work[1][:m], g.index_select(0, chunk), teacher_weights[teacher][:valid])
            if ctx.fast:
                grad_z = triton_kernels.kl_grad(a, b, norms[chunk], scale[chunk], valid, temperature, out=b)
            else:
                grad_z = kl_grad_(a, b, norms[chunk], scale[chunk], temperature)
            grad_z = grad_z.to(w.dtype)
            _accumulate_weight_grad(unit_dw, grad_z, h_rows)
    if w.dtype != cdtype:
        grad_w[:valid] = unit_dw
    return grad_w


def _check_fused_inputs(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weights: Sequence[torch.Tensor],
    teacher_index: torch.Tensor | None,
    chunk_size: int,
) -> None:
    if student_weight.dim() != 2 or student_hidden.shape[-1] != student_weight.shape[1]:
        raise ValueError(
            f"student_weight must be the output-layer shard [V/TP, d] with d = student_hidden's "
            f"last dimension {student_hidden.shape[-1]}, got {tuple(student_weight.shape)}"
        )
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(
            f"teacher_hidden {tuple(teacher_hidden.shape)} and student_hidden "
            f"{tuple(student_hidden.shape)} must have the same tokens"
        )
    if not teacher_weights:
        raise ValueError("teacher_weight is an empty sequence")
    for k, u in enumerate(teacher_weights):
        if u.dim() != 2 or u.shape != (student_weight.shape[0], teacher_hidden.shape[-1]):
            raise ValueError(
                f"teacher {k}'s output-layer shard must be [V/TP, d_teacher] = "
                f"[{student_weight.shape[0]}, {teacher_hidden.shape[-1]}] (the student's vocabulary "
                f"shard, teacher_hidden's width), got {tuple(u.shape)}"
            )
        if u.dtype != teacher_hidden.dtype:
            raise ValueError(f"teacher {k}'s weight is {u.dtype}, teacher_hidden {teacher_hidden.dtype}")
    if student_weight.dtype != student_hidden.dtype:
        raise ValueError(f"student_weight is {student_weight.dtype}, student_hidden {student_hidden.dtype}")
    if teacher_index is None:
        if len(teacher_weights) > 1:
            raise ValueError(
                f"{len(teacher_weights)} teacher weights need a teacher_index naming each row's teacher"
            )
    else:
        if teacher_index.dtype != torch.long or teacher_index.shape != student_hidden.shape[:-1]:
            raise ValueError(
                f"teacher_index must be int64 of shape {tuple(student_hidden.shape[:-1])}, got "
                f"{teacher_index.dtype} {tuple(teacher_index.shape)}"
            )
        lowest, highest = (0, 0)
        if teacher_index.numel():
            lowest, highest = int(teacher_index.min()), int(teacher_index.max())
        if not 0 <= lowest <= highest < len(teacher_weights):
            raise ValueError(
                f"teacher_index values must lie in [0, {len(teacher_weights)}), got [{lowest}, {highest}]"
            )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def fused_linear_reverse_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor | Sequence[torch.Tensor],
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    group: dist.ProcessGroup | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    teacher_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token KL(softmax(h W^T / T) || softmax(g U^T / T)) without materialising the logits.

    Args:
        student_hidden: [..., d] the hidden states entering the student's output layer, full on
            every TP rank (gather sequence-parallel activations first; see docs/losses.md). Pass
            the response rows only: the backward recomputes the rows whose incoming gradient
            differs from the most common one, i.e. the masked rows of a masked mean.
        student_weight: [V/TP, d] this rank's shard of the student's output-layer weight.
        teacher_hidden: [..., d_teacher] the teacher's final hidden states for the same tokens;
            gets no gradient.
        teacher_weight: [V/TP, d_teacher] this rank's shard of the teacher's output layer, or a
            sequence of such shards, one per teacher (then `teacher_index` is required).
        temperature, vocab_size, group: as in `vocab_parallel_reverse_kl`.
        chunk_size: tokens per chunk; the work memory is 3 x chunk_size x V/TP float32.
        teacher_index: [...] int64, the teacher (position in `teacher_weight`) of each token.

    Returns:
        [...] the KL per token, float32 (float64 for float64 inputs). Gradients flow to
        `student_hidden` (summed over the TP group) and `student_weight` (this shard's rows).
    """
    teacher_weights = [teacher_weight] if isinstance(teacher_weight, torch.Tensor) else list(teacher_weight)
    _check_fused_inputs(
        student_hidden, student_weight, teacher_hidden, teacher_weights, teacher_index, chunk_size
    )
    check_temperature(temperature)
    shard = VocabShard.of(student_weight.shape[0], vocab_size, group)
    d, d_teacher = student_hidden.shape[-1], teacher_hidden.shape[-1]
    # Decided here: inside forward, needs_input_grad ignores an enclosing torch.no_grad().
    wanted = tuple(torch.is_grad_enabled() and x.requires_grad for x in (student_hidden, student_weight))
    kl = _FusedLinearReverseKL.apply(
        student_hidden.reshape(-1, d),
        student_weight,
        teacher_hidden.reshape(-1, d_teacher).detach(),
        None if teacher_index is None else teacher_index.reshape(-1),
        temperature,
        shard,
        group,
        chunk_size,
        wanted,
        *(u.detach() for u in teacher_weights),
    )
    return kl.reshape(student_hidden.shape[:-1])
