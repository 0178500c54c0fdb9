"""SGLang's HTTP wire format, shared by our one client (serving/client.py) and our server.

Pure encode/decode, no I/O. Everything follows `/work/shared/notes/sglang-protocol.md` (read from
the sglang==0.5.23 source) and is checked against SGLang's own contract classes in the tests
(serving/sglang_contract.py):

- the sampling parameters SGLang knows (a server answers 400 for others; a router drops them);
- the error bodies servers and routers send, and the message inside each;
- the logprob entry shapes: `[logprob, token_id, text]`, nested top-k rows, flat (base64) top-k;
- the weight-update request bodies (checked against SGLang's io_struct.py);
- the RL extras of SGLang's meta_info: sampling masks (`return_sampling_mask`) and routed experts
  (`return_routed_experts`), with their decoders;
- our extensions, which SGLang ignores (unknown top-level request keys and /model_info keys):
  the binary response form (docs/teachers.md) and the model-identity keys of /model_info.
"""

from __future__ import annotations

import base64
import difflib
import json
import math
import struct
from typing import Any, Sequence

import numpy as np

# SGLang's SamplingParams fields (sglang/api/v1/api_types.py, 0.5.23): a server answers 400 for
# any other key, but a router silently drops it, so requests are checked here, on our side.
SAMPLING_PARAM_KEYS = (
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k",
    "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n",
    "json_schema", "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens",
    "spaces_between_special_tokens", "no_stop_trim", "stream_interval", "logit_bias",
    "sampling_seed", "custom_params", "beam_width", "watermark", "choice",
)  # fmt: skip

BINARY_CONTENT_TYPE = "application/x-opd-signal"
BINARY_MAGIC = b"OPDSIG\x00\x01"  # 6 bytes of name, then the format version (1) as two bytes
# Our top-level request keys. SGLang ignores unknown top-level keys, so they are protocol-safe.
KEY_BINARY = "return_binary_signal"
KEY_BINARY_HIDDEN_DTYPE = "binary_hidden_dtype"
KEY_FULL_LOGPROBS = "return_full_logprobs"
# meta_info keys of the arrays our server fills (binary form) and of the full log-softmax rows.
A_TOKEN_LP, A_TOKEN_ID = "opd.input_token_logprobs.logprob", "opd.input_token_logprobs.token_id"
A_TOP_LP, A_TOP_ID = "opd.input_top_logprobs.logprob", "opd.input_top_logprobs.token_id"
A_HIDDEN = "opd.hidden_states"
FULL_LOGPROBS = "input_full_logprobs"


# /model_info keys our server adds (SGLang's clients ignore unknown keys): the identity the
# teacher pool checks against the student and against a teacher's model_dir.
INFO_VOCAB_SIZE, INFO_FINGERPRINT, INFO_HIDDEN_SIZE = "vocab_size", "tokenizer_fingerprint", "hidden_size"
INFO_CHECKPOINT_ID = "checkpoint_id"  # runtime/checkpoint.py: checkpoint_id of what the server serves
# data/tokenizer.py TokenizerDescription.digest(): per-component hashes, so a mismatch can be named
INFO_TOKENIZER_DIGEST = "tokenizer_digest"
# GET: the served tokenizer's whole TokenizerDescription (to_json), fetched only on a fingerprint
# mismatch so that the refusal names the first differing token id, merge or template line.
TOKENIZER_DESCRIPTION_PATH = "/tokenizer_description"
INFO_SERVER = "opd_server"  # {"version", "binary_signal", "full_logprobs", "hidden_states_layout"}


class ProtocolError(ValueError):
    """A request or response does not follow the protocol; the message says where and by how much."""


# ---------------------------------------------------------------------------------------------
# Requests


def check_sampling_params(params: dict[str, Any]) -> None:
    """Refuse keys SGLang does not know (a router would drop them silently)."""
    for key in params:
        if key not in SAMPLING_PARAM_KEYS:
            close = difflib.get_close_matches(key, SAMPLING_PARAM_KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"sampling_params has unknown key {key!r}{hint}")


def sample_request(
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = -1,
    min_p: float = 0.0,
    stop_token_ids: Sequence[int] = (),
    sampling_seed: int | None = None,
    return_logprob: bool = True,
) -> dict[str, Any]:
    """A /generate body that samples a continuation of each prompt (rollout use)."""
    params: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature), "top_p": float(top_p)}
    if top_k > 0:
        params["top_k"] = int(top_k)
    if min_p > 0:
        params["min_p"] = float(min_p)
    if stop_token_ids:
        params["stop_token_ids"] = [int(t) for t in stop_token_ids]
    if sampling_seed is not None:
        params["sampling_seed"] = int(sampling_seed)
    body: dict[str, Any] = {"input_ids": [list(map(int, p)) for p in prompts], "sampling_params": params}
    if return_logprob:
        body["return_logprob"] = True
    return body


