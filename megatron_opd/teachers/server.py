"""The embedded teacher server: a megatron-core model behind SGLang's HTTP protocol.

    python -m megatron_opd.teachers.server --model-dir DIR [--host 127.0.0.1] [--port 30000]
    python -m megatron_opd.teachers.server --random-init --model-config model.yaml --tokenizer DIR

It answers what our client and the SGLang rollout engine use, in SGLang's JSON shapes:
POST /generate (scoring with input logprobs, top-k, hidden states; sampling with temperature,
top_p, top_k, stop_token_ids, sampling_seed), GET /health, /health_generate, /model_info
(/get_model_info), /flush_cache, POST /update_weights_from_disk. Errors are SGLang's 400 bodies:
{"error": "<text>"} for a request that breaks the contract, {"error": {"message": ...}} for one
the server cannot serve. With --api-key, every route but /health* requires `Authorization:
Bearer <key>` (401 {"error": "Unauthorized"}), as in SGLang.

Extensions (ignored by SGLang, off with --plain-sglang so the server stands in for a stock one):
`return_binary_signal` (our binary form, docs/teachers.md), `return_full_logprobs` (full
log-softmax rows, the `logits` signal), and `vocab_size`/`tokenizer_fingerprint`/`hidden_size`/
`opd_server` in /model_info.

Threads: megatron and torch run on the main thread (the CPU compatibility layer's device mode is
thread-local), the aiohttp event loop on a second thread, so /health answers while a forward runs.
Each /generate request (a batch of sequences) runs as one right-padded forward per step; causal
attention makes right padding exact. There is no KV cache: sampling recomputes the sequence each
step, which is fine for the tiny models this server exists for.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import queue
import random
import secrets
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from megatron_opd.runtime.secrets import SecretError, read_api_key
from megatron_opd.teachers import protocol as P
from megatron_opd.teachers.launch import LAUNCH_ENV

DEFAULT_WEIGHT_VERSION = "default"  # SGLang's --weight-version default
# Sampling parameters accepted only at their neutral value (the server does not implement them).
_NEUTRAL_PARAMS = {
    "min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
    "min_new_tokens": 0, "n": 1, "json_schema": None, "regex": None, "ebnf": None,
    "structural_tag": None, "stop_regex": None, "logit_bias": {}, "custom_params": None,
    "beam_width": None, "watermark": None, "choice": [], "stop": None,
}  # fmt: skip


class RequestError(Exception):
    """A request the server refuses with 400. `contract` picks SGLang's body shape."""

    def __init__(self, message: str, *, contract: bool = False, status: int = 400):
        super().__init__(message)
        self.contract = contract
        self.status = status

    def body(self) -> dict:
        return {"error": str(self)} if self.contract else {"error": {"message": str(self)}}


# ---------------------------------------------------------------------------------------------
# Requests


@dataclass
class GenItem:
    input_ids: list[int]
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    sampling_seed: int | None = None
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_hidden_states: bool = False
    rid: str | None = None


@dataclass
class GenerateCall:
    items: list[GenItem]
    is_batch: bool
    return_text_in_logprobs: bool = False
    flat_top: bool = False
    flat_top_b64: bool = False
    flat_output_top: bool = False
    binary: bool = False
    hidden_dtype: str = "float32"
    full_logprobs: bool = False


def _per_item(value: Any, n: int, name: str, is_batch: bool) -> list:
    if is_batch and isinstance(value, list):
        if len(value) != n:
            raise RequestError(f"{name} has {len(value)} entries for a batch of {n}")
        return value
    return [value] * n


def _want(value: Any, types: tuple, name: str) -> Any:
    if isinstance(value, bool) and bool not in types:
        raise RequestError(f"invalid type: boolean `{str(value).lower()}`, expected {name}", contract=True)
    if not isinstance(value, types):
        raise RequestError(f"invalid type: {type(value).__name__} {value!r}, expected {name}", contract=True)
    return value


