"""The SGLang wire protocol without a server: request builders, every response encoding, errors.

Responses are built here by hand from a known log-softmax table, independently of the server's
encoders, and the parsed signals are checked against the table at the positions the alignment
convention names (response token j of a sequence with prompt p is predicted at p - 1 + j).
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from megatron_opd.config import ConfigError, build
from megatron_opd.serving import wire as W
from megatron_opd.teachers import protocol as P
from megatron_opd.teachers.config import TeacherConfig, TeacherConfigError, check_teachers
from megatron_opd.serving.sglang_contract import load_contract

WHERE = "teacher 'math' at http://127.0.0.1:8001"
V = 11


def table(L: int, seed: int = 0) -> np.ndarray:
    """A known [L, V] log-softmax table: row t is the distribution predicted at position t."""
    z = np.random.default_rng(seed).normal(size=(L, V)) * 2
    return (z - np.log(np.exp(z).sum(-1, keepdims=True))).astype(np.float32)


def nested_response(tokens, s, lp, k=0, *, hidden=None, completion=0, finish=None):
    """An SGLang response to a scoring request, written out by hand (entry j <-> position s+j-1)."""
    L = len(tokens)
    meta = {
        "id": "x", "prompt_tokens": L, "completion_tokens": completion, "cached_tokens": 0,
        "finish_reason": finish or {"type": "length", "length": completion}, "weight_version": "w1",
    }  # fmt: skip
    if s is not None:
        meta["input_token_logprobs"] = [[None, tokens[s], None]] + [
            [float(lp[s + j - 1, tokens[s + j]]), tokens[s + j], None] for j in range(1, L - s)
        ]
        if k:
            rows = [None]
            for j in range(1, L - s):
                order = np.argsort(-lp[s + j - 1])[:k]
                rows.append([[float(lp[s + j - 1, i]), int(i), None] for i in order])
            meta["input_top_logprobs"] = rows
    if hidden is not None:
        meta["hidden_states"] = hidden
    return {"text": "", "output_ids": [], "meta_info": meta}


TOKENS = (1, 4, 2, 7, 7, 3, 9, 0, 5)  # L = 9
PROMPT = 4  # s = 3, R = 5


def expected_sampled(lp):
    return np.array([lp[PROMPT - 1 + j, TOKENS[PROMPT + j]] for j in range(len(TOKENS) - PROMPT)], np.float32)


# ---------------------------------------------------------------------------------------------
# Requests


@pytest.mark.parametrize("kind", ["hidden", "topk", "sampled", "logits"])
def test_score_request_fields(kind):
    items = [P.ScoreItem(TOKENS, PROMPT), P.ScoreItem(TOKENS[:7], PROMPT)]
    body = P.score_request(items, P.SignalSpec(kind=kind, topk=3 if kind == "topk" else 0, binary=True))
    assert body["input_ids"] == [list(TOKENS), list(TOKENS[:7])]
    if kind == "hidden":
        # max_new_tokens 0 would return no hidden states at all.
        assert body["sampling_params"]["max_new_tokens"] == 1 and body["return_hidden_states"] is True
        assert "logprob_start_len" not in body and body[W.KEY_BINARY_HIDDEN_DTYPE] == "float32"
    else:
        assert body["sampling_params"] == {"max_new_tokens": 0}
        assert body["return_logprob"] is True and body["logprob_start_len"] == PROMPT - 1  # a scalar, for the router
    assert body.get("top_logprobs_num") == (3 if kind == "topk" else None)
    assert body[W.KEY_BINARY] is True
    assert (W.KEY_FULL_LOGPROBS in body) == (kind == "logits")


def test_score_request_refuses_mixed_prompt_lengths_and_bad_k():
    with pytest.raises(ValueError, match=r"share one prompt length, got prompt lengths \[3, 4\]"):
        P.score_request([P.ScoreItem(TOKENS, 4), P.ScoreItem(TOKENS, 3)], P.SignalSpec("sampled"))
    with pytest.raises(ValueError, match="k >= 1"):
        P.score_request([P.ScoreItem(TOKENS, 4)], P.SignalSpec("topk", topk=0))


def test_requests_decode_with_sglang_contract():
    api = load_contract(fetch=True)
    items = [P.ScoreItem(TOKENS, PROMPT)]
    bodies = [P.score_request(items, P.SignalSpec(kind, topk=4 if kind == "topk" else 0, topk_format=f, binary=b))
              for kind in ("hidden", "topk", "sampled", "logits") for f in ("b64", "nested") for b in (False, True)]  # fmt: skip
    bodies.append(W.sample_request([[1, 2, 3]], max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, stop_token_ids=[2], sampling_seed=3))
    for body in bodies:
        req = api.GenerateRequest.from_json_value(json.loads(json.dumps(body)))
        assert req.input_ids == body["input_ids"]
    # The contract really rejects what our check rejects: a misspelled sampling parameter.
    bad = {"input_ids": [1], "sampling_params": {"max_new_token": 3}}
    with pytest.raises(api.JsonContractError, match="unknown field `max_new_token`"):
        api.GenerateRequest.from_json_value(bad)
    with pytest.raises(ValueError, match="did you mean 'max_new_tokens'"):
        W.check_sampling_params(bad["sampling_params"])


def test_weight_update_bodies_match_sglang_io_struct():
    """The rollout engine's weight-update bodies carry every field SGLang's request structs
    require and none they lack (read from the pinned wheel's io_struct.py)."""
    import torch

    from megatron_opd.rollout.sglang import update_body_for
    from megatron_opd.serving.sglang_contract import request_fields

    load_contract(fetch=True)  # makes sure the wheel is there
    tensors = {"model.embed_tokens.weight": torch.zeros(3, 2), "lm_head.weight": torch.zeros(3, 2, dtype=torch.bfloat16)}
    cases = {
        "UpdateWeightFromDiskReqInput": [W.disk_update_body("/ckpt", "3")],
        "InitWeightsUpdateGroupReqInput": W.init_group_bodies(2, 4, "node1", 29500, "g", "nccl"),
        "UpdateWeightsFromDistributedReqInput": [update_body_for(tensors, "g", "3")],
    }
    for struct, bodies in cases.items():
        fields = request_fields(struct)
        for body in bodies:
            assert set(body) <= set(fields), (struct, set(body) - set(fields))
            assert {f for f, required in fields.items() if required} <= set(body), struct
    ranks = [(b["rank_offset"], b["world_size"]) for b in cases["InitWeightsUpdateGroupReqInput"]]
    assert ranks == [(1, 9), (5, 9)]  # trainer rank 0, then 4 ranks per server
    body = cases["UpdateWeightsFromDistributedReqInput"][0]
    assert body["dtypes"] == ["float32", "bfloat16"]  # SGLang does getattr(torch, dtype)
    assert body["shapes"] == [[3, 2], [3, 2]]


# ---------------------------------------------------------------------------------------------
# Responses


def parse(resp, kind, k=0, items=None):
    items = items or [P.ScoreItem(TOKENS, PROMPT)]
    return P.parse_score_response(resp if isinstance(resp, list) else [resp], items, P.SignalSpec(kind, topk=k), WHERE, vocab_size=V)


def test_sampled_and_nested_topk_line_up_with_response_tokens():
    lp = table(len(TOKENS))
    (sig,) = parse(nested_response(TOKENS, PROMPT - 1, lp), "sampled")
    np.testing.assert_allclose(sig.sampled_logprobs, expected_sampled(lp), rtol=0, atol=1e-6)
    assert sig.weight_version == "w1"
    (sig,) = parse(nested_response(TOKENS, PROMPT - 1, lp, k=4), "topk", 4)
    assert sig.topk_ids.shape == (5, 4)
    for j in range(5):
        row = lp[PROMPT - 1 + j]
        np.testing.assert_array_equal(sig.topk_ids[j], np.argsort(-row)[:4])
        np.testing.assert_allclose(sig.topk_logprobs[j], np.sort(row)[::-1][:4], atol=1e-6)


@pytest.mark.parametrize("b64", [False, True])
def test_flat_topk_equals_nested(b64):
    lp = table(len(TOKENS), seed=1)
    nested = nested_response(TOKENS, PROMPT - 1, lp, k=3)
    rows = nested["meta_info"].pop("input_top_logprobs")[1:]
    vals = np.array([[e[0] for e in r] for r in rows], "<f4")
    ids = np.array([[e[1] for e in r] for r in rows], "<i4")
    meta = nested["meta_info"]
    meta["input_top_logprobs_shape"] = [len(rows), 3]
    meta["input_top_logprobs_null_prefix"] = 1
    if b64:
        meta["input_top_logprobs_val_flat_b64"] = base64.b64encode(vals.tobytes()).decode()
        meta["input_top_logprobs_idx_flat_b64"] = base64.b64encode(ids.tobytes()).decode()
        meta["input_top_logprobs_val_flat_b64_dtype"] = "float32"
        meta["input_top_logprobs_idx_flat_b64_dtype"] = "int32"
    else:
        meta["input_top_logprobs_val_flat"] = vals.reshape(-1).tolist()
        meta["input_top_logprobs_idx_flat"] = ids.reshape(-1).tolist()
    (flat,) = parse(nested, "topk", 3)
    (ref,) = parse(nested_response(TOKENS, PROMPT - 1, lp, k=3), "topk", 3)
    np.testing.assert_array_equal(flat.topk_ids, ref.topk_ids)
    np.testing.assert_allclose(flat.topk_logprobs, ref.topk_logprobs, atol=1e-6)
    meta["input_top_logprobs_null_prefix"] = 2  # the block would sit one position late
    with pytest.raises(W.ProtocolError, match=r"covering 2 \+ 5 positions with k=3; expected 6 positions"):
        parse(nested, "topk", 3)


def test_hidden_states_in_both_shapes():
    L, d = len(TOKENS), 5
    states = np.random.default_rng(2).normal(size=(L, d)).astype(np.float32)
    want = states[PROMPT - 1 : L - 1]  # the positions that predict the response tokens
    decoded_row = [9.0] * d
    # SGLang's source shape with max_new_tokens=1: one 2-D prefill block (finished_len cuts decode rows).
    (sig,) = parse(nested_response(TOKENS, None, None, hidden=[states.tolist()], completion=1), "hidden")
    np.testing.assert_array_equal(sig.hidden, want)
    # The contract's shape: 1-D rows, prefill positions then one per decode step that was fed back.
    rows = states.tolist() + [decoded_row]
    (sig,) = parse(nested_response(TOKENS, None, None, hidden=rows, completion=2), "hidden")
    np.testing.assert_array_equal(sig.hidden, want)
    # A prefix-cache hit drops the cached positions: refuse rather than shift the rows.
    with pytest.raises(W.ProtocolError, match=r"block of 7 prefill positions for a sequence of 9 tokens.*--disable-radix-cache"):
        parse(nested_response(TOKENS, None, None, hidden=[states[2:].tolist()], completion=1), "hidden")
    with pytest.raises(W.ProtocolError, match=r"returned 8 hidden-state rows for a sequence of 9 tokens with 1 generated .* expected 9"):
        parse(nested_response(TOKENS, None, None, hidden=states[1:].tolist(), completion=1), "hidden")
    with pytest.raises(W.ProtocolError, match="returned no hidden_states: the server needs --enable-return-hidden-states"):
        parse(nested_response(TOKENS, None, None, hidden=[], completion=1), "hidden")


def test_binary_form_roundtrip_and_truncation():
    hidden = np.arange(24, dtype=np.float16).reshape(4, 6)
    lps = np.array([np.nan, -1.5, -0.25], np.float32)
    responses = [{"text": "", "output_ids": [3], "meta_info": {"prompt_tokens": 4, W.A_HIDDEN: hidden, W.A_TOKEN_LP: lps}},
                 {"text": "b", "output_ids": [], "meta_info": {"prompt_tokens": 2}}]  # fmt: skip
    blob = W.encode_binary(responses)
    assert blob.startswith(W.BINARY_MAGIC)
    back = W.decode_response_body(blob, W.BINARY_CONTENT_TYPE + "; charset=binary", WHERE)
    assert back[0]["output_ids"] == [3] and back[1]["text"] == "b"
    assert back[0]["meta_info"][W.A_HIDDEN].dtype == np.float16
    np.testing.assert_array_equal(back[0]["meta_info"][W.A_HIDDEN], hidden)
    np.testing.assert_array_equal(back[0]["meta_info"][W.A_TOKEN_LP], lps)  # NaN stays NaN
    with pytest.raises(W.ProtocolError, match=r"truncated: array 'opd\.\w+.*' of item 0 needs bytes"):
        W.decode_binary(blob[:-9], WHERE)
    with pytest.raises(W.ProtocolError, match="does not start with"):
        W.decode_binary(b"{" + blob[1:], WHERE)


# ---------------------------------------------------------------------------------------------
# Loud failures


def test_short_input_logprobs_name_teacher_url_and_numbers():
    lp = table(len(TOKENS))
    resp = nested_response(TOKENS, PROMPT - 1, lp)
    resp["meta_info"]["input_token_logprobs"].pop()
    with pytest.raises(W.ProtocolError) as e:
        parse(resp, "sampled")
    assert str(e.value) == (
        "teacher 'math' at http://127.0.0.1:8001 returned 5 input_token_logprobs for a sequence of 9 tokens "
        "with logprob_start_len 3; expected 6"
    )


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r["meta_info"].update(prompt_tokens=8), r"reports prompt_tokens=8 for a sequence of 9 tokens"),
        (lambda r: r["meta_info"]["input_token_logprobs"][2].__setitem__(1, 8), r"input_token_logprobs\[2\] is for token 8, but position 5 holds token 3"),
        (lambda r: r["meta_info"]["input_token_logprobs"][0].__setitem__(0, -1.0), r"input_token_logprobs\[0\] is -1.0, expected null"),
        (lambda r: r["meta_info"].update(finish_reason={"type": "abort", "message": "out of memory", "status_code": 500}), r"aborted the request: 'out of memory'"),
        (lambda r: r["meta_info"].update(finish_reason=None), r"without finish_reason"),
        (lambda r: r["meta_info"].pop("input_token_logprobs"), r"returned no input_token_logprobs"),
        (lambda r: r["meta_info"]["input_token_logprobs"].__setitem__(1, [0.5]), r"malformed input_token_logprobs"),
        (lambda r: r["meta_info"]["input_token_logprobs"][1].__setitem__(0, 0.7), r"not finite log-probabilities"),
        (lambda r: r.pop("meta_info"), r"without meta_info"),
    ],
)  # fmt: skip
def test_malformed_responses_fail_loudly(mutate, message):
    resp = nested_response(TOKENS, PROMPT - 1, table(len(TOKENS)))
    mutate(resp)
    with pytest.raises(W.ProtocolError, match=message) as e:
        parse(resp, "sampled")
    assert str(e.value).startswith(WHERE)


