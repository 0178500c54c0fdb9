"""The GRPO policy loss as DeepSeek-V3.2 writes it (notes/opd-math.md, section 5), from log-probs.

Everything here is a pure function of per-token log-probabilities (get them vocab-parallel with
`vocab_parallel_logprobs`, renormalised over the sampler's kept sets with its `kept_ids`), so the
same code serves any model layout. Three pieces:

- `group_advantages`: A_i = R_i - mean(R) over a prompt's group of samples (V3.2; Dr.GRPO),
  optionally divided by the group's standard deviation (the original GRPO).
- `grpo_token_loss`: the per-token loss to minimise, -(clipped surrogate) * M_i + beta * KL_it,
  with V3.2's unbiased KL and off-policy sequence masking, and its metrics as (sum, count) pairs.
- `aggregation_weights`: per-token weights and the count to return with their sum, so that the
  trainer's "sum of the step's losses / sum of the step's counts" is either the per-token (DAPO)
  or the per-sequence (V3.2 eq. 5, 1/|o_i|) aggregation.

Sign convention: the objective J is maximised; the loss is -J per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

AdvantageScale = Literal["none", "std"]
Aggregation = Literal["token", "sequence"]


# --- advantages -------------------------------------------------------------------------------


def group_advantages(
    rewards: torch.Tensor,
    *,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    scale: AdvantageScale = "none",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantages A_i = (R_i - mean_g R) [/ (std_g R + eps)] per sample.

    Args:
        rewards: [n] one scalar reward per sample.
        group_size: samples i*G .. (i+1)*G - 1 form prompt i's group (n divisible by G).
        group_ids: [n] integer label of each sample's prompt group (any order, any labels).
            Give exactly one of `group_size` and `group_ids`.
        scale: "none" (V3.2, Dr.GRPO: no division) or "std" (original GRPO: divide by the group's
            sample standard deviation, Bessel-corrected as TRL and verl compute it, plus `eps`, so a
            group whose rewards are all equal gets A = 0, not 0/0).
        eps: added to the standard deviation under scale="std".

    Returns:
        [n] advantages in the rewards' floating dtype (computed in float64).

    Every group needs at least two samples (a lone sample's advantage is identically 0 and
    carries no signal), and every reward must be finite; both are errors naming the culprit.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [n], one per sample; got shape {tuple(rewards.shape)}")
    if scale not in ("none", "std"):
        raise ValueError(f"advantage scale must be 'none' or 'std', got {scale!r}")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    n = rewards.shape[0]
    if (group_size is None) == (group_ids is None):
        raise ValueError("give exactly one of group_size (contiguous groups) and group_ids (a label per sample)")
    if group_size is not None:
        if group_size < 2 or n % group_size:
            raise ValueError(
                f"group_size={group_size} must be >= 2 and divide the number of samples {n} "
                f"(a group of one has advantage 0 and no signal)"
            )
        group_ids = torch.arange(n, device=rewards.device) // group_size
    assert group_ids is not None
    if group_ids.shape != (n,) or group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor [n={n}], got {group_ids.dtype} {tuple(group_ids.shape)}")
    bad = ~torch.isfinite(rewards)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"reward of sample {i} is {float(rewards[i])}: every reward must be finite")
    labels, index, sizes = torch.unique(group_ids, return_inverse=True, return_counts=True)
    if (sizes < 2).any():
        lone = labels[sizes < 2].tolist()
        raise ValueError(f"groups {lone} have a single sample: GRPO needs at least two samples per prompt")
    r = rewards.to(torch.float64)
    mean = torch.zeros(len(labels), dtype=torch.float64, device=r.device).index_add_(0, index, r) / sizes
    centred = r - mean[index]
    if scale == "std":
        squares = torch.zeros_like(mean).index_add_(0, index, centred**2)
        std = (squares / (sizes - 1)).sqrt()
        centred = centred / (std[index] + eps)
    return centred.to(rewards.dtype if rewards.dtype.is_floating_point else torch.float32)


# --- aggregation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AggregationWeights:
    """Per-token weights [sequences, T] (0 off the mask) and the count to return beside
    sum(weights * loss) from a stage's loss."""

    weights: torch.Tensor
    count: torch.Tensor  # int scalar: tokens ("token") or non-empty sequences ("sequence")