def parse_generate(body: Any, *, vocab_size: int, encode: Callable[[str], list[int]], plain: bool) -> GenerateCall:
    """Validate a /generate body and split it into items (SGLang's fields, our extensions)."""
    if not isinstance(body, dict):
        raise RequestError(f"invalid type: {type(body).__name__}, expected struct GenerateRequest", contract=True)
    if body.get("stream"):
        raise RequestError("stream=true is not supported by the embedded teacher server")
    ids = body.get("input_ids")
    if ids is None and body.get("text") is not None:
        text = body["text"]
        try:
            ids = [encode(t) for t in text] if isinstance(text, list) else encode(text)
        except ValueError as e:
            raise RequestError(str(e)) from None
    if ids is None:
        raise RequestError("Either text, input_ids or input_embeds should be provided.")
    is_batch = isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)
    seqs = ids if is_batch else [ids]
    for seq in seqs:
        if not isinstance(seq, list) or not seq:
            raise RequestError("input_ids must be a non-empty list of token ids (or a list of such lists)")
        for t in seq:
            _want(t, (int,), "i64")
            if not 0 <= t < vocab_size:
                raise RequestError(f"token id {t} is outside the vocabulary [0, {vocab_size})")
    n = len(seqs)
    sps = _per_item(body.get("sampling_params") or {}, n, "sampling_params", is_batch)

    def get(key: str, default: Any) -> list:
        value = body.get(key)
        return _per_item(default if value is None else value, n, key, is_batch)

    return_logprob, start, topn = get("return_logprob", False), get("logprob_start_len", -1), get("top_logprobs_num", 0)
    hidden, rids = get("return_hidden_states", False), get("rid", None)
    if body.get("token_ids_logprob") is not None:
        raise RequestError("token_ids_logprob is not supported by the embedded teacher server")
    items = []
    for i, seq in enumerate(seqs):
        sp = _want(sps[i], (dict,), "struct SamplingParams")
        for key in sp:
            if key not in P.SAMPLING_PARAM_KEYS:
                listed = ", ".join(f"`{f}`" for f in P.SAMPLING_PARAM_KEYS)
                raise RequestError(f"unknown field `{key}`, expected one of {listed}", contract=True)
        for key, neutral in _NEUTRAL_PARAMS.items():
            if sp.get(key, neutral) not in (neutral, None):
                raise RequestError(f"sampling_params.{key}={sp[key]!r} is not supported by the embedded teacher server")
        item = GenItem(
            input_ids=seq,
            max_new_tokens=_want(sp.get("max_new_tokens", 128), (int,), "u32"),
            temperature=float(_want(sp.get("temperature", 1.0), (int, float), "f32")),
            top_p=float(_want(sp.get("top_p", 1.0), (int, float), "f32")),
            top_k=_want(sp.get("top_k", -1), (int,), "i32"),
            stop_token_ids=tuple(_want(t, (int,), "i64") for t in (sp.get("stop_token_ids") or ())),
            ignore_eos=_want(sp.get("ignore_eos", False), (bool,), "a boolean"),
            sampling_seed=None if sp.get("sampling_seed") is None else _want(sp["sampling_seed"], (int,), "i64"),
            return_logprob=_want(return_logprob[i], (bool,), "a boolean"),
            logprob_start_len=_want(start[i], (int,), "i64"),
            top_logprobs_num=_want(topn[i], (int,), "i64"),
            return_hidden_states=_want(hidden[i], (bool,), "a boolean"),
            rid=rids[i],
        )
        L = len(seq)
        if item.max_new_tokens < 0:
            raise RequestError(f"max_new_tokens must be >= 0, got {item.max_new_tokens}")
        if not 0.0 < item.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {item.top_p}")
        if item.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {item.temperature}")
        if item.return_logprob:
            if item.logprob_start_len == -1:
                item.logprob_start_len = L  # SGLang: output logprobs only
            if not 0 <= item.logprob_start_len <= L:
                raise RequestError(
                    f"logprob_start_len={item.logprob_start_len} is outside [0, {L}] for a sequence of {L} input tokens"
                )
            if not 0 <= item.top_logprobs_num <= vocab_size:
                raise RequestError(f"top_logprobs_num={item.top_logprobs_num} is outside [0, vocabulary size {vocab_size}]")
        items.append(item)
    call = GenerateCall(
        items=items,
        is_batch=is_batch,
        return_text_in_logprobs=bool(body.get("return_text_in_logprobs")),
        flat_top=bool(body.get("return_flat_raw_top_logprobs")),
        flat_top_b64=bool(body.get("return_flat_raw_top_logprobs_b64")),
        flat_output_top=bool(body.get("return_flat_raw_output_top_logprobs")),
    )
    if call.flat_top_b64 and not (call.flat_top or call.flat_output_top):
        raise RequestError(
            "return_flat_raw_top_logprobs_b64 requires return_flat_raw_top_logprobs or return_flat_raw_output_top_logprobs."
        )
    if not plain:
        call.binary = bool(body.get(P.KEY_BINARY))
        call.hidden_dtype = body.get(P.KEY_BINARY_HIDDEN_DTYPE, "float32")
        if call.hidden_dtype not in ("float32", "float16"):
            raise RequestError(f"{P.KEY_BINARY_HIDDEN_DTYPE}={call.hidden_dtype!r}; expected 'float32' or 'float16'")
        call.full_logprobs = bool(body.get(P.KEY_FULL_LOGPROBS))
    return call