# ---------------------------------------------------------------------------------------------
# Weight-update request bodies (tests check them against SGLang's io_struct.py)


def disk_update_body(model_path: str, version: str) -> dict:
    """/update_weights_from_disk."""
    return {"model_path": model_path, "weight_version": version, "flush_cache": True}


def init_group_bodies(servers: int, ranks: int, address: str, port: int, group_name: str, backend: str) -> list[dict]:
    """/init_weights_update_group, one per server: the trainer is the group's rank 0, server i holds
    ranks 1 + i * ranks onwards."""
    world = 1 + ranks * servers
    return [
        {"master_address": address, "master_port": port, "rank_offset": 1 + i * ranks, "world_size": world,
         "group_name": group_name, "backend": backend}
        for i in range(servers)
    ]  # fmt: skip


def distributed_update_body(names: Sequence[str], dtypes: Sequence[str], shapes: Sequence[Sequence[int]], group_name: str, version: str) -> dict:
    """/update_weights_from_distributed: what the servers allocate and receive, in broadcast order.
    `dtypes` are torch dtype names without the `torch.` prefix (SGLang does getattr(torch, dtype))."""
    return {
        "names": list(names),
        "dtypes": list(dtypes),
        "shapes": [list(map(int, s)) for s in shapes],
        "group_name": group_name,
        "flush_cache": True,
        "weight_version": version,
    }


# ---------------------------------------------------------------------------------------------
# Error bodies


def error_message(body: bytes | str | Any) -> str:
    """The message of an SGLang error body, in any of the shapes servers and routers send.

    `/generate` contract violations: {"error": "<text>"}; runtime errors: {"error": {"message":
    ...}}; FastAPI validation: {"object": "error", "message": ...}; routers: plain text too.
    """
    if isinstance(body, (bytes, bytearray)):
        body = body.decode("utf-8", "replace")
    obj = body
    if isinstance(body, str):
        try:
            obj = json.loads(body)
        except ValueError:
            return body.strip()[:2000]
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, str):
            return err
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
    return json.dumps(obj)[:2000]


# ---------------------------------------------------------------------------------------------
# The binary form


def encode_binary(responses: list[dict[str, Any]]) -> bytes:
    """Our binary response: the SGLang JSON response with every ndarray in meta_info moved raw.

    Layout (little-endian): magic (8 bytes) | u32 header length H | H bytes of UTF-8 JSON header
    | zero padding to a multiple of 8 | data. Header: {"responses": [...], "arrays": [{"item",
    "key", "dtype", "shape", "offset"}]}, offsets relative to the data section, 8-byte aligned.
    """
    arrays, chunks, offset = [], [], 0
    out = []
    for i, resp in enumerate(responses):
        meta = dict(resp.get("meta_info") or {})
        for key in [k for k, v in meta.items() if isinstance(v, np.ndarray)]:
            arr = np.ascontiguousarray(meta.pop(key))
            dtype = arr.dtype.newbyteorder("<")
            raw = arr.astype(dtype, copy=False).tobytes()
            arrays.append({"item": i, "key": key, "dtype": dtype.str, "shape": list(arr.shape), "offset": offset})
            pad = (-len(raw)) % 8
            chunks.append(raw + b"\0" * pad)
            offset += len(raw) + pad
        out.append(dict(resp, meta_info=meta))
    header = json.dumps({"responses": out, "arrays": arrays}, separators=(",", ":")).encode()
    head = BINARY_MAGIC + struct.pack("<I", len(header)) + header
    return head + b"\0" * ((-len(head)) % 8) + b"".join(chunks)


