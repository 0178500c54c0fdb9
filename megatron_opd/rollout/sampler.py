"""The one sampler: next tokens from [batch, V] logits with SGLang's semantics (torch only).

Used by the embedded rollout engine (rollout/embedded.py) and the SGLang-compatible server
(serving/backend.py), so a trajectory sampled in-job and one sampled over HTTP follow the same
rules. The rules, as read from the sglang==0.5.23 source:

- `sampling_params.py` `SamplingParams.normalize`: a temperature below 1e-6 means greedy and is
  turned into top_k=1 at temperature 1; top_k=-1 means the whole vocabulary (our 0).
- `sampler.py` `Sampler.forward`: a greedy batch takes `argmax(logits)` (the first index of the
  maximum) and reports `log_softmax(logits)`; otherwise the logits are divided by the
  temperature, turned into probabilities, filtered, and the reported log-probability of the
  chosen token is `log(softmax(logits / T))` - the temperature-scaled distribution *before*
  top-k/top-p/min-p. (Unless the server sets SGLANG_RETURN_ORIGINAL_LOGPROB, then it is the
  raw `log_softmax(logits)`; that switch is not reproduced.)
- `sampler.py` `top_k_top_p_min_p_sampling_from_probs_torch`: sort the probabilities in
  descending order; drop ranks >= top_k; drop a token when the mass before it is `> top_p`
  (a token whose preceding mass equals top_p exactly stays); then drop tokens whose
  probability is `< min_p * p_max`; sample from what is left (unnormalised, as multinomial
  does). Top-p compares against the mass of the full distribution, not the top-k-renormalised
  one, and min-p against the top token of the full distribution.

The kept set of a position (what GRPO's "keep sampling mask" needs, SGLang's
`return_sampling_mask`) is returned on request as token ids, `kept_ids` [batch, K] padded with
-1, in descending probability, never as a dense [batch, V] mask.

Where we choose (SGLang leaves it to its kernels): ties in the sort are broken by the lower
token id (a stable sort), so top-k at a tie keeps exactly k tokens, deterministically; the
reported log-probability is computed with `log_softmax`, which equals SGLang's `log(softmax)` up
to rounding and stays finite for tiny probabilities; draws come from the caller's
`torch.Generator` (SGLang's seeded path hashes `sampling_seed`), so only the distribution, not
the random stream, is SGLang's. For a greedy request the reported log-probability is
`log_softmax(logits)` even when an explicit top_k=1 comes with a temperature other than 1
(SGLang's all-greedy batch does this; a greedy row inside a mixed batch would report the
tempered value).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_opd.rollout.config import SamplingParams

GREEDY_TEMPERATURE = 1e-6  # sglang/srt/sampling/sampling_params.py: _SAMPLING_EPS


@dataclass
class SampleResult:
    """One sampled token per row, its reported log-probability, and optionally the kept sets."""

    tokens: torch.Tensor  # [b] long
    logprobs: torch.Tensor  # [b] float32, as SGLang's output_token_logprobs (see the module doc)
    # [b, K] long, the token ids the sampler could have drawn, most probable first, -1 padded;
    # None when not asked for or when nothing is filtered (the whole vocabulary is kept).
    kept_ids: torch.Tensor | None = None


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_TEMPERATURE or params.top_k == 1


def filters(params: SamplingParams) -> bool:
    """Whether the sampler drops tokens at all (greedy keeps one)."""
    return is_greedy(params) or params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0


def reported_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[b, V] float32: the distribution the reported log-probabilities come from."""
    logits = logits.float()
    if is_greedy(params):
        return torch.log_softmax(logits, -1)
    return torch.log_softmax(logits / params.temperature, -1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[b] float32: the reported log-probability of `tokens` [b] under `logits` [b, V]."""
    return reported_logprobs(logits, params).gather(-1, tokens.long()[:, None]).squeeze(-1)


def _sorted_keep(probs: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted probabilities, their token ids, keep mask) in descending order, ties by token id."""
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    keep = torch.ones_like(sorted_p, dtype=torch.bool)
    if params.top_k > 0:
        keep &= torch.arange(sorted_p.shape[-1], device=probs.device)[None, :] < params.top_k
    if params.top_p < 1.0:
        keep &= (torch.cumsum(sorted_p, -1) - sorted_p) <= params.top_p
    if params.min_p > 0.0:
        keep &= sorted_p >= sorted_p[:, :1] * params.min_p
    return sorted_p, order, keep


def _kept_ids(order: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # Every filter keeps a prefix of the sorted order, so the kept set is the first n tokens.
    width = int(keep.sum(-1).max())
    return torch.where(keep[:, :width], order[:, :width], torch.full_like(order[:, :width], -1))


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    *,
    return_kept: bool = False,
) -> SampleResult:
    """Sample one token per row of `logits` [b, V] (any float dtype, any device; the result is on
    that device). `return_kept` also returns each row's kept set when the sampler filters."""
    if logits.dim() != 2:
        raise ValueError(f"sample() takes [batch, vocab] logits, got shape {tuple(logits.shape)}")
    logits = logits.float()
    if is_greedy(params):
        tokens = torch.argmax(logits, -1)
        kept = tokens[:, None].clone() if return_kept else None
        return SampleResult(tokens, token_logprobs(logits, tokens, params), kept)
    probs = torch.softmax(logits / params.temperature, -1)
    kept = None
    if filters(params):
        sorted_p, order, keep = _sorted_keep(probs, params)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p * keep)
        kept = _kept_ids(order, keep) if return_kept else None
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return SampleResult(tokens, token_logprobs(logits, tokens, params), kept)


def kept_set_logprobs(reported: torch.Tensor, tokens: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """[n] the log-probability of `tokens` [n] renormalised over the kept sets `kept` [n, K] (-1
    padded): reported[token] - logsumexp(reported[kept]), with `reported` [n, V] log-probs."""
    mass = reported.gather(-1, kept.clamp(min=0)).masked_fill(kept < 0, float("-inf")).logsumexp(-1)
    return reported.gather(-1, tokens[:, None]).squeeze(-1) - mass


def stops(token: int, params: SamplingParams, eos_id: int | None) -> bool:
    """Whether generation finishes after `token` (it is kept in the output, as in SGLang).
    `eos_id` None: EOS does not stop (SGLang's ignore_eos)."""
    return token in params.stop_token_ids or (eos_id is not None and token == eos_id)


__all__ = ["SampleResult", "sample", "token_logprobs", "reported_logprobs", "kept_set_logprobs", "is_greedy", "filters", "stops"]