def aggregation_weights(
    mask: torch.Tensor, aggregation: Aggregation = "token", *, dtype: torch.dtype = torch.float32
) -> AggregationWeights:
    """Weights that make the trainer's per-token reduction reproduce an aggregation rule.

    The trainer (stages/trainer.py, megatron's `calculate_per_token_loss`) sums what every
    micro-batch's loss returns, (sum, count), over micro-batches and data-parallel ranks and divides
    the summed loss by the summed count. With per-token losses l_it and mask m_it, a stage returns
    (sum(weights * l), count, ...):
    - "token" (DAPO): weights = m, count = number of tokens, so the step's loss is
      sum_it m_it l_it / sum_it m_it: every response token of the step weighs the same.
    - "sequence" (V3.2 eq. 5): weights = m_it / |o_i| with |o_i| = sum_t m_it, count = number of
      sequences with at least one token, so the step's loss is (1/S) sum_i (1/|o_i|) sum_t l_it
      over the step's S sequences: every sequence weighs the same, whatever its length. Sequences
      without tokens have nothing to average and are not counted.
    Both are exact whatever the micro-batch and rank split, with nothing global to know in advance.
    The weights are in `dtype` (float64 for float64 references).
    """
    if aggregation not in ("token", "sequence"):
        raise ValueError(f"aggregation must be 'token' (DAPO) or 'sequence' (V3.2, 1/|o_i|), got {aggregation!r}")
    if mask.dim() != 2:
        raise ValueError(f"mask must be [sequences, T], got shape {tuple(mask.shape)}")
    m = _as_bool_mask(mask)
    lengths = m.sum(dim=1)
    if aggregation == "token":
        return AggregationWeights(m.to(dtype), lengths.sum().to(torch.int))
    weights = m.to(dtype) / lengths.clamp_min(1)[:, None].to(dtype)
    return AggregationWeights(weights, (lengths > 0).sum().to(torch.int))


# --- the token loss ---------------------------------------------------------------------------


def _as_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must be boolean or hold only 0 and 1 (use aggregation_weights for weighting)")
    return mask.bool()


