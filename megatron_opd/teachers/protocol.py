"""Teacher scoring over SGLang's /generate: the requests and the checked signals (no I/O).

The wire format itself (error bodies, the binary form, logprob entry shapes, sampling keys) is
`megatron_opd.serving.wire`; this module is what a *teacher signal* means on that wire. Everything
follows `/work/shared/notes/sglang-protocol.md` (read from the sglang==0.5.23 source) and is checked
against SGLang's own contract classes in the tests:

- Scoring a sequence of L tokens whose prompt has p tokens is a prefill request with
  `logprob_start_len = s = p - 1`; the input lists then have L - s entries, entry 0 null, entry j
  the model's log p(input_ids[s + j] | prefix). Entry j + 1 therefore belongs to response token j,
  which is the alignment convention of `megatron_opd.data.trajectories`.
- `max_new_tokens` is 0 for logprob signals and 1 for hidden states (0 returns no states).
- Top-k comes back nested (`[[logprob, id, text], ...]` per position), flat, or flat base64
  (`return_flat_raw_top_logprobs[_b64]`, newer releases only): every form is decoded.
- Hidden states come in two shapes: SGLang's source appends one 2-D block per prefill, then one
  1-D row per decoded token; its contract types a list of 1-D rows. Both are decoded and the row
  count is checked against the sequence length (a prefix-cache hit or chunked prefill drops rows).

Every decoder raises `ProtocolError` naming the teacher, URL, field and numbers rather
than returning signals that could be misaligned.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from megatron_opd.serving.wire import (
    A_HIDDEN,
    A_TOKEN_ID,
    A_TOKEN_LP,
    A_TOP_ID,
    A_TOP_LP,
    FULL_LOGPROBS,
    KEY_BINARY,
    KEY_BINARY_HIDDEN_DTYPE,
    KEY_FULL_LOGPROBS,
    ProtocolError,
)

@dataclass(frozen=True)
class ScoreItem:
    """One sequence to score: `tokens` is prompt + response, the first `prompt_len` the prompt.
    `sample_id` (the trajectory's) names it in error messages."""

    tokens: tuple[int, ...]
    prompt_len: int
    sample_id: str = ""

    def __post_init__(self):
        object.__setattr__(self, "tokens", tuple(int(t) for t in self.tokens))
        if not 1 <= self.prompt_len <= len(self.tokens):
            raise ValueError(f"ScoreItem: prompt_len {self.prompt_len} outside [1, {len(self.tokens)}]")

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def response_len(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def logprob_start_len(self) -> int:
        return self.prompt_len - 1


@dataclass(frozen=True)
class SignalSpec:
    """What to ask a teacher for (see `TeacherConfig`)."""

    kind: str  # hidden | topk | sampled | logits
    topk: int = 0
    topk_format: str = "b64"  # b64 | flat | nested
    binary: bool = False  # ask our server for the binary form
    hidden_dtype: str = "float32"


def score_request(items: Sequence[ScoreItem], spec: SignalSpec) -> dict[str, Any]:
    """The /generate body that scores `items` (one batch; all must share one prompt length).

    One scalar `logprob_start_len` serves the batch because the router refuses per-item lists.
    """
    if not items:
        raise ValueError("score_request needs at least one sequence")
    starts = {it.logprob_start_len for it in items}
    if len(starts) != 1:
        raise ValueError(f"a scoring batch must share one prompt length, got prompt lengths {sorted(s + 1 for s in starts)}")
    body: dict[str, Any] = {"input_ids": [list(it.tokens) for it in items]}
    if spec.kind == "hidden":
        body["sampling_params"] = {"max_new_tokens": 1, "temperature": 0.0}
        body["return_hidden_states"] = True
    elif spec.kind in ("topk", "sampled", "logits"):
        body["sampling_params"] = {"max_new_tokens": 0}
        body["return_logprob"] = True
        body["logprob_start_len"] = starts.pop()
        if spec.kind == "topk":
            if spec.topk < 1:
                raise ValueError(f"topk signal needs k >= 1, got {spec.topk}")
            body["top_logprobs_num"] = spec.topk
            if spec.topk_format in ("flat", "b64"):
                body["return_flat_raw_top_logprobs"] = True
            if spec.topk_format == "b64":
                body["return_flat_raw_top_logprobs_b64"] = True
        if spec.kind == "logits":
            body[KEY_FULL_LOGPROBS] = True
    else:
        raise ValueError(f"unknown signal kind {spec.kind!r}")
    if spec.binary:
        body[KEY_BINARY] = True
        if spec.kind == "hidden":
            body[KEY_BINARY_HIDDEN_DTYPE] = spec.hidden_dtype
    return body


# ---------------------------------------------------------------------------------------------
# Response decoding


@dataclass
class ItemSignal:
    """One sequence's teacher signal, one row per response token (alignment convention)."""

    kind: str
    hidden: np.ndarray | None = None  # [R, d]
    topk_ids: np.ndarray | None = None  # [R, k] int64
    topk_logprobs: np.ndarray | None = None  # [R, k] float32, descending
    sampled_logprobs: np.ndarray | None = None  # [R] float32
    logits: np.ndarray | None = None  # [R, V] float32 log-softmax
    weight_version: str = ""


def _fail(where: str, text: str) -> ProtocolError:
    return ProtocolError(f"{where} {text}")


def _finite(values: np.ndarray, name: str, where: str) -> np.ndarray:
    """`values` ([R, ...], one row per response token) if every entry is finite."""
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise _fail(
            where,
            f"returned non-finite {name} ({int(bad.sum())} of {values.size} values, the first at response position "
            f"{row}); a NaN or infinite teacher signal would make the loss non-finite, so it is refused",
        )
    return values


def _finish(meta: dict, where: str) -> str:
    reason = meta.get("finish_reason")
    if reason is None:
        raise _fail(where, "returned a response without finish_reason (the request did not finish)")
    kind = reason.get("type") if isinstance(reason, dict) else None
    if kind == "abort":
        raise _fail(where, f"aborted the request: {reason.get('message')!r} (status {reason.get('status_code')})")
    if kind not in ("length", "stop"):
        raise _fail(where, f"returned finish_reason {reason!r}; expected type 'length' or 'stop'")
    return kind


def _token_logprobs(meta: dict, item: ScoreItem, where: str) -> tuple[np.ndarray, np.ndarray]:
    """input_token_logprobs as (logprobs float32 [n] with NaN for null, token ids int64 [n])."""
    L, s = item.length, item.logprob_start_len
    n = L - s
    if A_TOKEN_LP in meta:
        vals, ids = np.asarray(meta[A_TOKEN_LP], np.float32), np.asarray(meta[A_TOKEN_ID], np.int64)
    else:
        entries = meta.get("input_token_logprobs")
        if not isinstance(entries, list):
            raise _fail(where, "returned no input_token_logprobs")
        try:
            vals = np.array([np.nan if e[0] is None else e[0] for e in entries], np.float32)
            ids = np.array([e[1] for e in entries], np.int64)
        except (TypeError, IndexError):
            raise _fail(where, "returned malformed input_token_logprobs entries (expected [logprob, token_id, text])") from None
    if vals.shape != (n,) or ids.shape != (n,):
        raise _fail(
            where,
            f"returned {len(vals)} input_token_logprobs for a sequence of {L} tokens with logprob_start_len {s}; expected {n}",
        )
    return vals, ids


def _top_logprobs(meta: dict, n: int, k: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Top-k in any encoding as (logprobs float32 [n, k] NaN in null rows, ids int64 [n, k])."""
    if A_TOP_LP in meta:
        vals, ids = np.asarray(meta[A_TOP_LP], np.float32), np.asarray(meta[A_TOP_ID], np.int64)
        if vals.shape != (n, k) or ids.shape != (n, k):
            raise _fail(where, f"returned top-k arrays of shape {vals.shape}; expected {(n, k)}")
        return vals, ids
    if "input_top_logprobs_shape" in meta:
        rows, kk = meta["input_top_logprobs_shape"]
        null_prefix = int(meta.get("input_top_logprobs_null_prefix", 0))
        if "input_top_logprobs_val_flat_b64" in meta:
            for key, want in (("val", "float32"), ("idx", "int32")):
                got = meta.get(f"input_top_logprobs_{key}_flat_b64_dtype", want)
                if got != want:
                    raise _fail(where, f"sent flat top-k {key} as {got!r}; this client reads {want!r}")
            flat_v = np.frombuffer(base64.b64decode(meta["input_top_logprobs_val_flat_b64"]), "<f4")
            flat_i = np.frombuffer(base64.b64decode(meta["input_top_logprobs_idx_flat_b64"]), "<i4")
        else:
            flat_v = np.asarray(meta.get("input_top_logprobs_val_flat", []), np.float32)
            flat_i = np.asarray(meta.get("input_top_logprobs_idx_flat", []), np.int64)
        if flat_v.size != rows * kk or flat_i.size != rows * kk:
            raise _fail(where, f"sent flat top-k of {flat_v.size} values for shape [{rows}, {kk}]")
        if null_prefix + rows != n or kk != k:
            raise _fail(
                where,
                f"returned flat top-k covering {null_prefix} + {rows} positions with k={kk}; expected {n} positions with k={k}",
            )
        vals = np.full((n, k), np.nan, np.float32)
        ids = np.full((n, k), -1, np.int64)
        vals[null_prefix:] = flat_v.reshape(rows, kk)
        ids[null_prefix:] = flat_i.reshape(rows, kk)
        return vals, ids
    rows = meta.get("input_top_logprobs")
    if not isinstance(rows, list):
        raise _fail(where, "returned no input_top_logprobs (nested or flat)")
    if len(rows) != n:
        raise _fail(where, f"returned {len(rows)} input_top_logprobs rows; expected {n}")
    vals = np.full((n, k), np.nan, np.float32)
    ids = np.full((n, k), -1, np.int64)
    for r, row in enumerate(rows):
        if row is None:
            continue
        if len(row) != k:
            raise _fail(where, f"returned {len(row)} top logprobs at input position {r}; expected k={k}")
        try:
            vals[r] = [np.nan if e[0] is None else e[0] for e in row]
            ids[r] = [e[1] for e in row]
        except (TypeError, IndexError):
            raise _fail(where, f"returned malformed top logprob entries at input position {r}") from None
    return vals, ids


def _hidden_rows(meta: dict, item: ScoreItem, where: str) -> np.ndarray:
    """The hidden states at positions prompt_len-1 .. length-2, from either shape."""
    L, p = item.length, item.prompt_len
    cached = int(meta.get("cached_tokens") or 0)
    completion = int(meta.get("completion_tokens") or 0)
    hs = meta.get(A_HIDDEN, meta.get("hidden_states"))
    if hs is None or (isinstance(hs, list) and not hs):
        raise _fail(
            where,
            "returned no hidden_states: the server needs --enable-return-hidden-states and the request "
            "max_new_tokens >= 1",
        )
    if isinstance(hs, list) and isinstance(hs[0], list) and hs[0] and isinstance(hs[0][0], list):
        # SGLang's source shape: one 2-D block for the prefill, then 1-D decode rows.
        block = np.asarray(hs[0], np.float32)
        if block.ndim != 2 or block.shape[0] != L:
            raise _fail(
                where,
                f"returned a hidden-state block of {block.shape[0] if block.ndim else 0} prefill positions for a "
                f"sequence of {L} tokens (cached_tokens={cached}); only computed positions come back, so "
                f"run the teacher with --disable-radix-cache --chunked-prefill-size -1",
            )
        return block[p - 1 : L - 1].copy()
    rows = hs if isinstance(hs, np.ndarray) else np.asarray(hs, np.float32)
    if rows.ndim != 2:
        raise _fail(where, "returned hidden_states that are neither a 2-D block nor equal-length 1-D rows")
    expected = L + max(completion, 1) - 1
    if rows.shape[0] != expected or cached:
        raise _fail(
            where,
            f"returned {rows.shape[0]} hidden-state rows for a sequence of {L} tokens with "
            f"{completion} generated (cached_tokens={cached}); expected {expected}. Only computed positions "
            f"come back: run the teacher with --disable-radix-cache --chunked-prefill-size -1",
        )
    return np.array(rows[p - 1 : L - 1])  # a copy: binary arrays are read-only views of the body


def parse_score_response(
    responses: list[dict[str, Any]],
    items: Sequence[ScoreItem],
    spec: SignalSpec,
    where: str,
    *,
    vocab_size: int = 0,
) -> list[ItemSignal]:
    """Turn the responses to `score_request(items, spec)` into per-item signals, checking everything.

    `where` opens every error message (e.g. "teacher 'math' at http://127.0.0.1:8001").
    `vocab_size` > 0 also checks that every returned token id is a token.
    """
    if len(responses) != len(items):
        raise _fail(where, f"returned {len(responses)} responses for a batch of {len(items)} sequences")
    out = []
    for b, (resp, item) in enumerate(zip(responses, items)):
        label = ([f"batch item {b}"] if len(items) > 1 else []) + ([f"sample {item.sample_id!r}"] if item.sample_id else [])
        at = f"{where} ({', '.join(label)})" if label else where
        meta = resp.get("meta_info")
        if not isinstance(meta, dict):
            raise _fail(at, "returned a response without meta_info")
        _finish(meta, at)
        L, s, R = item.length, item.logprob_start_len, item.response_len
        if meta.get("prompt_tokens") != L:
            raise _fail(at, f"reports prompt_tokens={meta.get('prompt_tokens')} for a sequence of {L} tokens")
        sig = ItemSignal(kind=spec.kind, weight_version=str(meta.get("weight_version") or ""))
        if spec.kind == "hidden":
            sig.hidden = _finite(_hidden_rows(meta, item, at), "hidden states", at)
            out.append(sig)
            continue
        n = L - s
        vals, ids = _token_logprobs(meta, item, at)
        want = np.asarray(item.tokens[s:], np.int64)
        if not np.array_equal(ids, want):
            j = int(np.nonzero(ids != want)[0][0])
            raise _fail(at, f"input_token_logprobs[{j}] is for token {ids[j]}, but position {s + j} holds token {want[j]}")
        if not math.isnan(vals[0]):
            raise _fail(at, f"input_token_logprobs[0] is {vals[0]}, expected null (entry 0 is never scored)")
        lp = vals[1:]
        if lp.size and not np.all(np.isfinite(lp)):
            _finite(lp, "input logprobs", at)
        if lp.size and lp.max() > 1e-4:
            raise _fail(at, f"returned input logprobs that are not finite log-probabilities (max {np.nanmax(lp)})")
        if spec.kind == "sampled":
            sig.sampled_logprobs = lp.copy()
        elif spec.kind == "topk":
            tv, ti = _top_logprobs(meta, n, spec.topk, at)
            if not np.all(np.isnan(tv[0])):
                raise _fail(at, "input_top_logprobs[0] is not null (entry 0 is never scored)")
            tv, ti = tv[1:], ti[1:]
            if tv.size:
                _finite(tv, "(or null) top logprobs after entry 0", at)
                if np.any(np.diff(tv, axis=1) > 1e-6):
                    raise _fail(at, "returned top logprobs that are not sorted in descending order")
                if ti.min() < 0 or (vocab_size and ti.max() >= vocab_size):
                    raise _fail(at, f"returned top-k token ids outside [0, {vocab_size or 'V'}): {ti.min()}..{ti.max()}")
            sig.topk_logprobs, sig.topk_ids = tv.copy(), ti.copy()
        elif spec.kind == "logits":
            full = meta.get(FULL_LOGPROBS)
            if full is None:
                raise _fail(
                    at,
                    f"returned no {FULL_LOGPROBS}: signal 'logits' needs our embedded teacher server, reached directly "
                    f"(a stock SGLang server has no such output, and sglang-router drops the {KEY_FULL_LOGPROBS} key)",
                )
            # Row 0 (never scored) is null in JSON and NaN in the binary form.
            rows = full[1:]
            full = np.asarray(rows, np.float32) if len(rows) else np.zeros((0, vocab_size), np.float32)
            if full.ndim != 2 or full.shape[0] != R or (vocab_size and full.shape[1] != vocab_size):
                raise _fail(at, f"returned {FULL_LOGPROBS} of shape {tuple(full.shape)}; expected ({R}, {vocab_size or 'V'})")
            sig.logits = _finite(np.array(full), FULL_LOGPROBS, at)
        else:
            raise ValueError(f"unknown signal kind {spec.kind!r}")
        out.append(sig)
    return out