def decode_binary(body: bytes, where: str = "response") -> list[dict[str, Any]]:
    """Inverse of `encode_binary`: the response list with numpy arrays back in meta_info."""
    if len(body) < 12 or body[:8] != BINARY_MAGIC:
        raise ProtocolError(f"{where}: binary signal does not start with {BINARY_MAGIC!r} (got {body[:8]!r})")
    (hlen,) = struct.unpack("<I", body[8:12])
    if 12 + hlen > len(body):
        raise ProtocolError(f"{where}: binary signal truncated: header of {hlen} bytes, body of {len(body)}")
    try:
        header = json.loads(body[12 : 12 + hlen])
    except ValueError as e:
        raise ProtocolError(f"{where}: binary signal header is not JSON: {e}") from None
    start = 12 + hlen + ((-(12 + hlen)) % 8)
    responses = header["responses"]
    for spec in header["arrays"]:
        dtype = np.dtype(spec["dtype"])
        shape = tuple(spec["shape"])
        nbytes = dtype.itemsize * math.prod(shape)
        lo = start + spec["offset"]
        if lo + nbytes > len(body):
            raise ProtocolError(
                f"{where}: binary signal truncated: array {spec['key']!r} of item {spec['item']} needs "
                f"bytes [{lo}, {lo + nbytes}) of a {len(body)}-byte body"
            )
        arr = np.frombuffer(body, dtype=dtype, count=math.prod(shape), offset=lo).reshape(shape)
        responses[spec["item"]]["meta_info"][spec["key"]] = arr
    return responses


def decode_response_body(body: bytes, content_type: str, where: str) -> list[dict[str, Any]]:
    """A /generate 200 body (JSON or binary) as a list of response objects, one per sequence."""
    if content_type.split(";")[0].strip() == BINARY_CONTENT_TYPE:
        return decode_binary(body, where)
    try:
        obj = json.loads(body)
    except ValueError as e:
        raise ProtocolError(f"{where} answered 200 with a body that is not JSON ({len(body)} bytes): {e}") from None
    if isinstance(obj, dict):
        obj = [obj]
    if not isinstance(obj, list) or not all(isinstance(o, dict) for o in obj):
        raise ProtocolError(f"{where}: /generate answered {type(obj).__name__}, expected a response object or a list of them")
    return obj


# ---------------------------------------------------------------------------------------------
# Server-side encoders (our embedded server builds SGLang's JSON with these)


def logprob_entries(logprobs: np.ndarray, token_ids: np.ndarray, texts: Sequence[str | None] | None = None) -> list[list]:
    """[[logprob, token_id, text], ...]; a NaN logprob is encoded as null (entry 0 of inputs)."""
    out = []
    for j, (lp, tid) in enumerate(zip(logprobs.tolist(), token_ids.tolist())):
        out.append([None if lp != lp else lp, int(tid), texts[j] if texts is not None else None])
    return out


def top_logprob_rows(logprobs: np.ndarray, token_ids: np.ndarray, null_rows: int, texts=None) -> list:
    """Nested top-k rows: `null_rows` leading nulls, then [[logprob, id, text] * k] per position."""
    rows: list = [None] * null_rows
    for r in range(null_rows, logprobs.shape[0]):
        ids = token_ids[r]
        rows.append(logprob_entries(logprobs[r], ids, None if texts is None else [texts(i) for i in ids.tolist()]))
    return rows


def flat_top_logprob_fields(side: str, logprobs: np.ndarray, token_ids: np.ndarray, null_prefix: int, b64: bool) -> dict[str, Any]:
    """SGLang's flat top-k fields for rows `null_prefix:` of [n, k] arrays (tokenizer_manager.py)."""
    vals = np.ascontiguousarray(logprobs[null_prefix:], dtype="<f4")
    ids = np.ascontiguousarray(token_ids[null_prefix:], dtype="<i4")
    fields: dict[str, Any] = {}
    if b64:
        fields[f"{side}_top_logprobs_val_flat_b64"] = base64.b64encode(vals.tobytes()).decode()
        fields[f"{side}_top_logprobs_idx_flat_b64"] = base64.b64encode(ids.tobytes()).decode()
        fields[f"{side}_top_logprobs_val_flat_b64_dtype"] = "float32"
        fields[f"{side}_top_logprobs_idx_flat_b64_dtype"] = "int32"
    else:
        fields[f"{side}_top_logprobs_val_flat"] = vals.reshape(-1).tolist()
        fields[f"{side}_top_logprobs_idx_flat"] = ids.reshape(-1).tolist()
    fields[f"{side}_top_logprobs_shape"] = [int(vals.shape[0]), int(vals.shape[1])]
    fields[f"{side}_top_logprobs_null_prefix"] = int(null_prefix)
    return fields


