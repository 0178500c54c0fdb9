"""Full-vocabulary reverse KL and token log-probabilities over a vocabulary split across TP ranks.

Each rank holds the logits of its vocabulary shard, as megatron's VocabParallel layers leave them:
rank r of the tensor-parallel group owns columns [r*Vp/tp, (r+1)*Vp/tp) of the padded vocabulary
Vp, and columns at or beyond the real `vocab_size` are padding, excluded from every softmax.
Nothing here gathers the vocabulary. A token's statistics are computed on each shard in float32
row chunks (so bf16 inputs never turn into a full fp32 copy), then combined across the group with
two all-reduces per call: one MAX and one SUM. Log-probabilities renormalised over the sampler's
kept sets (`vocab_parallel_logprobs(..., kept_ids=...)`) read only the kept columns and need a
single SUM all-reduce.

The math (notes/opd-math.md, section 1), per token with a = z/T and b = u/T:
    log Z_z = logsumexp(a),  log Z_u = logsumexp(b),  log p = a - log Z_z,  log q = b - log Z_u
    KL(p || q) = sum_v p_v (log p_v - log q_v)
    dKL/dz_v = p_v (log p_v - log q_v - KL) / T           (the teacher is a constant)
The backward recomputes p and q chunk by chunk from the saved logits and three numbers per token
instead of keeping [tokens, V/TP] float32 intermediates alive between forward and backward.

Conventions for masked columns (logit -inf): a column where p_v = 0 contributes nothing
(0 log 0 = 0), whatever the teacher says; a column where the teacher is -inf but the student has
mass makes the KL +inf (as it is mathematically), and so does a teacher row with no finite logit.
A student row with no finite logit has no distribution: its KL is NaN and its gradient zero; mask
such rows out (`masked_token_mean`). Logits must not be +inf or NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_opd.losses import triton_kernels

# Elements of one float32 [rows, V/TP] work buffer. Large enough that the per-op overhead of a
# chunk is small, small enough that three buffers stay a few tens of MiB whatever the vocabulary.
CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class VocabShard:
    """Where this rank's logit columns sit in the padded vocabulary, and how many are real."""

    rank: int
    world_size: int
    width: int  # columns on this rank: Vp / tp
    vocab_size: int  # real vocabulary; columns from here on are padding

    @property
    def start(self) -> int:
        return self.rank * self.width

    @property
    def valid(self) -> int:
        """Real (non-padding) columns on this rank; they come first in the shard."""
        return max(0, min(self.width, self.vocab_size - self.start))

    @classmethod
    def of(cls, width: int, vocab_size: int | None, group: dist.ProcessGroup | None) -> "VocabShard":
        if width < 1:
            raise ValueError(f"the vocabulary shard is empty (last dimension {width})")
        rank = 0 if group is None else dist.get_rank(group)
        world_size = 1 if group is None else dist.get_world_size(group)
        padded = width * world_size
        vocab_size = padded if vocab_size is None else vocab_size
        if not 1 <= vocab_size <= padded:
            raise ValueError(
                f"vocab_size={vocab_size} must be between 1 and the padded vocabulary "
                f"{padded} (= shard width {width} x tensor-parallel size {world_size})"
            )
        return cls(rank, world_size, width, vocab_size)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64 (gradcheck, references), float32 otherwise."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_temperature(temperature: float) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")


