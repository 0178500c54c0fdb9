"""What the server accepts: /generate bodies checked against SGLang's contract and our limits.

`parse_generate` turns a body into `GenItem`s (one per sequence) or raises `RequestError`, whose
body has SGLang's shape: {"error": "<text>"} for a request that breaks the contract (what
`generate_contract_error` sends), {"error": {"message": ...}} for one the server cannot serve.
Size limits (`ServerLimits`) bound what one request may cost: sequences per request and tokens
held (inputs plus the new tokens asked for); the body size itself is bounded by the HTTP app.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from megatron_opd.rollout.config import SamplingParams
from megatron_opd.serving import wire

# Sampling parameters accepted only at their neutral value (the server does not implement them).
_NEUTRAL_PARAMS = {
    "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
    "min_new_tokens": 0, "n": 1, "json_schema": None, "regex": None, "ebnf": None,
    "structural_tag": None, "stop_regex": None, "logit_bias": {}, "custom_params": None,
    "beam_width": None, "watermark": None, "choice": [], "stop": None,
}  # fmt: skip


class RequestError(Exception):
    """A request the server refuses (400 unless `status` says otherwise). `contract` picks SGLang's body shape."""

    def __init__(self, message: str, *, contract: bool = False, status: int = 400):
        super().__init__(message)
        self.contract = contract
        self.status = status

    def body(self) -> dict:
        return {"error": str(self)} if self.contract else {"error": {"message": str(self)}}


@dataclass(frozen=True)
class ServerLimits:
    """What one /generate request may ask for (server flags, docs/teachers.md)."""

    context_length: int  # the model's max_seq_len
    max_batch_size: int = 512  # sequences per request (--max-batch-size)
    max_request_tokens: int = 65536  # sum over sequences of input + max_new_tokens (--max-request-tokens)
    sampling_mask_max_tokens: int = 4096  # the largest kept set a sampling mask may hold (SGLang's flag)


@dataclass
class GenItem:
    input_ids: list[int]
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # SGLang's: -1 is the whole vocabulary
    min_p: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    sampling_seed: int | None = None
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_hidden_states: bool = False
    # Keep sampling mask (SGLang's return_sampling_mask): each output token's kept set and its
    # log-prob renormalised over it ("selected") or every kept token's ("support").
    return_sampling_mask: bool = False
    sampling_logprobs_mode: str = "selected"
    # Keep routing (SGLang's return_routed_experts): the experts of every MoE layer for the
    # positions [routed_experts_start_len, seqlen - 1).
    return_routed_experts: bool = False
    routed_experts_start_len: int = 0
    rid: str | None = None

    def sampling_params(self) -> SamplingParams:
        """This item's sampling as the one sampler's parameters (SGLang's top_k -1 is our 0)."""
        return SamplingParams(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=0 if self.top_k == -1 else self.top_k, min_p=self.min_p, stop_token_ids=self.stop_token_ids,
        )  # fmt: skip


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


def _check_sampling(item: GenItem) -> None:
    """SGLang's SamplingParams.verify, for what the server implements."""
    if item.max_new_tokens < 0:
        raise RequestError(f"max_new_tokens must be >= 0, got {item.max_new_tokens}")
    if not 0.0 < item.top_p <= 1.0:
        raise RequestError(f"top_p must be in (0, 1], got {item.top_p}")
    if not (item.temperature >= 0 and item.temperature != float("inf")):
        raise RequestError(f"temperature must be a non-negative finite number, got {item.temperature}.")
    if item.top_k < 1 and item.top_k != -1:
        raise RequestError(f"top_k must be -1 (disable) or at least 1, got {item.top_k}.")
    if not 0.0 <= item.min_p <= 1.0:
        raise RequestError(f"min_p must be in [0, 1], got {item.min_p}.")


SAMPLING_LOGPROBS_MODES = ("selected", "support")  # sglang/srt/managers/schedule_batch.py SamplingLogprobsMode
TOP_K_ALL = 1 << 30  # sglang/srt/sampling/sampling_params.py: what top_k=-1 becomes


def _check_sampling_mask(item: GenItem, cap: int) -> None:
    """SGLang's scheduler check (scheduler.py): a sampling mask needs greedy or a finite top-k."""
    greedy = 0 <= item.temperature < 1e-6
    top_k = 1 if greedy else TOP_K_ALL if item.top_k == -1 else item.top_k
    if top_k != 1 and not 1 < top_k <= cap:
        raise RequestError(
            "return_sampling_mask requires top_k=1 for greedy sampling "
            f"or finite 1 < top_k <= {cap}; got top_k={top_k}. Lower top_k or increase --sampling-mask-max-tokens."
        )


