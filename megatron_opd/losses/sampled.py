"""Sampled-token reverse KL: the cheapest teacher signal (notes/opd-math.md, section 3).

For y_t drawn from the student, k1_t = log p(y_t) - log q(y_t) is an unbiased one-sample estimate
of KL(p || q) at position t. Its gradient as a loss is the policy gradient
    grad KL(p || q) = E_{y ~ p}[(log p(y) - log q(y)) grad log p(y)]
(the other term, E[grad log p(y)], is zero), which the surrogate below reproduces.

Sign conventions: k1 >= 0 on average; the advantage is A_t = -k1_t (a token the teacher finds
less likely than the student does is penalised); the surrogate loss to minimise is
loss_t = -A_t.detach() * log p(y_t) = k1_t.detach() * log p(y_t). Its value is not a KL (log k1 for
that); its gradient k1_t * grad log p(y_t) is the single-sample estimate of grad KL.
"""

from __future__ import annotations

import torch


def _check_same_shape(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher log-probabilities of the sampled tokens differ in shape: "
            f"{tuple(student.shape)} vs {tuple(teacher.shape)}"
        )


def sampled_reverse_kl(
    student_logprobs_of_sampled: torch.Tensor, teacher_logprobs_of_sampled: torch.Tensor
) -> torch.Tensor:
    """Per-token k1 = log p(y) - log q(y); the teacher side is detached."""
    _check_same_shape(student_logprobs_of_sampled, teacher_logprobs_of_sampled)
    return student_logprobs_of_sampled - teacher_logprobs_of_sampled.detach()


def sampled_kl_policy_loss(
    student_logprobs_of_sampled: torch.Tensor, teacher_logprobs_of_sampled: torch.Tensor
) -> torch.Tensor:
    """Per-token policy-gradient surrogate with advantage -k1 (detached): -(-k1).detach() * log p(y)."""
    advantage = -sampled_reverse_kl(student_logprobs_of_sampled, teacher_logprobs_of_sampled).detach()
    return -advantage * student_logprobs_of_sampled
