"""The embedded rollout engine: the student's own megatron model samples in-job, under TP.

Every rank of a tensor-parallel group runs the same forward on the same prompts; the
vocab-parallel logits of the last position are gathered (one [batch, V] row per token, never
[batch, seq, V]), the TP group's first rank samples, and the chosen tokens are broadcast, so all
ranks of the group extend the same sequences. Each data-parallel replica samples its own prompts.

There is no KV cache: each new token re-runs the prefix. That is the right trade for the tiny
CPU models this engine serves (sequences of tens of tokens); at scale, rollouts go to SGLang.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_opd.data.domains import Prompt, encode_prompts, pack
from megatron_opd.data.tokenizer import CharTokenizer
from megatron_opd.data.trajectories import Trajectories
from megatron_opd.rollout.config import SamplingParams
from megatron_opd.rollout.sampler import sample, stops, token_logprobs


def _full_vocab_last_logits(
    model, tokens: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    from megatron.core import tensor_parallel

    logits = model(tokens, positions, None)  # [b, s, V/tp]
    last = logits[torch.arange(tokens.shape[0]), lengths - 1]  # [b, V/tp]
    # Sampling and bookkeeping stay on the CPU: one [b, V] row per token is cheap to move.
    return tensor_parallel.gather_from_tensor_model_parallel_region(last)[:, :vocab_size].float().cpu()


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: list[Prompt],
    tokenizer: CharTokenizer,
    params: SamplingParams,
    *,
    max_len: int,
    generator: torch.Generator | None = None,
) -> Trajectories:
    """Sample a response for each prompt; returns the batch with the sampler's log-probs.

    Collective over the tensor-parallel group (every rank passes the same prompts).
    """
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise NotImplementedError(
            "the embedded rollout engine runs with parallel.pp=1; use the SGLang rollout engine for PP>1"
        )
    was_training = model.training
    model.eval()
    encoded = encode_prompts(prompts, tokenizer)
    prompt_lens = [len(e) for e in encoded]
    budget = min(params.max_new_tokens, max_len - max(prompt_lens))
    if budget < 1:
        raise ValueError(f"prompts of {max(prompt_lens)} tokens leave no room under model.max_seq_len={max_len}")
    b = len(prompts)
    width = max(prompt_lens) + budget
    tokens = torch.full((b, width), tokenizer.pad_id, dtype=torch.long)
    for i, e in enumerate(encoded):
        tokens[i, : len(e)] = torch.tensor(e)
    lengths = torch.tensor(prompt_lens)
    logprobs = torch.zeros(b, budget)
    done = torch.zeros(b, dtype=torch.bool)
    finish = ["length"] * b
    group = parallel_state.get_tensor_model_parallel_group()
    src = parallel_state.get_tensor_model_parallel_src_rank()
    vocab = tokenizer.vocab_size
    device = next(model.parameters()).device
    positions = torch.arange(width, device=device)
    for j in range(budget):
        active = (~done).nonzero().flatten()
        if len(active) == 0:
            break
        cur = int(lengths[active].max())
        inputs = tokens[active, :cur].to(device)
        logits = _full_vocab_last_logits(model, inputs, positions[:cur].expand_as(inputs), lengths[active], vocab)
        # The TP source samples (rollout/sampler.py, SGLang's rules); every rank then takes the
        # reported log-probability of the broadcast tokens from the same gathered logits.
        choice = torch.zeros(len(active), dtype=torch.long)
        if dist.get_rank() == src:
            choice = sample(logits, params, generator).tokens
        if dist.get_world_size(group) > 1:
            dist.broadcast(choice, src=src, group=group)
        logprobs[active, j] = token_logprobs(logits, choice, params)
        tokens[active, lengths[active]] = choice
        lengths[active] += 1
        for a, c in zip(active.tolist(), choice.tolist()):
            if stops(c, params, tokenizer.eos_id):
                done[a] = True
                finish[a] = "stop"
    model.train(was_training)
    rows = [tokens[i, : lengths[i]].tolist() for i in range(b)]
    batch = pack(rows, prompt_lens, prompts, tokenizer, max_len)
    r = batch.max_response_len
    batch.behavior_logprobs = logprobs[:, :r] * (torch.arange(r) < batch.response_lens[:, None])
    batch.finish_reasons = finish
    return batch


def responses(batch: Trajectories, tokenizer: CharTokenizer) -> list[str]:
    """The decoded response of each row (up to its EOS)."""
    return [tokenizer.decode(row[p:n]) for row, p, n in zip(batch.tokens.tolist(), batch.prompt_lens.tolist(), batch.lengths.tolist())]