# ---------------------------------------------------------------------------------------------
# RL extras: sampling masks and routed experts (sglang 0.5.23)
#
# Sampling masks (`return_sampling_mask`, io_struct.py GenerateReqInput; api_types.py
# GenerateRequest): the tokenizer manager (tokenizer_manager.py, `SamplingMaskChunk.to_lists` of
# srt/sampling/sampling_mask.py) puts into meta_info, one entry per output token,
#   output_token_sampling_mask      [[token id, ...], ...]  the kept set, most probable first
#   output_token_sampling_logprobs  [float, ...]   "selected": log(p(token) / kept mass)
#                                   [[float, ...], ...]  "support": one per kept id
#   output_token_sampling_mask_length  int
# Routed experts (`return_routed_experts`, `routed_experts_start_len`; the server needs
# --enable-return-routed-experts): meta_info["routed_experts"] is the base64 of the raw int32
# array [seqlen - 1 - start_len, num_hidden_layers, topk] (detokenizer_manager.py
# `_b64_encode_per_request`, srt/state_capturer/), row t the routing of position start_len + t.

SAMPLING_MASK, SAMPLING_LOGPROBS = "output_token_sampling_mask", "output_token_sampling_logprobs"
SAMPLING_MASK_LENGTH = "output_token_sampling_mask_length"
ROUTED_EXPERTS = "routed_experts"


def sampling_mask_fields(masks: Sequence[np.ndarray], logprobs: Sequence) -> dict[str, Any]:
    """SGLang's meta_info fields of the sampling masks of one sequence's output tokens."""
    return {
        SAMPLING_MASK: [np.asarray(m, np.int32).tolist() for m in masks],
        SAMPLING_LOGPROBS: [np.asarray(v, np.float32).tolist() for v in logprobs],
        SAMPLING_MASK_LENGTH: len(masks),
    }


def decode_sampling_masks(meta: dict[str, Any], output_ids: Sequence[int], vocab_size: int, where: str) -> tuple[list[list[int]], list[float]]:
    """(kept set, selected-token log-prob) per output token from a response's meta_info, checked:
    one entry per output token, ids inside the vocabulary without repeats, the token drawn inside
    its set, finite log-probs <= 0. A missing field raises `ProtocolError` (the caller names
    the option)."""
    masks, logprobs = meta.get(SAMPLING_MASK), meta.get(SAMPLING_LOGPROBS)
    if masks is None or logprobs is None:
        raise ProtocolError(f"{where}: meta_info has no {SAMPLING_MASK} / {SAMPLING_LOGPROBS}")
    if len(masks) != len(output_ids) or len(logprobs) != len(output_ids):
        raise ProtocolError(
            f"{where}: {len(masks)} sampling masks and {len(logprobs)} sampling log-probs for {len(output_ids)} output tokens"
        )
    out_lp = []
    for j, (mask, lp, token) in enumerate(zip(masks, logprobs, output_ids)):
        if not mask or len(set(mask)) != len(mask) or not all(0 <= t < vocab_size for t in mask):
            raise ProtocolError(f"{where}: the sampling mask of output token {j} is not a set of token ids in [0, {vocab_size}): {mask[:8]}")
        if token not in mask:
            raise ProtocolError(f"{where}: output token {j} ({token}) is outside its sampling mask")
        if isinstance(lp, list):  # "support" mode: one per kept id
            if len(lp) != len(mask):
                raise ProtocolError(f"{where}: output token {j} has {len(lp)} support log-probs for {len(mask)} kept ids")
            lp = lp[mask.index(token)]
        if lp is None or not math.isfinite(lp) or lp > 1e-6:
            raise ProtocolError(f"{where}: output token {j} has sampling log-prob {lp}")
        out_lp.append(float(lp))
    return [list(m) for m in masks], out_lp


def encode_routed_experts(routed: np.ndarray) -> str:
    """[rows, num_layers, topk] as SGLang sends it: base64 of the raw int32 bytes."""
    return base64.b64encode(np.ascontiguousarray(routed, dtype="<i4").tobytes()).decode()


def decode_routed_experts(meta: dict[str, Any], rows: int, num_layers: int, topk: int, where: str) -> np.ndarray:
    """meta_info["routed_experts"] as [rows, num_layers, topk] int32 (its shape is not sent:
    `rows` = seqlen - 1 - routed_experts_start_len, the layers and top-k are the model's)."""
    value = meta.get(ROUTED_EXPERTS)
    if not isinstance(value, str):
        raise ProtocolError(f"{where}: meta_info has no {ROUTED_EXPERTS}")
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError as e:
        raise ProtocolError(f"{where}: {ROUTED_EXPERTS} is not base64: {e}") from None
    want = rows * num_layers * topk * 4
    if len(raw) != want:
        raise ProtocolError(
            f"{where}: {ROUTED_EXPERTS} holds {len(raw)} bytes; {rows} positions x {num_layers} layers x top-{topk} "
            f"int32 are {want} (is the server's model the student's?)"
        )
    return np.frombuffer(raw, dtype="<i4").reshape(rows, num_layers, topk).astype(np.int32)
