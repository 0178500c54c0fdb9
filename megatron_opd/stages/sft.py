"""SFT: next-token cross-entropy on demonstrations (here, the tiny domains' correct answers).

Used to train each domain teacher from scratch and to warm-start students. The loss covers the
response tokens (and EOS) only, with Megatron's padded vocabulary columns excluded.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_opd.config import JobConfig
from megatron_opd.data.domains import demonstrations
from megatron_opd.data.prompts import replica_slice
from megatron_opd.data.sources import prompt_source
from megatron_opd.data.tokenizer import Tokenizer
from megatron_opd.models.gpt import mask_vocab_padding
from megatron_opd.rewards.registry import rewards_for
from megatron_opd.stages.evaluation import evaluate_held_out
from megatron_opd.stages.trainer import MicroBatch, StepBatch, Trainer, logits_forward, metric, split_micro_batches


class SFTStage:
    name = "sft"
    progress_keys = ["loss", "acc/mean"]
    finite_metrics = ["loss"]

    def __init__(self, cfg: JobConfig, trainer: Trainer, tokenizer: Tokenizer):
        self.cfg, self.trainer, self.tokenizer = cfg, trainer, tokenizer
        self.source = prompt_source(cfg.data)
        self.reward_of = self.make_rewards()  # held-out accuracy verifies with them

    def make_rewards(self):
        """The reward of each domain of the source (the GRM's cold start attaches its judge)."""
        return rewards_for(self.source)

    def make_batch(self, step: int) -> StepBatch:
        rows = replica_slice(step, self.cfg.train.global_batch_size, self.trainer.dp_rank, self.trainer.dp_size)
        batch = demonstrations(self.source.prompts(rows.start, len(rows)), self.tokenizer, self.cfg.model.max_seq_len)
        labels = torch.roll(batch.tokens, -1, dims=1)
        micro_batches = split_micro_batches(
            batch.tokens, self.cfg.train.micro_batch_size, labels=labels, loss_mask=batch.prediction_mask()
        )
        return StepBatch(micro_batches, sample_ids=batch.sample_ids)

    forward = staticmethod(logits_forward)

    def loss(self, mb: MicroBatch, logits: torch.Tensor):
        from megatron.core import tensor_parallel

        logits = mask_vocab_padding(logits, self.tokenizer.vocab_size).float()
        per_token = tensor_parallel.vocab_parallel_cross_entropy(logits, mb.data["labels"])
        mask = mb.data["loss_mask"]
        total = (per_token * mask).sum()
        count = mask.sum()
        return total, count.to(torch.int), {"loss": metric(total, count)}

    def after_step(self, step: int) -> dict[str, float]:
        return {}

    def evaluate(self, step: int) -> dict[str, float]:
        return evaluate_held_out(self.cfg, self.trainer.module, self.source, self.tokenizer, self.reward_of)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