def all_reduce_(tensor: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> torch.Tensor:
    """In-place all-reduce over the tensor-parallel group; `group=None` means an unsplit vocabulary."""
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def row_chunks(n_rows: int, rows_per_chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n_rows, rows_per_chunk):
        yield start, min(start + rows_per_chunk, n_rows)


def rows_per_chunk(width: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(width, 1))


def chunk_copies(
    valid: int, cdtype: torch.dtype, *sources: torch.Tensor, scratch: int = 0
) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
    """(r0, r1, buffers) over row chunks: rows r0:r1 of each source's first `valid` columns,
    copied into compute-dtype work buffers the caller may overwrite, then `scratch` spare ones.
    The buffers are reused from chunk to chunk; nothing [rows, V] is allocated."""
    n = sources[0].shape[0]
    step = rows_per_chunk(valid)
    work = torch.empty(len(sources) + scratch, min(step, n), valid, dtype=cdtype, device=sources[0].device)
    for r0, r1 in row_chunks(n, step):
        buffers = [buf[: r1 - r0] for buf in work]
        for buf, source in zip(buffers, sources):
            buf.copy_(source[r0:r1, :valid])
        yield r0, r1, buffers


# --- per-chunk kernels -----------------------------------------------------------------------
# Each takes private work buffers `a` (student logits z) and `b` (teacher logits u) of one row
# chunk, already in the compute dtype, and overwrites them; no [rows, V] tensor is allocated.


def local_kl_statistics(
    a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Per-row statistics of one shard, relative to the shard's own maxima: [rows, 5] =
    (max a, max b, sum e, sum exp(b'), sum e (a' - b')) where a = z/T and b = u/T, a' and b' are
    them shifted by their shard maxima, and e = exp(a').

    Leaves e in `a` and e (a' - b') in `b` (NaN-free), which `unit_kl_grad_from_statistics_`
    turns into the gradient once the statistics are combined across ranks."""
    if temperature != 1.0:
        a.div_(temperature)
        b.div_(temperature)
    # A row with no finite logit on this shard gets the lowest finite maximum, not -inf, so the
    # shifts below and the combination across ranks stay free of inf - inf.
    floor = torch.finfo(a.dtype).min
    max_a = a.amax(dim=-1).clamp_min_(floor)
    max_b = b.amax(dim=-1).clamp_min_(floor)
    a.sub_(max_a[:, None])
    b.sub_(max_b[:, None])
    sum_b = torch.exp(b, out=scratch).sum(dim=-1)
    torch.sub(a, b, out=b)
    a.exp_()
    sum_a = a.sum(dim=-1)
    # NaN comes only from columns with exp(a) = 0 (0 * -inf, 0 * nan): they contribute nothing.
    weighted = b.mul_(a).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf).sum(dim=-1)
    return torch.stack([max_a, max_b, sum_a, sum_b, weighted], dim=1)


def fill_no_mass_statistics_(local: torch.Tensor) -> torch.Tensor:
    """Statistics of a shard that holds only padding: lowest maxima, no mass."""
    local[:, :2] = torch.finfo(local.dtype).min
    local[:, 2:] = 0.0
    return local


def combine_kl_statistics(local: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Shard statistics -> per-row (log Z_z, log Z_u, KL) [rows, 3]: one MAX and one SUM all-reduce."""
    local_max = local[:, :2]
    global_max = all_reduce_(local_max.clone(), dist.ReduceOp.MAX, group)
    rescale = torch.exp(local_max - global_max)
    shift = global_max - local_max
    sum_a, sum_b, weighted = local[:, 2], local[:, 3], local[:, 4]
    # Re-express the shard's sum_v e_v (a'_v - b'_v) against the global maxima.
    weighted = torch.where(
        rescale[:, 0] > 0, rescale[:, 0] * (weighted + sum_a * (shift[:, 1] - shift[:, 0])), 0.0
    )
    sums = torch.stack([sum_a * rescale[:, 0], sum_b * rescale[:, 1], weighted], dim=1)
    all_reduce_(sums, dist.ReduceOp.SUM, group)
    log_sum_a, log_sum_b = sums[:, 0].log(), sums[:, 1].log()
    kl = sums[:, 2] / sums[:, 0] - log_sum_a + log_sum_b
    kl = torch.where(sums[:, 1] == 0, math.inf, kl)  # the teacher puts no mass anywhere
    return torch.stack([global_max[:, 0] + log_sum_a, global_max[:, 1] + log_sum_b, kl], dim=1)


def kl_grad_(
    a: torch.Tensor, b: torch.Tensor, norms: torch.Tensor, scale: torch.Tensor, temperature: float
) -> torch.Tensor:
    """dKL/dz for one chunk, written into `b`: p (log p - log q - KL) * scale per row.

    `norms` holds the rows' (log Z_z, log Z_u, KL); `scale` is the incoming gradient / T.
    """
    if temperature != 1.0:
        a.div_(temperature)
        b.div_(temperature)
    a.sub_(norms[:, 0, None])  # log p
    torch.sub(a, b, out=b).add_((norms[:, 1] - norms[:, 2])[:, None])  # log p - log q - KL
    a.exp_()  # p
    b.mul_(a).mul_(scale[:, None])
    # p = 0 columns (0 * -inf) and rows without a distribution or with zero incoming gradient.
    return b.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)


def unit_kl_grad_from_statistics_(
    e: torch.Tensor, weighted: torch.Tensor, local: torch.Tensor, norms: torch.Tensor, temperature: float
) -> torch.Tensor:
    """dKL/dz for an incoming gradient of 1, from what `local_kl_statistics` left in its buffers.

    With r = exp(max a - log Z_z) and c = (max a - log Z_z) - (max b - log Z_u) per row,
    p = r e and log p - log q = (a' - b') + c, so dKL/dz = r (e (a' - b') + e (c - KL)) / T.
    Written into `weighted`; rows with an infinite or undefined KL get zero.
    """
    shifted_z = local[:, 0] - norms[:, 0]
    shifted_u = local[:, 1] - norms[:, 1]
    kl = norms[:, 2]
    finite = torch.isfinite(kl)
    e.mul_(torch.where(finite, shifted_z - shifted_u - kl, 0.0)[:, None])
    weighted.add_(e).mul_(torch.where(finite, shifted_z.exp() / temperature, 0.0)[:, None])
    return weighted.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


# --- full-vocabulary reverse KL from logits ----------------------------------------------------


def _flatten_rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class _ReverseKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, u, temperature, shard, group):
        cdtype = compute_dtype(z, u)
        valid = shard.valid
        fast = valid > 0 and triton_kernels.use_triton(z, u)
        if fast:
            local = triton_kernels.kl_statistics(z, u, valid, temperature)
        else:
            local = torch.empty(z.shape[0], 5, dtype=cdtype, device=z.device)
            if valid == 0:
                fill_no_mass_statistics_(local)
            for r0, r1, (a, b, scratch) in chunk_copies(valid, cdtype, z, u, scratch=1) if valid else ():
                local[r0:r1] = local_kl_statistics(a, b, scratch, temperature)
        norms = combine_kl_statistics(local, group)
        ctx.save_for_backward(z, u, norms)
        ctx.temperature, ctx.shard, ctx.fast = temperature, shard, fast
        return norms[:, 2].clone()

    @staticmethod
    def backward(ctx, grad_kl):
        z, u, norms = ctx.saved_tensors
        temperature, valid = ctx.temperature, ctx.shard.valid
        grad = torch.empty_like(z)
        scale = grad_kl.to(norms.dtype) / temperature
        if ctx.fast:  # writes the padding columns' zeros too
            triton_kernels.kl_grad(z, u, norms, scale, valid, temperature, out=grad)
        else:
            grad[:, valid:] = 0  # padding columns are not in the softmax
            for r0, r1, (a, b) in chunk_copies(valid, norms.dtype, z, u) if valid else ():
                grad[r0:r1, :valid] = kl_grad_(a, b, norms[r0:r1], scale[r0:r1], temperature)
        return grad, None, None, None, None


def vocab_parallel_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Per-token KL(softmax(z/T) || softmax(u/T)) over the full vocabulary, split across `group`.

    Args:
        student_logits: [..., V/TP], this rank's vocabulary shard of the student logits z.
        teacher_logits: [..., V/TP], the teacher logits u on the same shard; gets no gradient.
        temperature: T, applied to both sides.
        vocab_size: the real vocabulary; global columns >= vocab_size (megatron's padding) are
            excluded from both softmaxes. None: no padding.
        group: the tensor-parallel group the vocabulary is split over; None: not split.

    Returns:
        [...] the KL per token, float32 (float64 for float64 inputs), identical on every rank.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logit shards differ in shape: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}"
        )
    if student_logits.dim() < 1:
        raise ValueError("logits need a vocabulary dimension")
    check_temperature(temperature)
    shard = VocabShard.of(student_logits.shape[-1], vocab_size, group)
    kl = _ReverseKL.apply(
        _flatten_rows(student_logits), _flatten_rows(teacher_logits).detach(), temperature, shard, group
    )
    return kl.reshape(student_logits.shape[:-1])


# --- log-probabilities of chosen tokens ------------------------------------------------------


def _local_logsumexp(z: torch.Tensor, temperature: float, valid: int, cdtype: torch.dtype) -> torch.Tensor:
    out = torch.full((z.shape[0],), -math.inf, dtype=cdtype, device=z.device)
    for r0, r1, (a,) in chunk_copies(valid, cdtype, z) if valid else ():
        if temperature != 1.0:
            a.div_(temperature)
        torch.logsumexp(a, dim=-1, out=out[r0:r1])
    return out


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, ids, temperature, shard, group):
        cdtype = compute_dtype(z)
        valid = shard.valid
        local_lse = _local_logsumexp(z, temperature, valid, cdtype)
        floor = torch.finfo(cdtype).min  # keeps a row with no finite logit free of inf - inf
        global_max = all_reduce_(local_lse.clamp_min(floor), dist.ReduceOp.MAX, group)
        # Each id lives on exactly one rank; the others contribute 0 to the sum.
        local_ids = ids - shard.start
        on_shard = (local_ids >= 0) & (local_ids < valid)
        local_ids = local_ids.clamp(0, max(valid - 1, 0))
        picked = torch.where(on_shard, z.gather(-1, local_ids).to(cdtype) / temperature, 0.0)
        sums = torch.cat([torch.exp(local_lse - global_max)[:, None], picked], dim=1)
        all_reduce_(sums, dist.ReduceOp.SUM, group)
        log_norm = global_max + sums[:, 0].log()
        ctx.save_for_backward(z, local_ids, on_shard, log_norm)
        ctx.temperature, ctx.shard = temperature, shard
        return sums[:, 1:] - log_norm[:, None]

    @staticmethod
    def backward(ctx, grad_logprobs):
        # d log p_k / dz_v = (1[v = id_k] - p_v) / T
        z, local_ids, on_shard, log_norm = ctx.saved_tensors
        temperature, valid = ctx.temperature, ctx.shard.valid
        grad = torch.empty_like(z)
        grad[:, valid:] = 0
        if valid > 0:
            g = grad_logprobs.to(log_norm.dtype) / temperature
            picked = torch.where(on_shard, g, 0.0)
            total = g.sum(dim=-1)
            for r0, r1, (a,) in chunk_copies(valid, log_norm.dtype, z):
                if temperature != 1.0:
                    a.div_(temperature)
                a.sub_(log_norm[r0:r1, None]).exp_().mul_(-total[r0:r1, None])
                a.nan_to_num_(nan=0.0)  # rows without a distribution
                a.scatter_add_(-1, local_ids[r0:r1], picked[r0:r1])
                grad[r0:r1, :valid] = a
        return grad, None, None, None, None


class _KeptSetLogprobs(torch.autograd.Function):
    """log softmax over each row's kept set S: z_id/T - logsumexp_{a in S} z_a/T.

    A custom function rather than autograd through gather + logsumexp because the shards' sums
    meet in an all-reduce autograd cannot see through; it saves only O(tokens x K) besides the
    logits (no [tokens, V/TP] intermediate), and its backward writes the gradient on the kept
    columns alone."""

    @staticmethod
    def forward(ctx, z, ids, kept, temperature, shard, group):
        cdtype = compute_dtype(z)
        valid = shard.valid
        local_kept = kept - shard.start
        kept_here = (kept >= 0) & (local_kept >= 0) & (local_kept < valid)
        local_kept = local_kept.clamp(0, max(valid - 1, 0))
        kept_logits = torch.where(kept_here, z.gather(-1, local_kept).to(cdtype) / temperature, -math.inf)
        local_ids = ids - shard.start
        on_shard = (local_ids >= 0) & (local_ids < valid)
        local_ids = local_ids.clamp(0, max(valid - 1, 0))
        picked = torch.where(on_shard, z.gather(-1, local_ids).to(cdtype) / temperature, 0.0)
        # One SUM all-reduce of [rows, tp + k]: column r carries rank r's log-sum-exp over its kept
        # ids (the other ranks add 0, so it arrives exact, -inf included), then the target logits
        # (each read on the rank that owns it). Every rank then combines the tp partial sums itself.
        packed = torch.zeros(z.shape[0], shard.world_size + ids.shape[1], dtype=cdtype, device=z.device)
        packed[:, shard.rank] = torch.logsumexp(kept_logits, dim=-1)
        packed[:, shard.world_size:] = picked
        all_reduce_(packed, dist.ReduceOp.SUM, group)
        log_norm = torch.logsumexp(packed[:, : shard.world_size], dim=-1)
        # Which kept slot each target is (the wrapper checked that each target is in its set).
        target_slot = (kept[:, :, None] == ids[:, None, :]).to(cdtype)  # [rows, K, k]
        ctx.save_for_backward(z, local_kept, kept_here, target_slot, log_norm)
        ctx.temperature = temperature
        return packed[:, shard.world_size:] - log_norm[:, None]

    @staticmethod
    def backward(ctx, grad_logprobs):
        # d log p~_j / dz_v = (1[v = id_j] - p~_v 1[v in S]) / T, nonzero on kept columns only.
        z, local_kept, kept_here, target_slot, log_norm = ctx.saved_tensors
        temperature = ctx.temperature
        g = grad_logprobs.to(log_norm.dtype) / temperature
        p_kept = (z.gather(-1, local_kept).to(log_norm.dtype) / temperature - log_norm[:, None]).exp_()
        slot_grad = (target_slot @ g[:, :, None]).squeeze(-1) - g.sum(dim=-1, keepdim=True) * p_kept
        # Off-shard slots (clamped onto some column) add 0; rows without a distribution get 0.
        slot_grad = torch.where(kept_here, slot_grad.nan_to_num_(nan=0.0), 0.0)
        grad = torch.zeros_like(z)
        grad.scatter_add_(-1, local_kept, slot_grad.to(z.dtype))
        return grad, None, None, None, None, None


def _position(flat_row: int, leading: torch.Size) -> tuple[int, ...]:
    if not leading:
        return ()
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_row), tuple(leading)))


