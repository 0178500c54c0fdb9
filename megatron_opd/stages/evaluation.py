"""Verification per domain, reduced over replicas: held-out accuracy and rollout accuracy.

`verify_by_domain` is the one path from responses to per-domain counts: the replica's first rank
verifies (a judge or a sandbox runs once per replica), the results reach the rest of the replica,
and [correct, total] per domain is all-reduced over the replicas. `held_out_accuracy` decodes the
held-out prompts greedily and counts through it; on-policy stages count their samples through it.

Every data-parallel replica calls `generate` the same number of times for each domain (a replica
whose share ran out calls it with an empty chunk): an MoE student's expert all-to-alls pair the
replicas of an EP group, whose shares of the held-out prompts can differ in size by one.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.distributed as dist

from megatron_opd.data.prompts import Prompt, PromptSource
from megatron_opd.data.tokenizer import Tokenizer
from megatron_opd.rewards.base import Reward, is_correct, score_responses
from megatron_opd.rewards.types import RewardResult
from megatron_opd.rollout.config import SamplingParams
from megatron_opd.rollout.embedded import generate, responses
from megatron_opd.runtime.distributed import on_replica_source, replica_group_and_src


def verify_by_domain(
    domains: Sequence[str], prompts: Sequence[Prompt], texts: Sequence[str], reward_of: Mapping[str, Reward]
) -> tuple[list[RewardResult], torch.Tensor]:
    """(each response's reward result, on every rank of its replica; [D, 4] float64 [correct,
    score sum, samples, timed out] per domain of `domains`, summed over the data-parallel replicas).

    Collective over the whole world (every rank calls it, each with its replica's rows)."""
    group, src = replica_group_and_src()
    results = on_replica_source(lambda: score_responses(prompts, texts, reward_of), src, group)
    counts = torch.zeros(len(domains), 4, dtype=torch.float64)
    index = {d: i for i, d in enumerate(domains)}
    for p, r in zip(prompts, results):
        row = [float(is_correct(r)), r.score, 1.0, float(r.timed_out)]
        counts[index[p.domain]] += torch.tensor(row, dtype=torch.float64)
    return results, sum_over_replicas(counts)


def sum_over_replicas(tally: torch.Tensor) -> torch.Tensor:
    """The sum over data-parallel replicas of a host tally that every rank of a replica holds a
    copy of: one rank per replica counts (its TP/PP ranks hold copies; CP ranks share its rows).
    Collective over the whole world; `tally` is not modified."""
    from megatron.core import parallel_state

    _, src = replica_group_and_src()
    counted = dist.get_rank() == src and parallel_state.get_context_parallel_rank() == 0
    out = tally.clone() if counted else torch.zeros_like(tally)
    dist.all_reduce(out)
    return out


def held_out_accuracy(
    model: torch.nn.Module,
    source: PromptSource,
    tokenizer: Tokenizer,
    reward_of: Mapping[str, Reward],
    *,
    max_len: int,
    max_new_tokens: int,
    batch_size: int = 64,
    limit: int = 0,
    kv_cache: bool = True,
) -> dict[str, float]:
    """{'acc/<domain>': accuracy, 'acc/mean': their mean} on the held-out prompts (greedy decoding
    of up to `max_new_tokens`, with the embedded engine's KV cache unless `kv_cache` is false),
    split across data-parallel replicas.

    Collective over the whole world (every rank calls it).
    """
    from megatron.core import parallel_state

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    prompts: list[Prompt] = []
    texts: list[str] = []
    for domain in source.domains:
        held_out = source.eval_prompts(domain)
        pool = held_out[:limit] if limit else held_out
        # The same number of calls on every replica (the largest share's chunks; see the module doc).
        calls = -(-len(pool[0::dp_size]) // batch_size)
        mine = pool[dp_rank::dp_size]
        for start in range(0, calls * batch_size, batch_size):
            chunk = mine[start : start + batch_size]  # empty once this replica's share ran out
            prompts += chunk
            batch = generate(model, chunk, tokenizer, params, max_len=max_len, kv_cache=kv_cache)
            texts += responses(batch, tokenizer)
    _, counts = verify_by_domain(source.domains, prompts, texts, reward_of)
    acc = {f"acc/{d}": float(c / n) if n else float("nan") for d, (c, _, n, _) in zip(source.domains, counts.tolist())}
    acc["acc/mean"] = sum(acc.values()) / len(acc)
    return acc


def evaluate_held_out(cfg, model: torch.nn.Module, source: PromptSource, tokenizer: Tokenizer, reward_of) -> dict[str, float]:
    """A stage's evaluation: held-out accuracy with the job's response budget
    (`rollout.max_new_tokens`, the same for every stage), sequence limit and `rollout.kv_cache`."""
    return held_out_accuracy(
        model, source, tokenizer, reward_of, max_len=cfg.model.max_seq_len, max_new_tokens=cfg.rollout.max_new_tokens,
        kv_cache=cfg.rollout.kv_cache,
    )  # fmt: skip
