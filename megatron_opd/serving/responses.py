"""What the server answers: one generated or scored sequence as SGLang's /generate response.

`ItemResult` is what the backend computed for one `GenItem`; `encode_response` lays it out as
SGLang does (`{"text", "output_ids", "meta_info"}`, logprob entries `[logprob, id, text]`,
nested or flat top-k, hidden states as rows or a prefill block, sampling masks, routed experts),
or, for our binary form, leaves the large arrays as numpy for `wire.encode_binary`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from megatron_opd.serving import wire
from megatron_opd.serving.requests import GenerateCall, GenItem


@dataclass
class ItemResult:
    output_ids: list[int] = field(default_factory=list)
    finish: dict | None = None
    input_logprobs: np.ndarray | None = None  # [n-1, V] log_softmax at positions s .. L-2
    output_logprobs: list[np.ndarray] = field(default_factory=list)  # per generated token, [V], as reported
    hidden: list[np.ndarray] = field(default_factory=list)  # [L, d] prefill block, then [d] per decode step
    # Per output token: the sampler's kept set (int32 ids, most probable first) and the log-probs
    # renormalised over it (a float for the token drawn, or one per kept id in "support" mode).
    sampling_masks: list[np.ndarray] = field(default_factory=list)
    sampling_logprobs: list = field(default_factory=list)
    routed_experts: np.ndarray | None = None  # [seqlen - 1 - start, num_layers, topk] int32


def topk_rows(lp_rows: np.ndarray, k: int, null_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row (descending), with `null_rows` leading NaN/-1 rows."""
    n = lp_rows.shape[0] + null_rows
    vals = np.full((n, k), np.nan, np.float32)
    ids = np.full((n, k), -1, np.int64)
    if lp_rows.shape[0]:
        import torch

        top = torch.topk(torch.from_numpy(np.ascontiguousarray(lp_rows)), k, dim=-1, sorted=True)
        vals[null_rows:], ids[null_rows:] = top.values.numpy(), top.indices.numpy()
    return vals, ids


@dataclass(frozen=True)
class ResponseContext:
    """What every response of one server shares."""

    vocab_size: int
    weight_version: str
    decode: Callable[[list[int]], str]  # token ids -> text (the response's `text`)
    token_text: Callable[[int], str]  # one token id -> its text (logprob entries)
    hidden_layout: str = "rows"  # "rows" (SGLang's contract type) or "block" (its source's shape)


def encode_response(call: GenerateCall, it: GenItem, res: ItemResult, latency: float, ctx: ResponseContext) -> dict[str, Any]:
    L = len(it.input_ids)
    meta: dict[str, Any] = {
        "id": it.rid or uuid.uuid4().hex,
        "finish_reason": res.finish,
        "prompt_tokens": L,
        "completion_tokens": len(res.output_ids),
        "cached_tokens": 0,
        "weight_version": ctx.weight_version,
        "e2e_latency": latency,
    }
    texts = ctx.token_text if call.return_text_in_logprobs else None
    if it.return_logprob:
        s = it.logprob_start_len
        ids = np.asarray(it.input_ids[s:], np.int64)
        lp_rows = res.input_logprobs  # positions s .. L-2 predict tokens s+1 .. L-1
        vals = np.full(len(ids), np.nan, np.float32)
        if len(ids) > 1:
            vals[1:] = np.take_along_axis(lp_rows, ids[1:, None], 1)[:, 0]
        out_ids = np.asarray(res.output_ids, np.int64)
        out_vals = np.asarray([lp[t] for lp, t in zip(res.output_logprobs, res.output_ids)], np.float32)
        meta["output_token_logprobs"] = wire.logprob_entries(out_vals, out_ids, [texts(t) for t in res.output_ids] if texts else None)
        meta["output_token_logprobs_length"] = len(res.output_ids)
        if call.binary:
            meta[wire.A_TOKEN_LP], meta[wire.A_TOKEN_ID] = vals, ids.astype(np.int32)
        else:
            meta["input_token_logprobs"] = wire.logprob_entries(vals, ids, [texts(t) for t in ids.tolist()] if texts else None)
        k = it.top_logprobs_num
        if k:
            top_v, top_i = topk_rows(lp_rows, k, null_rows=1 if len(ids) else 0)
            if call.binary:
                meta[wire.A_TOP_LP], meta[wire.A_TOP_ID] = top_v, top_i.astype(np.int32)
            elif call.flat_top:
                meta.update(wire.flat_top_logprob_fields("input", top_v, top_i, min(1, len(ids)), call.flat_top_b64))
            else:
                meta["input_top_logprobs"] = wire.top_logprob_rows(top_v, top_i, min(1, len(ids)), texts)
            out_v, out_i = topk_rows(np.asarray(res.output_logprobs).reshape(-1, ctx.vocab_size), k, null_rows=0)
            if call.flat_output_top:
                meta.update(wire.flat_top_logprob_fields("output", out_v, out_i, 0, call.flat_top_b64))
            else:
                meta["output_top_logprobs"] = wire.top_logprob_rows(out_v, out_i, 0, texts)
        if call.full_logprobs:
            full = np.full((len(ids), ctx.vocab_size), np.nan, np.float32)
            full[1:] = lp_rows
            meta[wire.FULL_LOGPROBS] = full if call.binary else ([None] + full[1:].tolist() if len(ids) else [])
    if it.return_sampling_mask:
        meta.update(wire.sampling_mask_fields(res.sampling_masks, res.sampling_logprobs))
    if it.return_routed_experts and res.routed_experts is not None:
        meta[wire.ROUTED_EXPERTS] = wire.encode_routed_experts(res.routed_experts)
    if it.return_hidden_states and res.hidden:
        # Like SGLang, keep the states up to the finished length: the prefill block plus one
        # row per decode step (the last sampled token is never fed back).
        block, steps = res.hidden[0], res.hidden[1:]
        if call.binary:
            rows = np.concatenate([block] + [r[None] for r in steps]) if steps else block
            meta[wire.A_HIDDEN] = rows.astype(call.hidden_dtype)
        elif ctx.hidden_layout == "block":
            meta["hidden_states"] = [block.tolist()] + [r.tolist() for r in steps]
        else:
            meta["hidden_states"] = block.tolist() + [r.tolist() for r in steps]
    return {"text": ctx.decode(res.output_ids), "output_ids": list(res.output_ids), "meta_info": meta}