# ---------------------------------------------------------------------------------------------
# The model


@dataclass
class ItemResult:
    output_ids: list[int] = field(default_factory=list)
    finish: dict | None = None
    input_logprobs: np.ndarray | None = None  # [n-1, V] log_softmax at positions s .. L-2
    output_logprobs: list[np.ndarray] = field(default_factory=list)  # per generated token, [V] (temperature-scaled)
    hidden: list[np.ndarray] = field(default_factory=list)  # [L, d] prefill block, then [d] per decode step


class ModelBackend:
    """The megatron model and everything that touches torch; used from the main thread only."""

    def __init__(self, model, cfg, tokenizer, *, model_path: str, weight_version: str, seed: int):
        import torch

        self.torch = torch
        self.model, self.cfg, self.tokenizer = model, cfg, tokenizer
        self.device = next(model.parameters()).device
        self.model_path, self.weight_version = model_path, weight_version
        self.rng = random.Random(seed)
        self._captured: dict[str, Any] = {}
        self.update_groups: dict[str, Any] = {}  # /init_weights_update_group's process groups
        self.update_session = False  # between /begin_weight_update and /end_weight_update
        # The output layer's input is the final hidden state (after the final norm), [s, b, h].
        model.output_layer.register_forward_pre_hook(lambda _m, args: self._captured.__setitem__("h", args[0]))

    @classmethod
    def load(cls, args: argparse.Namespace) -> "ModelBackend":
        from megatron_opd.config import load_config
        from megatron_opd.data.tokenizer import load_tokenizer
        from megatron_opd.models.config import ModelConfig
        from megatron_opd.models.gpt import build_gpt_model
        from megatron_opd.models.model_dir import read_model_dir
        from megatron_opd.runtime.checkpoint import load_checkpoint
        from megatron_opd.runtime.distributed import init_runtime
        from megatron_opd.runtime.layout import ParallelLayout

        if args.model_dir:
            mdir = read_model_dir(args.model_dir)
            cfg, tok, path = mdir.model, mdir.tokenizer, str(mdir.path)
        elif args.random_init and args.model_config and args.tokenizer:
            cfg, tok, path = load_config(args.model_config, cls=ModelConfig), load_tokenizer(args.tokenizer), "random-init"
        else:
            raise SystemExit("serve-teacher: give --model-dir DIR, or --random-init --model-config YAML --tokenizer DIR")
        if tok.vocab_size != cfg.vocab_size:
            raise SystemExit(f"serve-teacher: tokenizer has {tok.vocab_size} tokens, model.vocab_size is {cfg.vocab_size}")
        for key in LAUNCH_ENV:  # the server is a world of one even when started from a torchrun job
            os.environ.pop(key, None)
        init_runtime(ParallelLayout(), args.seed)
        model = build_gpt_model(cfg, ParallelLayout())
        model.eval()
        if args.model_dir and not args.random_init:
            ckpt = Path(args.checkpoint) if args.checkpoint else mdir.latest_checkpoint()
            load_checkpoint(ckpt, [model], load_rng=False)
            path = str(ckpt)
        return cls(model, cfg, tok, model_path=path, weight_version=args.weight_version, seed=args.seed)

    # -- forward ------------------------------------------------------------------------------

    def forward(self, seqs: list[list[int]], need_hidden: bool):
        """Right-padded forward: (logits [b, S, V] float32 over the real vocabulary, hidden [b, S, d])."""
        torch = self.torch
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        pos = torch.arange(width).unsqueeze(0).expand_as(ids)
        with torch.no_grad():
            logits = self.model(ids.to(self.device), pos.to(self.device), None)[..., : self.cfg.vocab_size].float().cpu()
            hidden = self._captured.pop("h").transpose(0, 1).float().cpu() if need_hidden else None
        return logits, hidden

    def run(self, items: list[GenItem]) -> list[ItemResult]:
        """Prefill every item, then sample continuations step by step for those that ask."""
        torch = self.torch
        seqs = [list(it.input_ids) for it in items]
        results = [ItemResult() for _ in items]
        need_hidden = any(it.return_hidden_states for it in items)
        logits, hidden = self.forward(seqs, need_hidden)
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
        gens = {i: torch.Generator().manual_seed(it.sampling_seed if it.sampling_seed is not None else self.rng.getrandbits(63)) for i, it in enumerate(items)}
        active = []
        for i, it in enumerate(items):
            if it.max_new_tokens == 0 or len(seqs[i]) >= self.cfg.max_seq_len:
                results[i].finish = {"type": "length", "length": 0}
            else:
                active.append(i)
        while active:
            for i in active:
                self._sample(items[i], last[i], gens[i], seqs[i], results[i])
            active = [i for i in active if results[i].finish is None]
            if not active:
                break
            logits, hidden = self.forward([seqs[i] for i in active], need_hidden)
            for b, i in enumerate(active):
                last[i] = logits[b, len(seqs[i]) - 1]
                if items[i].return_hidden_states:
                    results[i].hidden.append(hidden[b, len(seqs[i]) - 1].numpy())
        return results

    def _sample(self, it: GenItem, logits, gen, seq: list[int], res: ItemResult) -> None:
        torch = self.torch
        greedy = it.temperature < 1e-5 or it.top_k == 1
        # SGLang turns temperature 0 into top_k=1 at temperature 1: logprobs are then unscaled.
        temp = 1.0 if it.temperature < 1e-5 else it.temperature
        logprobs = torch.log_softmax(logits / temp, -1)
        if greedy:
            token = int(torch.argmax(logprobs))
        else:
            probs = logprobs.exp()
            if 0 < it.top_k < probs.numel():
                kth = torch.topk(probs, it.top_k).values[-1]
                probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
            if it.top_p < 1.0:
                sorted_p, order = torch.sort(probs, descending=True)
                drop = (torch.cumsum(sorted_p, 0) - sorted_p) > it.top_p * sorted_p.sum()
                sorted_p[drop] = 0
                probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
            token = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
        seq.append(token)
        res.output_ids.append(token)
        res.output_logprobs.append(logprobs.numpy())
        n = len(res.output_ids)
        if token in it.stop_token_ids or (token == self.tokenizer.eos_id and not it.ignore_eos):
            res.finish = {"type": "stop", "matched": token}
        elif n >= it.max_new_tokens or len(seq) >= self.cfg.max_seq_len:
            res.finish = {"type": "length", "length": n}

    # -- responses ----------------------------------------------------------------------------

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], stop_at_eos=False)

    def response(self, call: GenerateCall, it: GenItem, res: ItemResult, latency: float, layout: str) -> dict:
        L = len(it.input_ids)
        meta: dict[str, Any] = {
            "id": it.rid or uuid.uuid4().hex,
            "finish_reason": res.finish,
            "prompt_tokens": L,
            "completion_tokens": len(res.output_ids),
            "cached_tokens": 0,
            "weight_version": self.weight_version,
            "e2e_latency": latency,
        }
        texts = self._text if call.return_text_in_logprobs else None
        if it.return_logprob:
            s = it.logprob_start_len
            ids = np.asarray(it.input_ids[s:], np.int64)
            lp_rows = res.input_logprobs  # positions s .. L-2 predict tokens s+1 .. L-1
            vals = np.full(len(ids), np.nan, np.float32)
            if len(ids) > 1:
                vals[1:] = np.take_along_axis(lp_rows, ids[1:, None], 1)[:, 0]
            out_ids = np.asarray(res.output_ids, np.int64)
            out_vals = np.asarray([lp[t] for lp, t in zip(res.output_logprobs, res.output_ids)], np.float32)
            meta["output_token_logprobs"] = P.logprob_entries(out_vals, out_ids, [texts(t) for t in res.output_ids] if texts else None)
            meta["output_token_logprobs_length"] = len(res.output_ids)
            if call.binary:
                meta[P.A_TOKEN_LP], meta[P.A_TOKEN_ID] = vals, ids.astype(np.int32)
            else:
                meta["input_token_logprobs"] = P.logprob_entries(vals, ids, [texts(t) for t in ids.tolist()] if texts else None)
            k = it.top_logprobs_num
            if k:
                top_v, top_i = _topk_rows(lp_rows, k, null_rows=1 if len(ids) else 0)
                if call.binary:
                    meta[P.A_TOP_LP], meta[P.A_TOP_ID] = top_v, top_i.astype(np.int32)
                elif call.flat_top:
                    meta.update(P.flat_top_logprob_fields("input", top_v, top_i, min(1, len(ids)), call.flat_top_b64))
                else:
                    meta["input_top_logprobs"] = P.top_logprob_rows(top_v, top_i, min(1, len(ids)), texts)
                out_v, out_i = _topk_rows(np.asarray(res.output_logprobs).reshape(-1, self.cfg.vocab_size), k, null_rows=0)
                if call.flat_output_top:
                    meta.update(P.flat_top_logprob_fields("output", out_v, out_i, 0, call.flat_top_b64))
                else:
                    meta["output_top_logprobs"] = P.top_logprob_rows(out_v, out_i, 0, texts)
            if call.full_logprobs:
                full = np.full((len(ids), self.cfg.vocab_size), np.nan, np.float32)
                full[1:] = lp_rows
                meta[P.FULL_LOGPROBS] = full if call.binary else ([None] + full[1:].tolist() if len(ids) else [])
        if it.return_hidden_states and res.hidden:
            # Like SGLang, keep the states up to the finished length: the prefill block plus one
            # row per decode step (the last sampled token is never fed back).
            block, steps = res.hidden[0], res.hidden[1:]
            if call.binary:
                rows = np.concatenate([block] + [r[None] for r in steps]) if steps else block
                meta[P.A_HIDDEN] = rows.astype(call.hidden_dtype)
            elif layout == "block":
                meta["hidden_states"] = [block.tolist()] + [r.tolist() for r in steps]
            else:
                meta["hidden_states"] = block.tolist() + [r.tolist() for r in steps]
        return {"text": self.tokenizer.decode(res.output_ids), "output_ids": list(res.output_ids), "meta_info": meta}

    def update_weights(self, model_path: str) -> str:
        """Load weights from a model dir (its newest checkpoint), a checkpoint root or a step dir."""
        from megatron_opd.models.model_dir import read_model_dir
        from megatron_opd.runtime.checkpoint import COMPLETE, latest_complete, load_checkpoint

        path = Path(model_path)
        if (path / "model.yaml").is_file():
            mdir = read_model_dir(path)
            if mdir.model != self.cfg:
                raise ValueError(f"{path} holds a different model config than the one served: {mdir.model} vs {self.cfg}")
            if mdir.tokenizer.fingerprint != self.tokenizer.fingerprint:
                raise ValueError(f"{path} has tokenizer {mdir.tokenizer.fingerprint}, the server {self.tokenizer.fingerprint}")
            ckpt = mdir.latest_checkpoint()
        elif (path / COMPLETE).is_file():
            ckpt = path
        else:
            ckpt = latest_complete(path)
            if ckpt is None:
                raise ValueError(f"{path} is neither a model dir, a complete checkpoint nor a root holding one")
        load_checkpoint(ckpt, [self.model], load_rng=False)
        self.model_path = str(ckpt)
        return str(ckpt)


    # -- distributed weight updates (SGLang's protocol; the trainer is rank 0 and broadcasts) ----

    def init_update_group(self, body: dict) -> str:
        from megatron_opd.runtime.distributed import standalone_group

        name = body.get("group_name", "weight_update_group")
        if not name:
            raise ValueError("Group name cannot be empty")
        # One process serves here: its rank is the offset (SGLang adds its TP rank).
        self.update_groups[name] = standalone_group(
            body.get("backend", "nccl"), body["master_address"], int(body["master_port"]),
            int(body["rank_offset"]), int(body["world_size"]),
        )  # fmt: skip
        return "Succeeded to initialize custom process group."

    def destroy_update_group(self, name: str) -> str:
        if self.update_groups.pop(name, None) is None:
            raise ValueError("The group to be destroyed does not exist.")
        return "Succeeded to destroy custom process group."

    def receive_weights(self, body: dict) -> str:
        """Receive `names` (Hugging Face names) broadcast from rank 0 in order, then load them."""
        from megatron_opd.models.hf.live import megatron_from_hf
        from megatron_opd.runtime.distributed import broadcast_from

        torch = self.torch
        if not self.update_session:
            raise ValueError("update_weights_from_distributed must run between begin_weight_update() and end_weight_update()")
        group = self.update_groups.get(body.get("group_name", "weight_update_group"))
        if group is None:
            raise ValueError(f"no weight-update group {body.get('group_name')!r}: call /init_weights_update_group first")
        names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
        if not len(names) == len(dtypes) == len(shapes):
            raise ValueError(f"{len(names)} names, {len(dtypes)} dtypes and {len(shapes)} shapes")
        # Receive everything first: the broadcast order is the sender's, whatever we do with it.
        received = {}
        for name, dtype, shape in zip(names, dtypes, shapes):  # on the model's device: NCCL needs CUDA
            tensor = torch.empty(shape, dtype=getattr(torch, str(dtype).replace("torch.", "")), device=self.device)
            broadcast_from(group, tensor, 0)
            received[name] = tensor
        params = dict(self.model.named_parameters())
        full = megatron_from_hf(self.cfg, {n: tuple(p.shape) for n, p in params.items()}, received)
        with torch.no_grad():
            for name, tensor in full.items():
                params[name].copy_(tensor)
        return "Succeeded to update parameter online."


