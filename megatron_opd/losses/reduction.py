"""From per-token losses to the number a trainer calls backward on, without bias.

Every loss in this package is per token; reducing is the caller's job, and the reduction that
matches "the mean over the step's response tokens" is not the mean of per-micro-batch means.

A step has D data-parallel ranks running M micro-batches each; N is the number of response tokens
in the whole step (every micro-batch of every DP rank), counted with `count_response_tokens`
before the step. The objective is the token mean
    L = (1/N) sum_{ranks, micro-batches, tokens} mask * loss.
Each micro-batch contributes sum(mask * loss) / N; those contributions summed over micro-batches
and DP ranks are exactly L, whatever the token counts per micro-batch (a mean of micro-batch means
would over-weight short micro-batches).

What happens after the loss decides the scale the helper must apply:
- gradients accumulate (sum) over micro-batches on each rank, then megatron's DDP averages them
  over the data-parallel group, i.e. divides the sum by the group size, unless
  `calculate_per_token_loss=True` (then it sums). So the helper multiplies by `dp_size`, the size
  of the group DDP averages over, to turn that average back into the sum that L needs.
- megatron's `forward_backward_func`, when `loss_func` returns (loss, logging dict), divides each
  micro-batch loss by `num_microbatches` (and multiplies it by the context-parallel size, which
  cancels the CP part of DDP's dp x cp averaging). Pass its `num_microbatches` then, and
  `dp_size` = the data-parallel size without CP. A trainer that calls backward itself passes
  num_microbatches=1 and dp_size = the size of DDP's gradient-averaging group (dp x cp).
- with `calculate_per_token_loss=True`, megatron sums gradients over DP and divides by the token
  count that `loss_func` returns as its second value: return (sum(mask * loss), mask.sum(), ...)
  and do not use this helper.

The value of the scaled loss is for backward; the step's mean loss for logging is the sum over
micro-batches and DP ranks of value / (dp_size * num_microbatches).

Rows (sequences) whose mask is all zero contribute zero loss and zero gradient, even when their
per-token loss is inf or NaN (masked positions are selected out, not multiplied by zero), and a
step with N = 0 gives a zero loss instead of 0/0.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist


def count_response_tokens(masks: Iterable[torch.Tensor], group: dist.ProcessGroup | None = None) -> int:
    """N: response tokens over all of this rank's micro-batch masks, summed over the DP `group`."""
    masks = list(masks)
    local = sum(int(mask.count_nonzero()) for mask in masks)
    if group is None:
        return local
    # On the masks' device: NCCL reduces only CUDA tensors.
    total = torch.tensor([local], dtype=torch.long, device=masks[0].device if masks else None)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return int(total)


def masked_token_mean(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    *,
    total_tokens: int | torch.Tensor,
    dp_size: int = 1,
    num_microbatches: int = 1,
) -> torch.Tensor:
    """This micro-batch's share of the step's token mean, scaled for megatron's averaging.

    Returns sum(mask * per_token) / total_tokens * dp_size * num_microbatches (a scalar), where
    total_tokens is the step's N (all micro-batches, all DP ranks). See the module docstring for
    which dp_size and num_microbatches to pass.
    """
    if per_token.shape != mask.shape:
        raise ValueError(
            f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} must have the same shape"
        )
    if int(total_tokens) < 0 or dp_size < 1 or num_microbatches < 1:
        raise ValueError(
            f"need total_tokens >= 0, dp_size >= 1, num_microbatches >= 1; got {int(total_tokens)}, "
            f"{dp_size}, {num_microbatches}"
        )
    masked_sum = torch.where(mask.bool(), per_token, 0.0).sum()
    return masked_sum * (dp_size * num_microbatches / max(int(total_tokens), 1))
