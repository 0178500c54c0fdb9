"""The model behind the server: a megatron-core GPT model, its forward and its generation loop.

Everything that touches torch and megatron runs on the server's main thread (the CPU
compatibility layer's device mode is thread-local; serving/app.py hands work to that thread).
Each /generate request (a batch of sequences) runs as one right-padded forward per step; causal
attention makes right padding exact. There is no KV cache: sampling recomputes the sequence each
step, which is fine for the tiny models this server exists for. Sampling is the one sampler's
(rollout/sampler.py), with one torch.Generator per sequence seeded by its `sampling_seed`; its
kept sets are SGLang's sampling masks. Routed experts (MoE models served with
--enable-return-routed-experts) are recorded by megatron's RouterReplay (models/routing.py):
every position of the prefill, then the token each decode step feeds.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    import numpy as np

from megatron_opd.models.routing import recording
from megatron_opd.rollout.sampler import kept_set_logprobs, reported_logprobs, sample, stops
from megatron_opd.serving.launch import LAUNCH_ENV
from megatron_opd.serving.requests import GenItem
from megatron_opd.serving.responses import ItemResult



@dataclass(frozen=True)
class ModelSource:
    """What the server loads at start: a model dir (its newest checkpoint, or `checkpoint`), or
    random weights from a model config and a tokenizer."""

    model_dir: str = ""
    checkpoint: str = ""
    random_init: bool = False
    model_config: str = ""
    tokenizer: str = ""
    seed: int = 1234


class ModelBackend:
    """The megatron model and everything that touches torch; used from the main thread only."""

    def __init__(
        self, model, cfg, tokenizer, *, model_path: str, weight_version: str, seed: int, checkpoint_id: str | None = None,
        routed_experts: bool = False,
    ):  # fmt: skip
        self.model, self.cfg, self.tokenizer = model, cfg, tokenizer
        # --enable-return-routed-experts: the model (and every staging copy) records routing.
        self.routed_experts = routed_experts
        self.device = next(model.parameters()).device
        self.model_path, self.weight_version = model_path, weight_version
        # runtime/checkpoint.py's id of the checkpoint served (None: random, or weights received
        # over a weight-update group), reported in /model_info for the teacher pool's check.
        self.checkpoint_id = checkpoint_id
        self.rng = random.Random(seed)
        self._captured: dict[str, Any] = {}
        self.attach(model)

    def attach(self, model) -> None:
        """Capture the output layer's input (the final hidden state after the final norm, [s, b, h])."""
        model.output_layer.register_forward_pre_hook(lambda _m, args: self._captured.__setitem__("h", args[0]))

    def build_model(self):
        """A second model of the same shape (a staging copy for weight updates), eval mode, hooked."""
        from megatron_opd.models.gpt import build_gpt_model
        from megatron_opd.runtime.layout import ParallelLayout

        model = build_gpt_model(self.cfg, ParallelLayout(), routing_replay=self.routed_experts).eval()
        self.attach(model)
        return model

    @classmethod
    def load(cls, source: ModelSource, *, weight_version: str, routed_experts: bool = False) -> "ModelBackend":
        from megatron_opd.config import load_config
        from megatron_opd.data.tokenizer import load_tokenizer
        from megatron_opd.models.config import ModelConfig
        from megatron_opd.models.gpt import build_gpt_model
        from megatron_opd.models.model_dir import load_model_dir_weights, read_model_dir
        from megatron_opd.runtime.distributed import init_runtime
        from megatron_opd.runtime.layout import ParallelLayout

        if source.model_dir:
            mdir = read_model_dir(source.model_dir)
            cfg, tok, path = mdir.model, mdir.tokenizer, str(mdir.path)
        elif source.random_init and source.model_config and source.tokenizer:
            cfg, tok, path = load_config(source.model_config, cls=ModelConfig), load_tokenizer(source.tokenizer), "random-init"
        else:
            raise SystemExit("serve: give --model-dir DIR, or --random-init --model-config YAML --tokenizer DIR")
        if tok.vocab_size != cfg.vocab_size:
            raise SystemExit(f"serve: tokenizer has {tok.vocab_size} tokens, model.vocab_size is {cfg.vocab_size}")
        if routed_experts and not cfg.is_moe:
            raise SystemExit("serve: --enable-return-routed-experts needs an MoE model; this one has model.num_experts=0")
        for key in LAUNCH_ENV:  # the server is a world of one even when started from a torchrun job
            os.environ.pop(key, None)
        init_runtime(ParallelLayout(), source.seed)
        model = build_gpt_model(cfg, ParallelLayout(), routing_replay=routed_experts)
        model.eval()
        served_id = None
        if source.model_dir and not source.random_init:
            # A megatron model directory (its newest checkpoint, or --checkpoint) or a Hugging
            # Face one (converted in memory); the id is what the teacher pool compares.
            ckpt = Path(source.checkpoint) if source.checkpoint else mdir.latest_checkpoint()
            served_id = load_model_dir_weights(mdir, [model], checkpoint=ckpt if mdir.format == "megatron" else None)
            path = str(ckpt)
        return cls(
            model, cfg, tok, model_path=path, weight_version=weight_version, seed=source.seed, checkpoint_id=served_id,
            routed_experts=routed_experts,
        )  # fmt: skip

    # -- forward ------------------------------------------------------------------------------

    def forward(self, seqs: list[list[int]], need_hidden: bool):
        """Right-padded forward: (logits [b, S, V] float32 over the real vocabulary, hidden [b, S, d])."""
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        pos = torch.arange(width).unsqueeze(0).expand_as(ids)
        with torch.no_grad():
            logits = self.model(ids.to(self.device), pos.to(self.device), None)[..., : self.cfg.vocab_size].float().cpu()
            hidden = self._captured.pop("h").transpose(0, 1).float().cpu() if need_hidden else None
        return logits, hidden

    def run(self, items: list[GenItem], on_step: Callable[[], None] = lambda: None) -> list[ItemResult]:
        """Prefill every item, then sample continuations step by step for those that ask.
        `on_step` is called after every forward (the server's liveness beat)."""
        with recording(self.model, any(it.return_routed_experts for it in items)) as recorder:
            return self._run(items, on_step, recorder)

    def _run(self, items: list[GenItem], on_step: Callable[[], None], recorder) -> list[ItemResult]:
        seqs = [list(it.input_ids) for it in items]
        results = [ItemResult() for _ in items]
        need_hidden = any(it.return_hidden_states for it in items)
        # Per routed item: [positions, moe_layers, topk] blocks, prefill then one per decode step.
        routes: dict[int, list[torch.Tensor]] = {i: [] for i, it in enumerate(items) if it.return_routed_experts}
        logits, hidden = self.forward(seqs, need_hidden)
        if recorder is not None:
            routing = recorder.take(logits.shape[1], len(seqs))  # [b, width, moe_layers, topk]
            for i in routes:
                routes[i].append(routing[i, : len(seqs[i])])
        on_step()
        last = {}
        for i, it in enumerate(items):
            L = len(seqs[i])
            if it.return_logprob:
                s = it.logprob_start_len
                rows = logits[i, s : L - 1] if s < L else logits[i, :0]
                results[i].input_logprobs = torch.log_softmax(rows, -1).numpy()
            if it.return_hidden_states:
                results[i].hidden.append(hidden[i, :L].numpy())
            last[i] = logits[i, L - 1]
        seeds = [it.sampling_seed if it.sampling_seed is not None else self.rng.getrandbits(63) for it in items]
        gens = {i: torch.Generator().manual_seed(seed) for i, seed in enumerate(seeds)}
        params = {i: it.sampling_params() for i, it in enumerate(items)}
        active = []
        for i, it in enumerate(items):
            if it.max_new_tokens == 0 or len(seqs[i]) >= self.cfg.max_seq_len:
                results[i].finish = {"type": "length", "length": 0}
            else:
                active.append(i)
        while active:
            for i in active:
                self._sample(items[i], params[i], last[i], gens[i], seqs[i], results[i])
            active = [i for i in active if results[i].finish is None]
            if not active:
                break
            logits, hidden = self.forward([seqs[i] for i in active], need_hidden)
            routing = recorder.take(logits.shape[1], len(active)) if recorder is not None else None
            on_step()
            for b, i in enumerate(active):
                last[i] = logits[b, len(seqs[i]) - 1]
                if items[i].return_hidden_states:
                    results[i].hidden.append(hidden[b, len(seqs[i]) - 1].numpy())
                if i in routes:  # the token this step fed
                    routes[i].append(routing[b, len(seqs[i]) - 1][None])
        for i, blocks in routes.items():
            results[i].routed_experts = self._routed_rows(torch.cat(blocks), items[i].routed_experts_start_len, len(seqs[i]))
        return results

    def _routed_rows(self, routed: torch.Tensor, start: int, seqlen: int) -> "np.ndarray":
        """SGLang's routed experts of positions [start, seqlen - 1): [rows, num_layers, topk]
        int32, every layer of the model (dense layers hold -1; SGLang leaves them unspecified)."""
        import numpy as np

        rows = routed[start : seqlen - 1]
        out = np.full((rows.shape[0], self.cfg.num_layers, self.cfg.moe_topk), -1, np.int32)
        out[:, self.cfg.moe_layers] = rows.numpy()
        return out

    def _sample(self, it: GenItem, params, logits: torch.Tensor, gen: torch.Generator, seq: list[int], res: ItemResult) -> None:
        row = logits[None]
        drawn = sample(row, params, gen, return_kept=it.return_sampling_mask)
        token = int(drawn.tokens[0])
        seq.append(token)
        res.output_ids.append(token)
        reported = reported_logprobs(row, params)
        res.output_logprobs.append(reported[0].numpy())
        if it.return_sampling_mask:
            # The sampler keeps the whole vocabulary when nothing filters (a finite top_k >= V).
            kept = drawn.kept_ids if drawn.kept_ids is not None else torch.argsort(reported, -1, descending=True, stable=True)
            kept = kept[:, kept[0] >= 0]
            res.sampling_masks.append(kept[0].numpy().astype("int32"))
            if it.sampling_logprobs_mode == "support":
                res.sampling_logprobs.append((reported[0, kept[0]] - reported[0, kept[0]].logsumexp(-1)).numpy())
            else:
                res.sampling_logprobs.append(float(kept_set_logprobs(reported, drawn.tokens, kept)[0]))
        n = len(res.output_ids)
        ends = not it.ignore_eos and token in self.tokenizer.stop_ids  # end-of-turn tokens too, as SGLang does
        if ends or stops(token, params, None if it.ignore_eos else self.tokenizer.eos_id):
            res.finish = {"type": "stop", "matched": token}
        elif n >= it.max_new_tokens or len(seq) >= self.cfg.max_seq_len:
            res.finish = {"type": "length", "length": n}

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], stop_at_eos=False)