def parse_generate(
    body: Any,
    *,
    vocab_size: int,
    encode: Callable[[str], list[int]],
    plain: bool,
    limits: ServerLimits,
    routed_experts: bool = False,
) -> GenerateCall:
    """Validate a /generate body and split it into items (SGLang's fields, our extensions).

    `plain` (--plain-sglang): the server stands in for a stock SGLang without our extensions and
    without `return_sampling_mask` (an SGLang that does not know the field ignores it).
    `routed_experts` (--enable-return-routed-experts, as SGLang's flag): `return_routed_experts`
    is served; without it the field is ignored, as by SGLang."""
    if not isinstance(body, dict):
        raise RequestError(f"invalid type: {type(body).__name__}, expected struct GenerateRequest", contract=True)
    if body.get("stream"):
        raise RequestError("stream=true is not supported by the embedded server")
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
    if len(seqs) > limits.max_batch_size:
        raise RequestError(
            f"the request has {len(seqs)} sequences; this server takes at most {limits.max_batch_size} per request "
            f"(--max-batch-size): send them in several requests"
        )
    for seq in seqs:
        if not isinstance(seq, list) or not seq:
            raise RequestError("input_ids must be a non-empty list of token ids (or a list of such lists)")
        for t in seq:
            _want(t, (int,), "i64")
            if not 0 <= t < vocab_size:
                raise RequestError(f"token id {t} is outside the vocabulary [0, {vocab_size})")
        if len(seq) > limits.context_length:
            raise RequestError(
                f"The input ({len(seq)} tokens) is longer than the model's context length ({limits.context_length} tokens)."
            )
    n = len(seqs)
    sps = _per_item(body.get("sampling_params") or {}, n, "sampling_params", is_batch)

    def get(key: str, default: Any) -> list:
        value = body.get(key)
        return _per_item(default if value is None else value, n, key, is_batch)

    return_logprob, start, topn = get("return_logprob", False), get("logprob_start_len", -1), get("top_logprobs_num", 0)
    hidden, rids = get("return_hidden_states", False), get("rid", None)
    masks, modes = get("return_sampling_mask", False), get("sampling_logprobs_mode", None)
    want_routing = False if plain else _want(body.get("return_routed_experts") or False, (bool,), "a boolean")
    routing_start = _want(body.get("routed_experts_start_len") or 0, (int,), "i64")
    if body.get("token_ids_logprob") is not None:
        raise RequestError("token_ids_logprob is not supported by the embedded server")
    items = []
    for i, seq in enumerate(seqs):
        sp = _want(sps[i], (dict,), "struct SamplingParams")
        for key in sp:
            if key not in wire.SAMPLING_PARAM_KEYS:
                listed = ", ".join(f"`{f}`" for f in wire.SAMPLING_PARAM_KEYS)
                raise RequestError(f"unknown field `{key}`, expected one of {listed}", contract=True)
        for key, neutral in _NEUTRAL_PARAMS.items():
            if sp.get(key, neutral) not in (neutral, None):
                raise RequestError(f"sampling_params.{key}={sp[key]!r} is not supported by the embedded server")
        item = GenItem(
            input_ids=seq,
            max_new_tokens=_want(sp.get("max_new_tokens", 128), (int,), "u32"),
            temperature=float(_want(sp.get("temperature", 1.0), (int, float), "f32")),
            top_p=float(_want(sp.get("top_p", 1.0), (int, float), "f32")),
            top_k=_want(sp.get("top_k", -1), (int,), "i32"),
            min_p=float(_want(sp.get("min_p", 0.0), (int, float), "f32")),
            stop_token_ids=tuple(_want(t, (int,), "i64") for t in (sp.get("stop_token_ids") or ())),
            ignore_eos=_want(sp.get("ignore_eos", False), (bool,), "a boolean"),
            sampling_seed=None if sp.get("sampling_seed") is None else _want(sp["sampling_seed"], (int,), "i64"),
            return_logprob=_want(return_logprob[i], (bool,), "a boolean"),
            logprob_start_len=_want(start[i], (int,), "i64"),
            top_logprobs_num=_want(topn[i], (int,), "i64"),
            return_hidden_states=_want(hidden[i], (bool,), "a boolean"),
            return_routed_experts=want_routing and routed_experts,
            routed_experts_start_len=routing_start,
            rid=rids[i],
        )
        _check_sampling(item)
        if not plain:
            item.return_sampling_mask = _want(masks[i], (bool,), "a boolean")
            if modes[i] is not None:
                if not item.return_sampling_mask:
                    raise RequestError("sampling_logprobs_mode can only be set when return_sampling_mask=true.")
                if modes[i] not in SAMPLING_LOGPROBS_MODES:
                    raise RequestError(f"sampling_logprobs_mode={modes[i]!r}; expected one of {list(SAMPLING_LOGPROBS_MODES)}")
                item.sampling_logprobs_mode = modes[i]
            if item.return_sampling_mask:
                _check_sampling_mask(item, limits.sampling_mask_max_tokens)
        if item.return_routed_experts and not 0 <= routing_start <= len(seq):
            raise RequestError(
                f"routed_experts_start_len={routing_start} is outside [0, {len(seq)}] (the number of input tokens)"
            )
        L = len(seq)
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
    held = sum(len(it.input_ids) + min(it.max_new_tokens, limits.context_length) for it in items)
    if held > limits.max_request_tokens:
        raise RequestError(
            f"the request holds {held} tokens (inputs plus max_new_tokens over {n} sequences); this server takes at "
            f"most {limits.max_request_tokens} per request (--max-request-tokens): send fewer or shorter sequences"
        )
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
        call.binary = bool(body.get(wire.KEY_BINARY))
        call.hidden_dtype = body.get(wire.KEY_BINARY_HIDDEN_DTYPE, "float32")
        if call.hidden_dtype not in ("float32", "float16"):
            raise RequestError(f"{wire.KEY_BINARY_HIDDEN_DTYPE}={call.hidden_dtype!r}; expected 'float32' or 'float16'")
        call.full_logprobs = bool(body.get(wire.KEY_FULL_LOGPROBS))
    return call