def check_kept_ids(kept_ids: torch.Tensor, ids: torch.Tensor, shard: VocabShard) -> None:
    """Kept sets must be real vocabulary ids (or -1 for an unused slot), distinct within a
    position, and contain the position's target ids; each error names the id or position."""
    leading = kept_ids.shape[:-1]
    padded = shard.width * shard.world_size
    kept = _flatten_rows(kept_ids)
    outside = (kept < -1) | (kept >= padded)
    if outside.any():
        row, slot = outside.nonzero()[0].tolist()
        raise ValueError(
            f"kept id {int(kept[row, slot])} at position {_position(row, leading)} is outside the padded "
            f"vocabulary [0, {padded}); kept_ids holds token ids, -1 for an unused slot"
        )
    padding = kept >= shard.vocab_size
    if padding.any():
        row, slot = padding.nonzero()[0].tolist()
        raise ValueError(
            f"kept id {int(kept[row, slot])} at position {_position(row, leading)} is in megatron's vocabulary "
            f"padding [vocab_size={shard.vocab_size}, {padded}), which no sampler can keep: the kept sets "
            f"or vocab_size are wrong"
        )
    ordered = kept.sort(dim=-1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if repeated.any():
        row, slot = repeated.nonzero()[0].tolist()
        raise ValueError(
            f"kept id {int(ordered[row, slot + 1])} appears twice in the kept set at position "
            f"{_position(row, leading)}; a kept set lists distinct ids"
        )
    targets = _flatten_rows(ids)
    missing = ~(targets[:, :, None] == kept[:, None, :]).any(dim=-1)
    if missing.any():
        row, j = missing.nonzero()[0].tolist()
        raise ValueError(
            f"target id {int(targets[row, j])} at position {_position(row, leading)} is not in that "
            f"position's kept set: the sampler keeps every token it samples, so the kept sets and the "
            f"tokens are misaligned (or the position is not a response position)"
        )


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    group: dist.ProcessGroup | None = None,
    kept_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """log softmax(z/T)[ids] over the full, vocab-parallel vocabulary, differentiable in the logits.

    Args:
        logits: [..., V/TP], this rank's shard of the logits.
        ids: [..., k] (long) global token ids, each in [0, vocab_size); the same on every rank.
        kept_ids: optional [..., K] (long) global ids of the tokens the sampler kept at each
            position (top-p / top-k), -1 for unused slots; the same on every rank. The
            log-probability is then renormalised over that set (keep sampling mask, V3.2):
            log p~(a) = z_a/T - logsumexp_{a' in S} z_{a'}/T. Each rank takes the log-sum-exp over
            the kept ids in its shard and one SUM all-reduce of (TP + k) numbers per position
            combines them; nothing [tokens, V] is formed or sent. Every kept id must be a real
            token (in [0, vocab_size): an id in megatron's padding is an error), distinct within a
            position, and every target must be in its position's kept set (pass response
            positions only).

    Returns:
        [..., k] log-probabilities, float32 (float64 for float64 logits), identical on every rank.
        Memory beyond the logits' own gradient is O(tokens x k) (O(tokens x K) with kept sets).
        The student's log-probability of its sampled tokens (for `sampled_reverse_kl`) is this
        with k = 1. The -inf conventions are the full softmax's: a -inf logit has probability 0 in
        its set; a position whose kept logits are all -inf has no distribution (NaN, gradient 0).
    """
    check_temperature(temperature)
    if ids.dtype != torch.long:
        raise ValueError(f"ids must be int64 token ids, got {ids.dtype}")
    if ids.dim() != logits.dim() or ids.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"ids {tuple(ids.shape)} must be [..., k] with the leading shape of the logits "
            f"{tuple(logits.shape)}"
        )
    shard = VocabShard.of(logits.shape[-1], vocab_size, group)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= shard.vocab_size):
        raise ValueError(
            f"token ids must lie in [0, vocab_size={shard.vocab_size}), got ids in "
            f"[{int(ids.min())}, {int(ids.max())}]"
        )
    if kept_ids is None:
        logprobs = _VocabParallelLogprobs.apply(
            _flatten_rows(logits), _flatten_rows(ids), temperature, shard, group
        )
        return logprobs.reshape(ids.shape)
    if kept_ids.dtype != torch.long:
        raise ValueError(f"kept_ids must be int64 token ids (-1 for unused slots), got {kept_ids.dtype}")
    if kept_ids.dim() != logits.dim() or kept_ids.shape[:-1] != logits.shape[:-1] or kept_ids.shape[-1] < 1:
        raise ValueError(
            f"kept_ids {tuple(kept_ids.shape)} must be [..., K] (K >= 1) with the leading shape of the "
            f"logits {tuple(logits.shape)}: padded id lists, never a dense [..., V] mask"
        )
    check_kept_ids(kept_ids, ids, shard)
    logprobs = _KeptSetLogprobs.apply(
        _flatten_rows(logits), _flatten_rows(ids), _flatten_rows(kept_ids), temperature, shard, group
    )
    return logprobs.reshape(ids.shape)