@pytest.mark.parametrize("kind", ["hidden", "logits", "sampled", "topk"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_signals_are_refused_naming_teacher_url_and_sample(kind, bad):
    L, R = len(TOKENS), len(TOKENS) - PROMPT
    lp = table(L, seed=4)
    if kind == "hidden":
        states = np.random.default_rng(5).normal(size=(L, 6))
        states[PROMPT - 1 + 2, 3] = bad  # the state that predicts response token 2
        resp = nested_response(TOKENS, None, None, hidden=[states.tolist()], completion=1)
    else:
        resp = nested_response(TOKENS, PROMPT - 1, lp, k=3 if kind == "topk" else 0)
        meta = resp["meta_info"]
        if kind == "logits":
            rows = lp[PROMPT - 1 : L - 1].astype(np.float64)
            rows[2, 5] = bad
            meta[W.FULL_LOGPROBS] = [None] + rows.tolist()
        elif kind == "sampled":
            meta["input_token_logprobs"][3][0] = bad  # entry 3 belongs to response token 2
        else:
            meta["input_top_logprobs"][3][1][0] = bad
    item = P.ScoreItem(TOKENS, PROMPT, sample_id="add/7")
    with pytest.raises(W.ProtocolError) as e:
        P.parse_score_response([resp], [item], P.SignalSpec(kind, topk=3 if kind == "topk" else 0), WHERE, vocab_size=V)
    text = str(e.value)
    assert text.startswith(f"{WHERE} (sample 'add/7') returned non-finite") and "first at response position 2" in text
    assert R == 5


def test_topk_checks_order_count_and_ids():
    lp = table(len(TOKENS))
    resp = nested_response(TOKENS, PROMPT - 1, lp, k=3)
    rows = resp["meta_info"]["input_top_logprobs"]
    rows[2] = rows[2][::-1]
    with pytest.raises(W.ProtocolError, match="not sorted in descending order"):
        parse(resp, "topk", 3)
    resp = nested_response(TOKENS, PROMPT - 1, lp, k=3)
    resp["meta_info"]["input_top_logprobs"][3].pop()
    with pytest.raises(W.ProtocolError, match=r"returned 2 top logprobs at input position 3; expected k=3"):
        parse(resp, "topk", 3)
    resp = nested_response(TOKENS, PROMPT - 1, lp, k=3)
    resp["meta_info"]["input_top_logprobs"][1][0][1] = V + 4
    with pytest.raises(W.ProtocolError, match=rf"top-k token ids outside \[0, {V}\)"):
        parse(resp, "topk", 3)


def test_batch_count_and_bodies():
    lp = table(len(TOKENS))
    items = [P.ScoreItem(TOKENS, PROMPT)] * 2
    with pytest.raises(W.ProtocolError, match="returned 1 responses for a batch of 2 sequences"):
        parse([nested_response(TOKENS, PROMPT - 1, lp)], "sampled", items=items)
    with pytest.raises(W.ProtocolError, match="body that is not JSON"):
        W.decode_response_body(b'[{"text": "", "meta', "application/json", WHERE)


def test_error_message_reads_every_error_shape():
    assert W.error_message(b'{"error": "unknown field `x`, expected one of `a`"}') == "unknown field `x`, expected one of `a`"
    assert W.error_message(b'{"error": {"message": "too long"}}') == "too long"
    assert W.error_message(b'{"object": "error", "message": "bad", "type": "Bad Request", "code": 400}') == "bad"
    assert W.error_message(b"Failed to deserialize the JSON body") == "Failed to deserialize the JSON body"


# ---------------------------------------------------------------------------------------------
# Config


def test_teacher_config_checks():
    ok = TeacherConfig(endpoints=["http://127.0.0.1:1"], domains=["add"], signal="topk", topk=8)
    assert check_teachers({"math": ok, "text": TeacherConfig(endpoints=["http://h:2"], domains=["reverse"])}) == {
        "add": "math", "reverse": "text"
    }  # fmt: skip
    with pytest.raises(TeacherConfigError, match="domain 'add' is claimed by teachers 'math' and 'dup'"):
        check_teachers({"math": ok, "dup": TeacherConfig(endpoints=["http://h:2"], domains=["add"])})
    with pytest.raises(TeacherConfigError, match=r"teachers.m.signal is 'topk' but teachers.m.topk=0"):
        TeacherConfig(endpoints=["http://h:1"], domains=["a"], signal="topk").check("m")
    with pytest.raises(TeacherConfigError, match="not an http"):
        TeacherConfig(endpoints=["h:1"], domains=["a"]).check("m")
    # The job's typed config builder accepts the section and names a misspelled key.
    cfg = build(TeacherConfig, {"endpoints": ["http://h:1"], "domains": ["a"], "signal": "sampled", "timeout_s": 5})
    assert cfg.signal == "sampled" and cfg.timeout_s == 5.0
    with pytest.raises(ConfigError, match="did you mean 'topk'"):
        build(TeacherConfig, {"endpoints": ["http://h:1"], "top_k": 3})