def _pair(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """A (sum, count) metric, shaped like stages/trainer.py's `metric()`: [2] float64, detached."""
    return torch.stack([total.detach().to(torch.float64), count.detach().to(torch.float64)])


def grpo_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    kl_coef: float = 0.0,
    opsm_delta: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token GRPO loss (to minimise) with V3.2's unbiased KL and off-policy sequence masking.

    Args:
        logprobs: [S, T] log pi_theta(o_it), differentiable (the only input that gets a gradient).
        old_logprobs: [S, T] log pi_old(o_it): the sampler's own log-probs, as the inference engine
            returned them (V3.2), not recomputed by the trainer.
        advantages: [S] A_i per sequence (`group_advantages`).
        mask: [S, T] bool (or 0/1): the response tokens. Values of the other inputs off the mask are
            never read (they may be padding, -inf or NaN).
        ref_logprobs: [S, T] log pi_ref(o_it) from the frozen reference, needed when kl_coef > 0;
            when given with kl_coef = 0 the KL is only reported.
        eps_low, eps_high: the clip range [1 - eps_low, 1 + eps_high] (eps_high > eps_low is DAPO's
            clip-higher).
        kl_coef: beta, the weight of the KL term.
        opsm_delta: delta of off-policy sequence masking (V3.2 eqs. 8-9); None turns it off.

    Per token, with r = exp(logprobs - old_logprobs), d = ref_logprobs - logprobs:
        policy_it = -min(r A_i, clip(r, 1 - eps_low, 1 + eps_high) A_i)
        kl_it     = r (exp(d) - d - 1)        (r NOT detached: d kl / d logprobs = r (logprobs - ref))
        loss_it   = M_i policy_it + kl_coef kl_it           (0 off the mask)
    with M_i = 0 when opsm_delta is set, A_i < 0 and mean_t (old_logprobs - logprobs) over sequence
    i's masked tokens > opsm_delta (the log-ratio is detached: M_i is a mask, not a function to
    differentiate), else 1. The KL term is kept for masked sequences.

    Returns:
        (loss [S, T] in the dtype of `logprobs`, metrics). Each metric is a [2] float64 tensor
        (sum, count), detached, as stages/trainer.py's `metric()` makes them: the trainer sums them
        over micro-batches and ranks and reports sum / count, so averages are exact.
        - "clip_low": tokens with A_i < 0 and r < 1 - eps_low (the lower bound is the active,
          gradient-free side of the min) / masked tokens;
        - "clip_high": tokens with A_i > 0 and r > 1 + eps_high / masked tokens;
          both are counted over every masked token, whether or not its sequence is masked by OPSM;
        - "opsm_masked": sequences whose policy term is dropped / sequences with >= 1 masked token
          (0 / n when opsm_delta is None);
        - "ratio": sum of r / masked tokens;
        - "kl": sum of kl_it / masked tokens (the unbiased estimate of KL(pi_theta || pi_ref) under
          samples from pi_old), only when ref_logprobs is given.
    """
    _check_loss_inputs(logprobs, old_logprobs, advantages, mask, ref_logprobs)
    if not (0 <= eps_low < 1 and eps_high >= 0 and math.isfinite(eps_high)):
        raise ValueError(f"clip range needs 0 <= eps_low < 1 and finite eps_high >= 0; got {eps_low}, {eps_high}")
    if not (kl_coef >= 0 and math.isfinite(kl_coef)):
        raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef}")
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} > 0 needs ref_logprobs (the frozen reference model's log-probs)")
    if opsm_delta is not None and not math.isfinite(opsm_delta):
        raise ValueError(f"opsm_delta must be a finite number or None, got {opsm_delta}")
    m = _as_bool_mask(mask)
    _check_finite_on_mask(m, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, advantages=advantages)
    # Constants of the loss, whatever graph they come from.
    old_logprobs, advantages = old_logprobs.detach(), advantages.detach()
    ref_logprobs = None if ref_logprobs is None else ref_logprobs.detach()

    # Off the mask the log-ratio is 0 (r = 1): padding never reaches an exp, and `where` sends no
    # gradient there.
    log_ratio = torch.where(m, logprobs - old_logprobs.to(logprobs.dtype), 0.0)
    ratio = log_ratio.exp()
    a = advantages.to(logprobs.dtype)[:, None]
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    policy = -torch.minimum(ratio * a, clipped * a)

    n_tokens = m.sum()
    lengths = m.sum(dim=1)
    has_tokens = lengths > 0
    if opsm_delta is None:
        dropped = torch.zeros_like(has_tokens)
    else:
        mean_log_ratio = (-log_ratio.detach()).sum(dim=1) / lengths.clamp_min(1)  # mean of old - current
        dropped = has_tokens & (advantages < 0) & (mean_log_ratio > opsm_delta)
    loss = torch.where(dropped[:, None], 0.0, policy)

    metrics = {
        "clip_low": _pair((m & (a < 0) & (ratio < 1 - eps_low)).sum(), n_tokens),
        "clip_high": _pair((m & (a > 0) & (ratio > 1 + eps_high)).sum(), n_tokens),
        "opsm_masked": _pair(dropped.sum(), has_tokens.sum()),
        "ratio": _pair(torch.where(m, ratio, 0.0).sum(), n_tokens),
    }
    if ref_logprobs is not None:
        d = torch.where(m, ref_logprobs.to(logprobs.dtype) - logprobs, 0.0)
        kl = ratio * (d.exp() - d - 1)
        metrics["kl"] = _pair(torch.where(m, kl, 0.0).sum(), n_tokens)
        if kl_coef > 0:
            loss = loss + kl_coef * kl
    return torch.where(m, loss, 0.0), metrics


def _check_loss_inputs(logprobs, old_logprobs, advantages, mask, ref_logprobs) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [sequences, T], got shape {tuple(logprobs.shape)}")
    if not logprobs.dtype.is_floating_point:
        raise ValueError(f"logprobs must be floating point, got {logprobs.dtype}")
    named = {"old_logprobs": old_logprobs, "mask": mask}
    if ref_logprobs is not None:
        named["ref_logprobs"] = ref_logprobs
    for name, t in named.items():
        if t.shape != logprobs.shape:
            raise ValueError(f"{name} {tuple(t.shape)} must have the shape of logprobs {tuple(logprobs.shape)}")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(
            f"advantages must be [sequences] = [{logprobs.shape[0]}], one per sequence; got {tuple(advantages.shape)}"
        )


def _check_finite_on_mask(m: torch.Tensor, *, advantages: torch.Tensor, **per_token: torch.Tensor | None) -> None:
    """The loss's constants must be finite where they are used: a -inf old log-prob on a response
    token means the sampler reports probability 0 for what it sampled."""
    bad_a = m.any(dim=1) & ~torch.isfinite(advantages)
    if bad_a.any():
        i = int(bad_a.nonzero()[0])
        raise ValueError(f"advantage of sequence {i} is {float(advantages[i])}: advantages must be finite")
    for name, t in per_token.items():
        if t is None:
            continue
        bad = m & ~torch.isfinite(t)
        if bad.any():
            i, j = bad.nonzero()[0].tolist()
            raise ValueError(f"{name}[{i}, {j}] is {float(t[i, j])} on a response token: it must be finite")
