"""SFT: next-token cross-entropy on demonstrations (here, the tiny domains' correct answers).

Used to train each domain teacher from scratch and to warm-start students. The loss covers the
response tokens (and EOS) only, with Megatron's padded vocabulary columns excluded.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_opd.config import JobConfig
from megatron_opd.data.domains import PromptSource, demonstrations
from megatron_opd.data.tokenizer import CharTokenizer
from megatron_opd.models.gpt import mask_vocab_padding
from megatron_opd.stages.evaluation import domain_accuracy
from megatron_opd.stages.trainer import MicroBatch, StepBatch, Trainer, logits_forward, metric, split_micro_batches


class SFTStage:
    name = "sft"
    progress_keys = ["loss", "acc/mean"]

    def __init__(self, cfg: JobConfig, trainer: Trainer, tokenizer: CharTokenizer):
        self.cfg, self.trainer, self.tokenizer = cfg, trainer, tokenizer
        self.source = PromptSource(cfg.data.domains, cfg.data.seed, cfg.data.eval_size)
        self.max_new_tokens = 8

    def make_batch(self, step: int) -> StepBatch:
        g, n = self.cfg.train.global_batch_size, self.trainer.samples_per_rank
        start = step * g + self.trainer.dp_rank * n
        batch = demonstrations(self.source.prompts(start, n), self.tokenizer, self.cfg.model.max_seq_len)
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
        return domain_accuracy(
            self.trainer.module,
            self.source,
            self.tokenizer,
            max_len=self.cfg.model.max_seq_len,
            max_new_tokens=self.max_new_tokens,
        )

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
