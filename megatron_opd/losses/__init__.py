"""The losses: OPD's vocab-parallel reverse-KL family and GRPO's policy loss (notes/opd-math.md).

- `vocab_parallel_reverse_kl`: exact full-vocabulary KL(student || teacher) from logit shards.
- `fused_linear_reverse_kl`: the same from hidden states and output-layer shards, never
  materialising the logits (one or several teachers per batch).
- `topk_reverse_kl`: the top-k-with-tail lower bound, and the teacher mass it covers.
- `sampled_reverse_kl` / `sampled_kl_policy_loss`: the one-sample k1 estimate and its
  policy-gradient surrogate.
- `vocab_parallel_logprobs`: log p of given token ids over the vocab-parallel vocabulary, or
  renormalised over the sampler's kept sets (`kept_ids`, padded id lists) for keep-sampling-mask.
- `vocab_parallel_entropy`: the entropy of softmax(z/T) per position (a metric: GRPO's policy entropy).
- `grpo_token_loss`: GRPO's per-token loss (clipped ratio, V3.2's unbiased KL, off-policy
  sequence masking) from log-probs, with (sum, count) metrics; `group_advantages` (R - mean over a
  prompt's group, optionally / std); `aggregation_weights` (per-token or per-sequence aggregation
  under the trainer's sum / count reduction).

Every loss returns a value per token with the leading shape of its inputs, identical on every
tensor-parallel rank. Reductions are the caller's: `masked_token_mean` (in `reduction`, whose
docstring explains the unbiased token mean across micro-batches and data-parallel ranks and how it
meets megatron's gradient averaging) turns per-token values into the loss to call backward on, with
`count_response_tokens` giving the step's token count.
"""

from megatron_opd.losses.fused import fused_linear_reverse_kl
from megatron_opd.losses.policy import AggregationWeights, aggregation_weights, group_advantages, grpo_token_loss
from megatron_opd.losses.reduction import count_response_tokens, masked_token_mean
from megatron_opd.losses.sampled import sampled_kl_policy_loss, sampled_reverse_kl
from megatron_opd.losses.topk import TopKReverseKL, topk_reverse_kl
from megatron_opd.losses.vocab_parallel import vocab_parallel_entropy, vocab_parallel_logprobs, vocab_parallel_reverse_kl

__all__ = [
    "AggregationWeights",
    "TopKReverseKL",
    "aggregation_weights",
    "count_response_tokens",
    "fused_linear_reverse_kl",
    "group_advantages",
    "grpo_token_loss",
    "masked_token_mean",
    "sampled_kl_policy_loss",
    "sampled_reverse_kl",
    "topk_reverse_kl",
    "vocab_parallel_entropy",
    "vocab_parallel_logprobs",
    "vocab_parallel_reverse_kl",
]
