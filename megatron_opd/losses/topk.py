"""Reverse KL against a teacher that sent only its top-k tokens, with the rest as one tail bucket.

The vocabulary is coarse-grained into the teacher's k ids plus one tail bucket (notes/opd-math.md,
section 2). The student's side is exact over the full, vocab-parallel vocabulary:
    p_k = softmax(z/T)[id_k],  p_tail = 1 - sum_k p_k,  q_tail = max(1 - sum_k q_k, tail_floor)
    KL_k = sum_k p_k (log p_k - log q_k) + p_tail (log p_tail - log q_tail)
Coarse-graining never increases a KL, so KL_k <= KL(p || q), with equality when the k ids hold all
of the teacher's mass; the teacher mass the k ids cover is returned beside the bound as its slack
metric.

The teacher's log-probabilities are taken as given: the teacher applies the distillation
temperature itself (one cannot re-temper a distribution from its top k alone). `temperature`
applies to the student's logits.

Everything after the vocab-parallel log-probabilities is O(tokens x k) and differentiated by
autograd; the only [tokens, V/TP] work is `vocab_parallel_logprobs`' chunked softmax.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from megatron_opd.losses.vocab_parallel import vocab_parallel_logprobs


class TopKReverseKL(NamedTuple):
    kl: torch.Tensor  # [...] the per-token lower bound KL_k, differentiable in the student logits
    teacher_mass: torch.Tensor  # [...] sum of the teacher's q over its top k (1: the bound is exact)


def _plogp_ratio(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p (log p - log q) with 0 where p = 0, free of NaN in both value and gradient."""
    has_mass = p > 0
    # The masked-out branch must stay finite too, or its zero gradient times inf becomes NaN.
    safe_log_p = torch.where(has_mass, log_p, 0.0)
    return torch.where(has_mass, p * (safe_log_p - log_q), 0.0)


def topk_reverse_kl(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    group: dist.ProcessGroup | None = None,
    tail_floor: float = 1e-6,
) -> TopKReverseKL:
    """Per-token top-k-with-tail lower bound on KL(p || q), vocab-parallel on the student side.

    Args:
        student_logits: [..., V/TP] this rank's shard of the student logits.
        teacher_topk_ids: [..., k] int64 global token ids (distinct within a row, < vocab_size);
            the same on every rank. Give padded rows distinct ids too (e.g. 0..k-1) and mask them.
        teacher_topk_logprobs: [..., k] the teacher's log q of those ids (at the distillation
            temperature); gets no gradient.
        temperature, vocab_size, group: as in `vocab_parallel_reverse_kl` (T on the student only).
        tail_floor: lower clamp of the teacher's tail mass, so log q_tail stays finite when the
            top k cover (numerically) everything.
    """
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape:
        raise ValueError(
            f"teacher_topk_ids {tuple(teacher_topk_ids.shape)} and teacher_topk_logprobs "
            f"{tuple(teacher_topk_logprobs.shape)} must have the same shape"
        )
    if not 0 < tail_floor < 1:
        raise ValueError(f"tail_floor must lie in (0, 1), got {tail_floor}")
    if teacher_topk_ids.numel():
        ordered = teacher_topk_ids.sort(dim=-1).values
        if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
            raise ValueError("teacher_topk_ids repeat an id within a row; top-k ids must be distinct")
    log_p = vocab_parallel_logprobs(
        student_logits, teacher_topk_ids, temperature=temperature, vocab_size=vocab_size, group=group
    )
    log_q = teacher_topk_logprobs.detach().to(log_p.dtype)
    p = log_p.exp()
    teacher_mass = log_q.exp().sum(dim=-1)
    p_tail = (1 - p.sum(dim=-1)).clamp_min(0.0)
    log_q_tail = (1 - teacher_mass).clamp_min(tail_floor).log()
    log_p_tail = torch.where(p_tail > 0, p_tail, 1.0).log()  # log 0 would poison the gradient
    kl = _plogp_ratio(p, log_p, log_q).sum(dim=-1) + _plogp_ratio(p_tail, log_p_tail, log_q_tail)
    return TopKReverseKL(kl=kl, teacher_mass=teacher_mass)