def _topk_rows(lp_rows: np.ndarray, k: int, null_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row (descending), with `null_rows` leading NaN/-1 rows."""
    n = lp_rows.shape[0] + null_rows
    vals = np.full((n, k), np.nan, np.float32)
    ids = np.full((n, k), -1, np.int64)
    if lp_rows.shape[0]:
        import torch

        top = torch.topk(torch.from_numpy(np.ascontiguousarray(lp_rows)), k, dim=-1, sorted=True)
        vals[null_rows:], ids[null_rows:] = top.values.numpy(), top.indices.numpy()
    return vals, ids


# ---------------------------------------------------------------------------------------------
# Threads: model on the main thread, HTTP on a second one


class MainThreadWorker:
    """A job queue the main thread drains; HTTP handlers await its futures."""

    def __init__(self):
        self._jobs: queue.Queue = queue.Queue()

    def submit(self, fn: Callable, *args) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fut, fn, args))
        return fut

    def run_until(self, stop: threading.Event, http: "HttpThread") -> None:
        while not stop.is_set() and http.is_alive():
            try:
                fut, fn, args = self._jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting request
                fut.set_exception(e)
        while True:  # fail what is still queued so no request waits forever
            try:
                fut, _, _ = self._jobs.get_nowait()
            except queue.Empty:
                break
            if fut.set_running_or_notify_cancel():
                fut.set_exception(RuntimeError("server is shutting down"))


class HttpThread(threading.Thread):
    def __init__(self, app, host: str, port: int):
        super().__init__(name="http", daemon=True)
        self.app, self.host, self.port = app, host, port
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def run(self) -> None:
        from aiohttp import web

        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        # In-flight requests get 2 s to finish on SIGTERM (aiohttp waits 60 s by default).
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0)
        try:
            self.loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.port)
            self.loop.run_until_complete(site.start())
            self.port = runner.addresses[0][1]
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())
        self.loop.close()

    def stop(self) -> None:
        if self.loop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.join(timeout=10)


def build_app(backend: ModelBackend, worker: MainThreadWorker, args: argparse.Namespace, state: dict):
    from aiohttp import web

    plain = args.plain_sglang
    json_response = lambda obj, status=200: web.Response(body=json.dumps(obj).encode(), status=status, content_type="application/json")  # noqa: E731

    @web.middleware
    async def auth(request, handler):
        path = request.path
        if args.api_key and not path.startswith(("/health", "/ready", "/metrics")):
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token, args.api_key):
                return json_response({"error": "Unauthorized"}, 401)
        return await handler(request)

    async def on_model(fn, *a):
        return await asyncio.wrap_future(worker.submit(fn, *a))

    async def generate(request):
        t0 = time.perf_counter()
        try:
            body = await request.json()
        except ValueError as e:
            return json_response({"error": {"message": f"request body is not JSON: {e}"}}, 400)
        try:
            call = parse_generate(body, vocab_size=backend.cfg.vocab_size, encode=backend.tokenizer.encode, plain=plain)
            for it in call.items:
                if len(it.input_ids) > backend.cfg.max_seq_len:
                    raise RequestError(
                        f"The input ({len(it.input_ids)} tokens) is longer than the model's context length "
                        f"({backend.cfg.max_seq_len} tokens)."
                    )
        except RequestError as e:
            return json_response(e.body(), e.status)

        def work():
            results = backend.run(call.items)
            latency = time.perf_counter() - t0
            responses = [backend.response(call, it, res, latency, args.hidden_states_layout) for it, res in zip(call.items, results)]
            if call.binary:
                return P.encode_binary(responses), P.BINARY_CONTENT_TYPE
            return json.dumps(responses if call.is_batch else responses[0]).encode(), "application/json"

        try:
            payload, ctype = await on_model(work)
        except RuntimeError as e:
            return json_response({"error": {"message": str(e)}}, 503)
        return web.Response(body=payload, content_type=ctype)

    async def health(request):
        return web.Response(status=503 if state["stopping"] else 200)

    async def health_generate(request):
        if state["stopping"]:
            return web.Response(status=503)
        probe = [GenItem(input_ids=[0], max_new_tokens=1, temperature=0.0)]
        try:
            await asyncio.wait_for(on_model(backend.run, probe), timeout=20)
        except Exception:  # noqa: BLE001 - any failure means unhealthy
            return web.Response(status=503)
        return web.Response(status=200)

    async def model_info(request):
        info = {
            "model_path": backend.model_path,
            "served_model_name": backend.model_path,
            "tokenizer_path": args.model_dir or args.tokenizer or "",
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": backend.weight_version,
            "load_format": None,
            "reasoning_parser": None,
            "tool_call_parser": None,
            "disaggregation_mode": "null",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": "megatron_gpt",
            "architectures": ["MegatronGPTModel"],
        }
        if not plain:
            info.update(
                vocab_size=backend.cfg.vocab_size,
                tokenizer_fingerprint=backend.tokenizer.fingerprint,
                hidden_size=backend.cfg.hidden_size,
                max_context_length=backend.cfg.max_seq_len,
                opd_server={"version": 1, "binary_signal": 1, "full_logprobs": True, "hidden_states_layout": args.hidden_states_layout},
            )
        return json_response(info)

    async def flush_cache(request):
        # There is no prefix cache to flush; SGLang's reply text, status 200.
        return web.Response(
            text="Cache flushed.\nPlease check backend logs for more details. (When there are running or "
            "waiting requests, the operation will not be performed.)\n"
        )

    async def update_weights_from_disk(request):
        try:
            body = await request.json()
            path = body["model_path"]
        except (ValueError, KeyError, TypeError):
            return json_response({"success": False, "message": "body must be JSON with model_path", "num_paused_requests": 0}, 400)
        try:
            loaded = await on_model(backend.update_weights, path)
        except Exception as e:  # noqa: BLE001 - reported to the caller as SGLang does
            return json_response({"success": False, "message": f"Failed to update weights: {e}", "num_paused_requests": 0}, 400)
        if body.get("weight_version") is not None:
            backend.weight_version = str(body["weight_version"])
        return json_response(
            {"success": True, "message": f"Succeeded to update model weights from {loaded}.", "num_paused_requests": 0}
        )

    def sglang_reply(message: str, ok: bool = True):
        return json_response({"success": ok, "message": message}, 200 if ok else 400)

    async def json_body(request) -> dict:
        body = await request.json()
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        return body

    async def init_weights_update_group(request):
        try:
            message = await on_model(backend.init_update_group, await json_body(request))
        except Exception as e:  # noqa: BLE001 - SGLang answers failures in the body
            return sglang_reply(f"Failed to initialize custom process group: {e}.", False)
        return sglang_reply(message)

    async def destroy_weights_update_group(request):
        try:
            body = await json_body(request)
            message = await on_model(backend.destroy_update_group, body.get("group_name", "weight_update_group"))
        except Exception as e:  # noqa: BLE001
            return sglang_reply(f"Failed to destroy custom process group: {e}.", False)
        return sglang_reply(message)

    async def begin_weight_update(request):
        if backend.update_session:
            return sglang_reply("a weight-update session is already open; call end_weight_update() first", False)
        backend.update_session = True
        return sglang_reply("Success")

    async def end_weight_update(request):
        if not backend.update_session:
            return sglang_reply("no weight-update session is open; call begin_weight_update() first", False)
        backend.update_session = False
        return sglang_reply("Success")

    async def update_weights_from_distributed(request):
        try:
            body = await json_body(request)
            message = await on_model(backend.receive_weights, body)
        except Exception as e:  # noqa: BLE001
            return sglang_reply(f"Failed to receive weights: {e}", False)
        if body.get("weight_version") is not None:
            backend.weight_version = str(body["weight_version"])
        return sglang_reply(message)

    app = web.Application(middlewares=[auth], client_max_size=1 << 30)
    app.router.add_route("POST", "/generate", generate)
    app.router.add_route("PUT", "/generate", generate)
    app.router.add_get("/health", health)
    app.router.add_get("/health_generate", health_generate)
    app.router.add_get("/model_info", model_info)
    app.router.add_get("/get_model_info", model_info)
    app.router.add_route("*", "/flush_cache", flush_cache)
    app.router.add_post("/update_weights_from_disk", update_weights_from_disk)
    app.router.add_post("/init_weights_update_group", init_weights_update_group)
    app.router.add_post("/destroy_weights_update_group", destroy_weights_update_group)
    app.router.add_post("/begin_weight_update", begin_weight_update)
    app.router.add_post("/end_weight_update", end_weight_update)
    app.router.add_post("/update_weights_from_distributed", update_weights_from_distributed)
    return app


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", default="", help="model directory (model.yaml, tokenizer.json, checkpoints/)")
    p.add_argument("--checkpoint", default="", help="a checkpoint dir to load instead of the model dir's newest")
    p.add_argument("--random-init", action="store_true", help="random weights (smoke tests); with --model-dir or --model-config/--tokenizer")
    p.add_argument("--model-config", default="", help="ModelConfig YAML, with --random-init")
    p.add_argument("--tokenizer", default="", help="tokenizer directory or file, with --random-init")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000, help="0 picks a free port (printed in the ready line)")
    p.add_argument("--api-key", default="", help="require Authorization: Bearer <key> (not on /health*)")
    p.add_argument("--api-key-env", default="", metavar="NAME", help="like --api-key, the key read from $NAME (kept out of ps)")
    p.add_argument("--api-key-file", default="", metavar="PATH", help="like --api-key, the key read from a file")
    p.add_argument("--weight-version", default=DEFAULT_WEIGHT_VERSION)
    p.add_argument(
        "--hidden-states-layout", choices=["rows", "block"], default="rows",
        help="JSON hidden_states as 1-D rows (SGLang's contract type) or a 2-D prefill block then rows (its source)",
    )  # fmt: skip
    p.add_argument("--plain-sglang", action="store_true", help="no extensions: behave like a stock SGLang server")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def serve_command(args: argparse.Namespace) -> int:
    if sum(map(bool, (args.api_key, args.api_key_env, args.api_key_file))) > 1:
        print("serve-teacher: give one of --api-key, --api-key-env, --api-key-file", file=sys.stderr)
        return 2
    if not args.api_key:
        try:
            args.api_key = read_api_key(args.api_key_env, args.api_key_file, prefix="")
        except SecretError as e:
            print(f"serve-teacher: {e}", file=sys.stderr)
            return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    backend = ModelBackend.load(args)
    worker = MainThreadWorker()
    state = {"stopping": False}
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    http = HttpThread(build_app(backend, worker, args, state), args.host, args.port)
    http.start()
    http.ready.wait()
    if http.error is not None:
        print(f"serve-teacher: cannot listen on {args.host}:{args.port}: {http.error}", file=sys.stderr, flush=True)
        return 1
    cfg = backend.cfg
    print(
        f"teacher server ready at http://{args.host}:{http.port} (model {backend.model_path}, vocab {cfg.vocab_size}, "
        f"hidden {cfg.hidden_size}, weight_version {backend.weight_version}{', plain sglang' if args.plain_sglang else ''})",
        flush=True,
    )
    worker.run_until(stop, http)
    state["stopping"] = True
    http.stop()
    if not stop.is_set():  # the HTTP thread died on its own
        print(f"serve-teacher: the HTTP server stopped unexpectedly: {http.error}", file=sys.stderr, flush=True)
        return 1
    print("teacher server stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    import warnings

    # Import-time notices of GPU stacks that are absent by design on CPU.
    for pattern in ("pynvml", "Apex", "Transformer Engine", "full scope is deprecated"):
        warnings.filterwarnings("ignore", message=f".*{pattern}.*")
    parser = argparse.ArgumentParser(prog="megatron-opd serve-teacher", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return serve_command(parser.parse_args(argv))


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Nothing is left to write; skip the interpreter's teardown of torch and megatron (about 1 s).
    os._exit(code)