# --- entropy (a metric) ------------------------------------------------------------------------


@torch.no_grad()
def vocab_parallel_entropy(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """H(softmax(z/T)) = log Z - sum_v p_v a_v (a = z/T) per position, over the full vocab-parallel
    vocabulary (padding excluded), without gathering it: one MAX all-reduce (the shards' maxima)
    and one SUM all-reduce of two numbers per position (sum e^(a - m) and sum e^(a - m) a).

    A metric (GRPO's policy entropy): no gradient. logits [..., V/TP] -> [...] float32 (float64 for
    float64 logits), identical on every rank. -inf logits have probability 0 and add nothing; a
    position with no finite logit has no distribution (NaN).
    """
    check_temperature(temperature)
    shard = VocabShard.of(logits.shape[-1], vocab_size, group)
    z = _flatten_rows(logits)
    cdtype = compute_dtype(z)
    n, valid = z.shape[0], shard.valid
    local_max = torch.full((n,), -math.inf, dtype=cdtype, device=z.device)
    for r0, r1, (a,) in chunk_copies(valid, cdtype, z) if valid else ():
        local_max[r0:r1] = a.max(dim=-1).values / temperature
    floor = torch.finfo(cdtype).min  # a shard of -inf (or of padding only) must not give inf - inf
    global_max = all_reduce_(local_max.clamp_min(floor), dist.ReduceOp.MAX, group)
    sums = torch.zeros(n, 2, dtype=cdtype, device=z.device)  # sum e, sum e a
    for r0, r1, (a,) in chunk_copies(valid, cdtype, z) if valid else ():
        if temperature != 1.0:
            a.div_(temperature)
        e = (a - global_max[r0:r1, None]).exp()
        sums[r0:r1, 0] = e.sum(dim=-1)
        sums[r0:r1, 1] = torch.where(e > 0, e * a, 0.0).sum(dim=-1)  # 0 * -inf = 0 for masked columns
    all_reduce_(sums, dist.ReduceOp.SUM, group)
    entropy = global_max + sums[:, 0].log() - sums[:, 1] / sums[:, 0]
    return entropy.reshape(logits.shape[:-1])
