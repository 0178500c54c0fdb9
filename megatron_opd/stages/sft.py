"""SFT: next-token cross-entropy on demonstrations, the loss on the assistant's tokens only.

Demonstrations come from the job's source (data/sources.py): the tiny domains' prompts answered
by their rule, or the conversations of data.datasets' files. Each is rendered by the tokenizer
(`encode_conversation`: the chat template, with the mask of the assistant's tokens, each
assistant turn's content and its end token); position t's loss is on token t + 1 where that
token is the assistant's, with Megatron's padded vocabulary columns excluded.

Long sequences (data.datasets): a step's examples are sorted by length into micro-batches (length buckets), each
padded only to its own longest row (rounded up to 8, for sequence parallelism), so a step of
mostly short conversations with a few long ones does not pad every row to model.max_seq_len.
The loss returns its sum and token count, and the trainer divides by the step's total count
(stages/trainer.py), so the normalisation is exactly per token whatever the buckets. Under
pipeline parallelism all micro-batches share one width (the schedule's communication shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from megatron_opd.config import JobConfig
from megatron_opd.data.prompts import Demonstration, DemonstrationSource, Prompt, PromptSource, replica_slice
from megatron_opd.data.sources import job_prompt_source, source_metrics
from megatron_opd.data.tokenizer import Tokenizer
from megatron_opd.models.gpt import mask_vocab_padding
from megatron_opd.rewards.registry import rewards_for
from megatron_opd.stages.evaluation import evaluate_held_out
from megatron_opd.stages.trainer import MicroBatch, StatelessStage, StepBatch, Trainer, logits_forward, metric

WIDTH_MULTIPLE = 8


def encode_demonstrations(demos: Sequence[Demonstration], tokenizer: Tokenizer, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(ids, assistant mask) of each demonstration; one longer than `max_len` is refused, naming
    where it came from (sources that know the tokenizer drop or refuse such rows when loading)."""
    out = []
    for d in demos:
        ids, mask = tokenizer.encode_conversation(d.messages)
        if len(ids) > max_len:
            where = d.prompt.origin or d.prompt.sample_id
            raise ValueError(
                f"{where}: the conversation is {len(ids)} tokens, over model.max_seq_len={max_len}; raise "
                f"model.max_seq_len, or set data.bad_rows=drop to leave such rows out"
            )
        if not any(mask):
            raise ValueError(f"{d.prompt.origin or d.prompt.sample_id}: the conversation has no assistant token to train on")
        out.append((ids, mask))
    return out


def conversation_micro_batches(
    examples: Sequence[tuple[list[int], list[int]]], micro_batch_size: int, pad_id: int, max_len: int, *, bucket: bool
) -> list[MicroBatch]:
    """Micro-batches of `micro_batch_size` rows with `labels` (the next token) and `loss_mask`
    (1 where the next token is the assistant's). `bucket`: rows sorted by length, longest first,
    each micro-batch as wide as its own longest row; else in order, all as wide as the longest."""
    def width(rows: Sequence[int]) -> int:
        longest = max(len(examples[i][0]) for i in rows)
        return min(max_len, -(-longest // WIDTH_MULTIPLE) * WIDTH_MULTIPLE)

    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0])) if bucket else list(range(len(examples)))
    common = width(order)
    out = []
    for start in range(0, len(order), micro_batch_size):
        rows = order[start : start + micro_batch_size]
        w = width(rows) if bucket else common
        tokens = torch.full((len(rows), w), pad_id, dtype=torch.long)
        loss_mask = torch.zeros((len(rows), w), dtype=torch.float32)
        for b, i in enumerate(rows):
            ids, mask = examples[i]
            tokens[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            loss_mask[b, : len(ids) - 1] = torch.tensor(mask[1:], dtype=torch.float32)
        labels = torch.roll(tokens, -1, dims=1)
        positions = torch.arange(w).expand_as(tokens)
        out.append(MicroBatch(tokens, positions, {"labels": labels, "loss_mask": loss_mask}))
    return out


@dataclass
class VerifiedDomains:
    """The part of a prompt source whose domains have a verifier: what held-out accuracy runs on
    (SFT conversations without a verifier train, and are not evaluated)."""

    source: PromptSource
    domains: list[str]

    def eval_prompts(self, domain: str) -> list[Prompt]:
        return self.source.eval_prompts(domain)

    def reward_name(self, domain: str) -> str:
        return self.source.reward_name(domain)


class SFTStage(StatelessStage):
    name = "sft"
    progress_keys = ["loss", "acc/mean"]
    finite_metrics = ["loss"]

    def __init__(self, cfg: JobConfig, trainer: Trainer, tokenizer: Tokenizer):
        self.cfg, self.trainer, self.tokenizer = cfg, trainer, tokenizer
        self.source = job_prompt_source(cfg, tokenizer, demonstrations=True)
        if not isinstance(self.source, DemonstrationSource):
            raise TypeError(f"{type(self.source).__name__} supplies no demonstrations, which SFT trains on")
        verified = [d for d in self.source.domains if self.source.reward_name(d)]
        self.eval_source = VerifiedDomains(self.source, verified)
        self.reward_of = self.make_rewards()  # held-out accuracy verifies with them
        self.data_metrics = source_metrics(self.source)
        # Length buckets pay off for files of mixed lengths; the tiny domains all fit one width, and
        # keeping their rows in order keeps runs identical to earlier releases of the default job.
        self.bucket = cfg.parallel.pp == 1 and bool(cfg.data.datasets)

    def make_rewards(self):
        """The reward of each verified domain (the GRM's cold start attaches its judge)."""
        return rewards_for(self.eval_source)

    def make_batch(self, step: int) -> StepBatch:
        rows = replica_slice(step, self.cfg.train.global_batch_size, self.trainer.dp_rank, self.trainer.dp_size)
        demos = self.source.demonstrations(rows.start, len(rows))
        examples = encode_demonstrations(demos, self.tokenizer, self.cfg.model.max_seq_len)
        micro_batches = conversation_micro_batches(
            examples, self.cfg.train.micro_batch_size, self.tokenizer.pad_id, self.cfg.model.max_seq_len, bucket=self.bucket
        )
        return StepBatch(micro_batches, sample_ids=[d.prompt.sample_id for d in demos], metrics=dict(self.data_metrics))

    forward = staticmethod(logits_forward)

    def loss(self, mb: MicroBatch, logits: torch.Tensor):
        from megatron.core import tensor_parallel

        logits = mask_vocab_padding(logits, self.tokenizer.vocab_size).float()
        per_token = tensor_parallel.vocab_parallel_cross_entropy(logits, mb.data["labels"])
        mask = mb.data["loss_mask"]
        total = (per_token * mask).sum()
        count = mask.sum()
        return total, count.to(torch.int), {"loss": metric(total, count)}

    def evaluate(self, step: int) -> dict[str, float]:
        if not self.eval_source.domains:
            return {}
        return evaluate_held_out(self.cfg, self.trainer.module, self.eval_source, self.tokenizer, self.reward_of)
