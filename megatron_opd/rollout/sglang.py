"""The SGLang rollout engine: trajectories sampled by SGLang servers over HTTP, weights pushed back.

Sampling is SGLang's `/generate` with `return_logprob` (the sampler's log-probs of its own tokens
become `behavior_logprobs`), EOS as a stop token and a per-sample `sampling_seed` derived from
the sample id, so a resumed run asks for exactly the samples an uninterrupted one did.

Weight sync (`rollout.weight_sync`):
- "disk": after an update every rank writes a weights-only dist checkpoint (rank 0 exports it to
  Hugging Face format too when `rollout.weight_format=hf`, for stock SGLang), then each server
  gets `/update_weights_from_disk {model_path, weight_version, flush_cache}`;
- "distributed" (NCCL broadcast through `/init_weights_update_group` +
  `/update_weights_from_distributed`) is refused with an explanation: it needs CUDA on both ends
  and is not implemented here.
Every trajectory carries the `weight_version` its server reported; `stale_fraction` counts rows
sampled by weights older than the trainer's.

Within a data-parallel replica only the first model-parallel rank talks HTTP; it broadcasts the
batch to the rest of its group.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_opd.data.domains import Prompt, encode_prompts, pack
from megatron_opd.data.tokenizer import CharTokenizer
from megatron_opd.data.trajectories import Trajectories
from megatron_opd.rollout.engine import RolloutConfig
from megatron_opd.runtime import checkpoint as ckpt


class RolloutServerError(RuntimeError):
    """A rollout server answered something that cannot become a trajectory; names server and row."""


def sample_seed(seed: int, sample_id: str) -> int:
    digest = hashlib.sha256(f"{seed}/{sample_id}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


class SGLangRolloutEngine:
    def __init__(self, cfg: RolloutConfig, trainer, tokenizer: CharTokenizer, *, max_len: int, seed: int):
        from megatron.core import parallel_state

        if not cfg.endpoints:
            raise ValueError("rollout.engine=sglang needs rollout.endpoints (the SGLang servers' base URLs)")
        if cfg.weight_sync == "distributed":
            raise NotImplementedError(
                "rollout.weight_sync=distributed (NCCL broadcast via /update_weights_from_distributed) is not "
                "implemented; use rollout.weight_sync=disk"
            )
        self.cfg, self.trainer, self.tokenizer, self.max_len, self.seed = cfg, trainer, tokenizer, max_len, seed
        group = parallel_state.get_model_parallel_group()
        self.group, self.src = group, min(dist.get_process_group_ranks(group))
        self.is_src = dist.get_rank() == self.src
        self.version = ""
        self.client = None
        if self.is_src:
            from megatron_opd.teachers.client import TeacherClient
            from megatron_opd.teachers.config import TeacherConfig
            from megatron_opd.teachers.pool import _LoopThread

            self._loop = _LoopThread()
            self.client = TeacherClient(
                "rollout",
                TeacherConfig(endpoints=list(cfg.endpoints), domains=["*"], signal="sampled", api_key=cfg.api_key),
                vocab_size=tokenizer.vocab_size,
            )
            self._loop.run(self.client.start())
        # The servers start from other weights than the student's: push the student's first.
        self.sync_weights(0)

    # -- sampling ---------------------------------------------------------------------------------

    def generate(self, prompts: list[Prompt], step: int) -> Trajectories:
        batch = self._request(prompts) if self.is_src else None
        holder = [batch]
        if dist.get_world_size(self.group) > 1:
            dist.broadcast_object_list(holder, src=self.src, group=self.group)
        return holder[0]

    def _request(self, prompts: list[Prompt]) -> Trajectories:
        encoded = encode_prompts(prompts, self.tokenizer)
        budget = min(self.cfg.max_new_tokens, self.max_len - max(len(e) for e in encoded))
        params = [
            {
                "max_new_tokens": budget,
                "temperature": self.cfg.temperature,
                "top_p": self.cfg.top_p,
                "top_k": self.cfg.top_k or -1,
                "stop_token_ids": [self.tokenizer.eos_id],
                "sampling_seed": sample_seed(self.seed, p.sample_id),
            }
            for p in prompts
        ]
        body = {"input_ids": encoded, "sampling_params": params, "return_logprob": True}
        responses = self._loop.run(self.client.generate(body))
        if len(responses) != len(prompts):
            raise RolloutServerError(f"rollout servers returned {len(responses)} responses for {len(prompts)} prompts")
        rows, logprobs, finish, versions = [], [], [], []
        for p, e, r in zip(prompts, encoded, responses):
            out = list(r["output_ids"])
            meta = r["meta_info"]
            reason = (meta.get("finish_reason") or {}).get("type")
            if reason not in ("stop", "length"):
                raise RolloutServerError(f"sample {p.sample_id}: finish_reason {meta.get('finish_reason')!r} (expected stop or length)")
            lps = meta.get("output_token_logprobs") or []
            if len(lps) != len(out) or not 0 < len(out) <= budget:
                raise RolloutServerError(
                    f"sample {p.sample_id}: {len(out)} output tokens with {len(lps)} logprobs (budget {budget})"
                )
            rows.append(e + out)
            logprobs.append([float(entry[0]) for entry in lps])
            finish.append(reason)
            versions.append(str(meta.get("weight_version", "")))
        batch = pack(rows, [len(e) for e in encoded], prompts, self.tokenizer, self.max_len)
        r = batch.max_response_len
        batch.behavior_logprobs = torch.zeros(len(rows), r)
        for i, lp in enumerate(logprobs):
            batch.behavior_logprobs[i, : len(lp)] = torch.tensor(lp)
        batch.finish_reasons = finish
        stale = [v for v in versions if v != self.version]
        if stale:
            raise RolloutServerError(
                f"{len(stale)} of {len(versions)} samples came from weight_version {sorted(set(stale))}, the trainer "
                f"pushed {self.version!r}: a server missed a weight update"
            )
        batch.weight_version = self.version
        return batch

    # -- weights ----------------------------------------------------------------------------------

    def sync_weights(self, step: int) -> dict[str, float]:
        """Write the current weights (every rank) and load them into every server (first rank)."""
        t0 = time.perf_counter()
        root = Path(self.trainer.run_dir) / "rollout_weights"
        path = ckpt.save_checkpoint(root, step, self.trainer.model, None, keep_last=1)
        error = None
        if self.is_src:
            try:
                error = self._loop.run(self._update_all(self._export(path, root, step), str(step)))
            except Exception as e:  # noqa: BLE001 - raised on every rank below
                error = f"{type(e).__name__}: {e}"
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        first = next((e for e in errors if e), None)
        if first:
            raise RolloutServerError(first)
        self.version = str(step)
        return {"weight_sync_time_s": time.perf_counter() - t0}

    def _export(self, checkpoint: Path, root: Path, step: int) -> str:
        """What the servers load: the checkpoint itself, or its Hugging Face export."""
        if self.cfg.weight_format != "hf":
            return str(checkpoint)
        from checkpoints_tools.export import main as export

        out = root / f"hf_step_{step:08d}"
        argv = ["--input", str(checkpoint), "--model-config", str(Path(self.trainer.run_dir) / "model.yaml")]
        if export(argv + ["--output", str(out), "--overwrite", "--no-progress"]):
            raise RolloutServerError(f"exporting {checkpoint} to Hugging Face format failed")
        return str(out)

    async def _update_all(self, model_path: str, version: str) -> str | None:
        import json

        body = {"model_path": model_path, "weight_version": version, "flush_cache": True}
        for url in self.cfg.endpoints:
            payload, _ = await self.client.post_to(url, "/update_weights_from_disk", body)
            reply = json.loads(payload)
            if not reply.get("success"):
                return f"rollout server {url} refused the weights at {model_path}: {reply.get('message')}"
        return None

    def close(self) -> None:
        if self.client is not None:
            self._loop.run(self.client.close())
            self._loop.stop()
