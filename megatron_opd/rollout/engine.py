"""`RolloutEngine`: where a stage's trajectories come from, and how new weights reach the sampler.

Two implementations behind one small interface:
- embedded: the student's own megatron model samples in-job under TP (rollout/embedded.py);
  weight sync is a no-op because the sampler is the trained model.
- sglang: SGLang servers (or our SGLang-compatible embedded server) sample over HTTP
  (rollout/sglang.py); after each update the new weights are pushed to them and every trajectory
  carries the `weight_version` that produced it, so stale samples are known.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import torch

from megatron_opd.data.prompts import Prompt
from megatron_opd.data.tokenizer import Tokenizer
from megatron_opd.data.trajectories import Trajectories
from megatron_opd.rollout.config import RolloutConfig
from megatron_opd.rollout.embedded import generate


class RolloutEngine(Protocol):
    def generate(self, prompts: list[Prompt], step: int, *, refill: int = 0) -> Trajectories:
        """Sample `prompts` for the rollout of step `step`; `refill` numbers the further batches
        a rollout may draw (GRPO's dynamic sampling), each with its own seeds (0: the rollout)."""
        ...

    def sync_weights(self, step: int) -> dict[str, float]: ...

    def close(self) -> None: ...


class EmbeddedRolloutEngine:
    """The student samples its own trajectories in-job (collective over its TP group), with the KV
    cache unless rollout.kv_cache=false, recording kept sets when the sampling truncates (unless
    rollout.keep_sampling_mask=false) and the routed experts with rollout.keep_routing."""

    def __init__(self, cfg: RolloutConfig, model: torch.nn.Module, tokenizer: Tokenizer, *, max_len: int, seed: int):
        self.cfg, self.model, self.tokenizer, self.max_len, self.seed = cfg, model, tokenizer, max_len, seed

    def generate(self, prompts: list[Prompt], step: int, *, refill: int = 0) -> Trajectories:
        from megatron.core import parallel_state

        # Seeded by (seed, step, replica[, refill]): a resumed run samples exactly what an
        # uninterrupted run would have sampled at this step, without restoring any RNG state.
        replica = parallel_state.get_data_parallel_rank()
        seed = self.seed * 1_000_003 + step * 1009 + replica
        if refill:  # a refill batch draws its own numbers, not the rollout's again
            seed = int.from_bytes(hashlib.sha256(f"{seed}/refill{refill}".encode()).digest()[:7], "little")
        generator = torch.Generator().manual_seed(seed)
        batch = generate(
            self.model, prompts, self.tokenizer, self.cfg.sampling,
            max_len=self.max_len, generator=generator, kv_cache=self.cfg.kv_cache,
            record_kept=None if self.cfg.keep_sampling_mask else False, record_routing=self.cfg.keep_routing,
        )  # fmt: skip
        batch.weight_version = str(step)
        return batch

    def sync_weights(self, step: int) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass
