"""Held-out accuracy per domain: greedy decoding checked by each domain's rule-based verifier."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_opd.data.domains import PromptSource, get_domain
from megatron_opd.data.tokenizer import CharTokenizer
from megatron_opd.rollout.config import SamplingParams
from megatron_opd.rollout.embedded import generate, responses


def domain_accuracy(
    model: torch.nn.Module,
    source: PromptSource,
    tokenizer: CharTokenizer,
    *,
    max_len: int,
    max_new_tokens: int,
    batch_size: int = 64,
    limit: int = 0,
) -> dict[str, float]:
    """{'acc/<domain>': accuracy, 'acc/mean': their mean} on the held-out prompts, split across
    data-parallel replicas.

    Collective over the whole world (every rank calls it).
    """
    from megatron.core import parallel_state

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    counts = torch.zeros(len(source.domains), 2, dtype=torch.float64)
    for d, domain in enumerate(source.domains):
        prompts = source.eval_prompts(domain.name)
        prompts = prompts[:limit] if limit else prompts
        mine = prompts[dp_rank::dp_size]
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            batch = generate(model, chunk, tokenizer, params, max_len=max_len)
            correct = sum(get_domain(p.domain).verify(p.text, r) for p, r in zip(chunk, responses(batch, tokenizer)))
            counts[d] += torch.tensor([correct, len(chunk)], dtype=torch.float64)
    # Only one rank per data-parallel replica counts (TP/PP ranks of a replica hold copies).
    first_of_replica = (
        parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_pipeline_model_parallel_rank() == 0
        and parallel_state.get_context_parallel_rank() == 0
    )
    if not first_of_replica:
        counts.zero_()
    dist.all_reduce(counts)
    acc = {f"acc/{d.name}": float(c / n) if n else float("nan") for d, (c, n) in zip(source.domains, counts.tolist())}
    acc["acc/mean"] = sum(acc.values()) / len(acc)
    return acc
