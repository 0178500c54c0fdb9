"""The teacher service end to end: embedded servers as real subprocesses over real HTTP on loopback.

One module-scoped set of servers, all loading a megatron checkpoint written here:
- `main`: our server with an API key (binary form, extensions);
- `a`, `b`: the same checkpoint with --plain-sglang (stand-ins for stock SGLang replicas), used
  for the stock-server pool checks and the router test (which kills b), then the direct failover
  test (replicas a and main; it kills a). So those two tests run last, in this order.
The reference for every number is the same model, loaded in this process and run directly.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_opd.data.tokenizer import CharTokenizer
from megatron_opd.data.trajectories import Trajectories
from megatron_opd.models.config import ModelConfig
from megatron_opd.serving import wire as W
from megatron_opd.serving.client import ClientSettings, RequestRefused, SGLangClient, ServerUnavailable
from megatron_opd.serving.launch import start_router, start_teacher_server, stop_all, wait_ready
from megatron_opd.serving.sglang_contract import load_contract
from megatron_opd.teachers import protocol as P
from megatron_opd.teachers.config import TeacherConfig
from megatron_opd.teachers.pool import RoutingError, TeacherIncompatible, TeacherPool, client_for, request_batches, score_items

KEY = "s3cret"
# Clients read the key from the environment (teachers.<name>.api_key_env), never from a config value.
KEY_ENV = "MEGATRON_OPD_TEST_TEACHER_KEY"
os.environ[KEY_ENV] = KEY
TOK = CharTokenizer()
V = TOK.vocab_size
MODEL = ModelConfig(vocab_size=V, hidden_size=32, num_layers=2, num_attention_heads=4, max_seq_len=64, init_std=0.2)


# ---------------------------------------------------------------------------------------------
# Fixtures


class Reference:
    """The teacher model run directly in this process: log-softmax and final hidden states."""

    def __init__(self, model):
        self.model = model
        self._h = {}
        model.output_layer.register_forward_pre_hook(lambda _m, a: self._h.__setitem__("h", a[0]))

    def __call__(self, tokens) -> tuple[np.ndarray, np.ndarray]:
        ids = torch.tensor([list(tokens)])
        with torch.no_grad():
            logits = self.model(ids, torch.arange(ids.shape[1])[None], None)[0, :, :V].double()
        return torch.log_softmax(logits, -1).numpy(), self._h["h"][:, 0].double().numpy()

    @property
    def head(self) -> np.ndarray:
        return self.model.shared_embedding_or_output_weight().detach()[:V].double().numpy()


@dataclass
class World:
    dir_a: Path
    dir_b: Path
    ref_a: Reference
    ref_b: Reference


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from megatron_opd.models.hf.manifest import write_manifest
    from megatron_opd.models.gpt import build_gpt_model
    from megatron_opd.models.model_dir import write_model_dir
    from megatron_opd.runtime.checkpoint import save_checkpoint
    from megatron_opd.runtime.distributed import init_runtime, seed_everything
    from megatron_opd.runtime.layout import ParallelLayout

    init_runtime(ParallelLayout(), seed=11)
    root = tmp_path_factory.mktemp("teachers")
    refs = []
    for name, seed in (("teacher_a", 11), ("teacher_b", 12)):
        seed_everything(seed)
        mdir = write_model_dir(root / name, MODEL, TOK)
        model = build_gpt_model(MODEL, ParallelLayout()).eval()
        write_manifest(save_checkpoint(mdir.checkpoints, 1, [model]), "test")  # servers load only checked files
        refs.append(Reference(model))
    return World(root / "teacher_a", root / "teacher_b", *refs)


@pytest.fixture(scope="module")
def servers(world):
    handles = {"main": start_teacher_server(model_dir=world.dir_a, api_key=KEY, weights_dir=world.dir_a.parent, weight_groups=True, wait=False)}
    for name in ("a", "b"):
        handles[name] = start_teacher_server(model_dir=world.dir_a, extra_args=["--plain-sglang"], wait=False)
    wait_ready(list(handles.values()))
    yield handles
    stop_all(list(handles.values()))


def http(method: str, url: str, body=None, key: str | None = KEY) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def teacher(url, signal="sampled", **kw) -> TeacherConfig:
    kw.setdefault("api_key_env", KEY_ENV)
    return TeacherConfig(endpoints=[url] if isinstance(url, str) else list(url), domains=["add"], signal=signal, **kw)


def sequences(n: int, seed: int = 0) -> list[P.ScoreItem]:
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        p = int(rng.integers(2, 7))
        L = p + int(rng.integers(1, 12))
        items.append(P.ScoreItem(tuple(int(t) for t in rng.integers(3, V, L)), p))
    return items


def run_client(cfg: TeacherConfig, items, **kw):
    async def go():
        async with client_for("math", cfg, **kw) as client:
            await client.start()
            return await score_items(client, cfg, items, vocab_size=V), client

    return asyncio.run(go())


def plain_client(url: str, **kw) -> SGLangClient:
    return SGLangClient("teacher 'math'", ClientSettings(endpoints=(url,), api_key=KEY), **kw)


# ---------------------------------------------------------------------------------------------
# Server endpoints


def test_health_model_info_auth_and_flush(servers):
    url = servers["main"].url
    assert http("GET", url + "/health", key=None)[0] == 200  # health is open, as in SGLang
    assert http("GET", url + "/health_generate", key=None)[0] == 200
    status, body = http("GET", url + "/model_info", key=None)
    assert (status, json.loads(body)) == (401, {"error": "Unauthorized"})
    assert http("POST", url + "/generate", {"input_ids": [1]}, key="wrong")[0] == 401
    status, body = http("GET", url + "/model_info")
    info = json.loads(body)
    assert status == 200 and info["vocab_size"] == V and info["tokenizer_fingerprint"] == TOK.fingerprint
    assert info["weight_version"] == "default" and info["opd_server"]["binary_signal"] == 1
    assert info["model_path"].endswith("step_00000001") and info["hidden_size"] == MODEL.hidden_size
    status, body = http("POST", url + "/flush_cache")
    assert status == 200 and body.startswith(b"Cache flushed.")
    plain = json.loads(http("GET", servers["a"].url + "/model_info", key=None)[1])
    assert "vocab_size" not in plain and "opd_server" not in plain and plain["is_generation"] is True


def test_scoring_semantics_against_the_model(servers, world):
    """Entry 0 null, L - s entries, top-k sorted and complete, logprobs equal log_softmax."""
    seqs = [[5, 9, 14, 3, 22, 8, 30, 7, 11], [4, 4, 17, 40, 12]]  # one request, right-padded batch
    s = 2
    status, body = http("POST", servers["main"].url + "/generate", {
        "input_ids": seqs, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
        "logprob_start_len": s, "top_logprobs_num": V})  # fmt: skip
    assert status == 200
    responses = json.loads(body)
    assert len(responses) == 2
    for seq, resp in zip(seqs, responses):
        meta, L = resp["meta_info"], len(seq)
        lp, _ = world.ref_a(seq)
        tok, top = meta["input_token_logprobs"], meta["input_top_logprobs"]
        assert meta["prompt_tokens"] == L and len(tok) + s == L and len(top) == L - s
        assert tok[0] == [None, seq[s], None] and top[0] is None
        assert meta["finish_reason"] == {"type": "length", "length": 0} and meta["completion_tokens"] == 0
        for j in range(1, L - s):
            assert tok[j][1] == seq[s + j]
            assert abs(tok[j][0] - lp[s + j - 1, seq[s + j]]) < 1e-5
            vals = np.array([e[0] for e in top[j]])
            ids = np.array([e[1] for e in top[j]])
            assert len(vals) == V and sorted(ids.tolist()) == list(range(V))
            assert np.all(np.diff(vals) <= 0)
            assert abs(np.exp(vals).sum() - 1) < 1e-4
            np.testing.assert_allclose(vals, lp[s + j - 1, ids], atol=1e-5)


@pytest.mark.parametrize("wire", ["auto", "json"])
@pytest.mark.parametrize("signal, extra", [
    ("sampled", {}), ("topk", {"topk": 5, "topk_format": "nested"}), ("topk", {"topk": 5, "topk_format": "b64"}),
    ("topk", {"topk": 5, "topk_format": "flat"}), ("hidden", {}), ("hidden", {"hidden_dtype": "float16"}), ("logits", {}),
])  # fmt: skip
def test_client_signals_equal_the_model(servers, world, wire, signal, extra):
    items = sequences(7, seed=3)
    sigs, client = run_client(teacher(servers["main"].url, signal, wire=wire, batch_size=2, **extra), items, trace=True)
    binary = {e.content_type == W.BINARY_CONTENT_TYPE for e in client.trace}
    assert binary == {wire == "auto"}
    assert len(client.trace) == len(request_batches(items, 2)) > 1  # batched per prompt length
    head = world.ref_a.head
    for item, sig in zip(items, sigs):
        lp, hidden = world.ref_a(item.tokens)
        p, L, R = item.prompt_len, item.length, item.response_len
        rows = lp[p - 1 : L - 1]  # positions predicting response tokens 0 .. R-1
        if signal == "sampled":
            np.testing.assert_allclose(sig.sampled_logprobs, rows[np.arange(R), list(item.tokens[p:])], atol=1e-5)
        elif signal == "topk":
            np.testing.assert_array_equal(sig.topk_ids, np.argsort(-rows, axis=1, kind="stable")[:, :5])
            np.testing.assert_allclose(sig.topk_logprobs, -np.sort(-rows, axis=1)[:, :5], atol=1e-5)
        elif signal == "hidden":
            fp16 = extra.get("hidden_dtype") == "float16" and wire == "auto"
            assert sig.hidden.dtype == (np.float16 if fp16 else np.float32) and sig.hidden.shape == (R, MODEL.hidden_size)
            np.testing.assert_allclose(sig.hidden, hidden[p - 1 : L - 1], atol=2e-2 if fp16 else 1e-5)
            # The trainer's job, done here: the teacher's own head on the states gives its log-softmax.
            z = sig.hidden.astype(np.float64) @ head.T
            rebuilt = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
            np.testing.assert_allclose(rebuilt, rows, atol=5e-2 if fp16 else 1e-4)
        else:
            np.testing.assert_allclose(sig.logits, rows, atol=1e-5)


def test_every_request_and_response_decodes_with_sglang_contract(servers):
    api = load_contract(fetch=True)
    items = sequences(3, seed=5)
    traces = []
    for signal, extra in (("sampled", {}), ("topk", {"topk": 4, "topk_format": "b64"}), ("topk", {"topk": 4, "topk_format": "nested"}),
                          ("hidden", {}), ("logits", {})):  # fmt: skip
        for wire in ("auto", "json"):
            _, client = run_client(teacher(servers["main"].url, signal, wire=wire, **extra), items, trace=True)
            traces += client.trace

    async def sampling():
        async with plain_client(servers["main"].url, trace=True) as client:
            await client.generate(W.sample_request([[3, 4, 5], [6, 7]], max_new_tokens=4, temperature=0.8, top_k=10, sampling_seed=1))
            body = W.sample_request([[3, 4, 5]], max_new_tokens=3, temperature=0.0)
            await client.generate(dict(body, top_logprobs_num=3, return_hidden_states=True, logprob_start_len=0, return_text_in_logprobs=True))
            await client.generate({"input_ids": [3, 4, 5], "sampling_params": {"max_new_tokens": 2}})  # a single, not a batch
            return client.trace

    traces += asyncio.run(sampling())
    assert len(traces) > 12
    for entry in traces:
        api.GenerateRequest.from_json_value(entry.request)
        assert entry.status == 200
        if entry.content_type == W.BINARY_CONTENT_TYPE:
            responses = W.decode_binary(entry.body)  # arrays in meta_info aside, the rest is SGLang's shape
            for r in responses:
                r["meta_info"] = {k: v for k, v in r["meta_info"].items() if not isinstance(v, np.ndarray)}
        else:
            responses = json.loads(entry.body)
        for r in responses if isinstance(responses, list) else [responses]:
            decoded = api.GenerateResponse.from_json_value(r)
            assert decoded.meta_info.prompt_tokens == r["meta_info"]["prompt_tokens"]
            assert decoded.meta_info.finish_reason is not None
    info = json.loads(http("GET", servers["main"].url + "/model_info")[1])
    assert api.GetModelInfoResponse.from_json_value(info).weight_version == info["weight_version"]
    status, body = http("POST", servers["main"].url + "/generate", {"input_ids": [1], "logprob_start_len": 3, "return_logprob": True})
    assert status == 400 and api.ErrorBody.from_json_value(json.loads(body)["error"]).message.startswith("logprob_start_len=3")


def test_sampling_greedy_seeded_and_stops(servers, world):
    url = servers["main"].url + "/generate"
    prompt = [5, 9, 14, 3]

    def gen(**sp):
        body = {"input_ids": prompt, "sampling_params": dict(max_new_tokens=6, ignore_eos=True, **sp), "return_logprob": True}
        status, raw = http("POST", url, body)
        assert status == 200, raw
        return json.loads(raw)

    # Greedy equals the argmax chain of the model itself, with its log-probabilities.
    chain, want_lp = list(prompt), []
    for _ in range(6):
        lp, _ = world.ref_a(chain)
        want_lp.append(lp[-1].max())
        chain.append(int(lp[-1].argmax()))
    out = gen(temperature=0.0)
    assert out["output_ids"] == chain[len(prompt) :]
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
    np.testing.assert_allclose([e[0] for e in out["meta_info"]["output_token_logprobs"]], want_lp, atol=1e-5)
    # A seed makes sampling reproducible; output logprobs are of the temperature-scaled distribution.
    first, again = gen(temperature=0.5, sampling_seed=7), gen(temperature=0.5, sampling_seed=7)
    assert first["output_ids"] == again["output_ids"]
    assert len({tuple(gen(temperature=1.0, sampling_seed=s)["output_ids"]) for s in range(4)}) > 1
    seq = list(prompt)
    for token, entry in zip(first["output_ids"], first["meta_info"]["output_token_logprobs"]):
        logits = world.ref_a(seq)[0][-1]  # log_softmax is shift-invariant: usable as logits
        scaled = logits / 0.5 - np.log(np.exp(logits / 0.5).sum())
        assert entry[1] == token and abs(entry[0] - scaled[token]) < 1e-4
        seq.append(token)
    # The server samples with the one sampler (rollout/sampler.py): the same draws as this
    # process makes with the same seed on the same distribution, top-k/top-p/min-p included.
    from megatron_opd.rollout.config import SamplingParams
    from megatron_opd.rollout.sampler import sample

    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.9, min_p=0.05)
    out = gen(temperature=0.8, top_k=6, top_p=0.9, min_p=0.05, sampling_seed=11)
    seq, rng = list(prompt), torch.Generator().manual_seed(11)
    for _ in range(6):
        seq.append(int(sample(torch.from_numpy(world.ref_a(seq)[0][-1]).float()[None], params, rng).tokens[0]))
    assert out["output_ids"] == seq[len(prompt) :]
    # stop_token_ids end generation at the first occurrence, finish_reason names it.
    stop = chain[len(prompt) + 2]
    out = gen(temperature=0.0, stop_token_ids=[stop])
    first_hit = chain[len(prompt) :].index(stop)
    assert out["output_ids"] == chain[len(prompt) : len(prompt) + first_hit + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    # Hidden states while sampling: the prefill rows, then one per decode step fed back.
    status, raw = http("POST", url, {"input_ids": prompt, "sampling_params": {"max_new_tokens": 3, "temperature": 0.0, "ignore_eos": True},
                                     "return_hidden_states": True})  # fmt: skip
    hs = json.loads(raw)["meta_info"]["hidden_states"]
    assert len(hs) == len(prompt) + 2
    np.testing.assert_allclose(np.array(hs), world.ref_a(chain[: len(prompt) + 2])[1], atol=1e-5)


@pytest.mark.parametrize("body, status, shape, text", [
    ({"input_ids": [1, 2], "sampling_params": {"max_new_token": 3}}, 400, "contract", "unknown field `max_new_token`"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": "3"}}, 400, "contract", "invalid type"),
    ({"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 5}, 400, "message", "logprob_start_len=5 is outside [0, 2]"),
    ({"input_ids": [1, V + 3]}, 400, "message", f"token id {V + 3} is outside the vocabulary [0, {V})"),
    ({"input_ids": [1] * 65}, 400, "message", "longer than the model's context length (64 tokens)"),
    ({"input_ids": [1], "stream": True}, 400, "message", "stream=true is not supported"),
    ({"input_ids": [1], "return_logprob": True, "top_logprobs_num": V + 1}, 400, "message", f"top_logprobs_num={V + 1} is outside"),
    ({"input_ids": [1], "return_flat_raw_top_logprobs_b64": True}, 400, "message", "return_flat_raw_top_logprobs_b64 requires"),
    ({"text": "1+1="}, 200, None, None),
])  # fmt: skip
def test_error_bodies_are_sglangs(servers, body, status, shape, text):
    got, raw = http("POST", servers["main"].url + "/generate", body)
    assert got == status, raw
    if shape == "contract":  # SGLang's /generate contract check: {"error": "<text>"}
        assert isinstance(json.loads(raw)["error"], str) and text in json.loads(raw)["error"]
    elif shape == "message":  # SGLang's runtime errors: {"error": {"message": ...}}
        assert text in json.loads(raw)["error"]["message"]


def test_client_refuses_bad_requests_and_reports_server_errors(servers):
    async def go():
        async with plain_client(servers["main"].url) as client:
            with pytest.raises(ValueError, match="did you mean 'max_new_tokens'"):
                await client.generate({"input_ids": [1], "sampling_params": {"max_new_token": 1}})
            with pytest.raises(RequestRefused) as e:
                await client.generate({"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 9})
            assert client.stats.attempts == 1  # a refusal is not retried
            return str(e.value)

    text = asyncio.run(go())
    assert text.startswith(f"teacher 'math' at {servers['main'].url} refused /generate with HTTP 400: logprob_start_len=9")


def test_short_and_malformed_responses_give_clear_errors():
    """A fake teacher that answers 200 with wrong content, or cuts its body short."""
    from aiohttp import web

    item = P.ScoreItem((5, 6, 7, 8, 9), 2)
    good = {"text": "", "output_ids": [], "meta_info": {"prompt_tokens": 5, "finish_reason": {"type": "length", "length": 0},
            "input_token_logprobs": [[None, 6, None], [-1.0, 7, None], [-1.0, 8, None], [-1.0, 9, None]]}}  # fmt: skip
    modes = {"short": lambda: [dict(good, meta_info=dict(good["meta_info"], input_token_logprobs=good["meta_info"]["input_token_logprobs"][:3]))],
             "missing": lambda: [], "good": lambda: [good]}  # fmt: skip
    hits = {"truncated": 0}

    async def handler(request):
        mode = request.match_info["mode"]
        if mode == "truncated":  # promise more bytes than are sent, then drop the connection
            hits["truncated"] += 1
            resp = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "5000"})
            await resp.prepare(request)
            await resp.write(b'[{"text": "", "meta_info": {')
            request.transport.close()
            return resp
        return web.json_response(modes[mode]())

    async def go():
        app = web.Application()
        app.router.add_post("/{mode}/generate", handler)
        app.router.add_get("/{mode}/model_info", lambda r: web.json_response({"model_path": "fake"}))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        errors = {}
        try:
            for mode in ("short", "missing", "truncated", "good"):
                cfg = teacher(f"{base}/{mode}", max_retries=2, retry_backoff_s=0.01)
                async with client_for("fake", cfg) as client:
                    try:
                        await client.start()
                        errors[mode] = await score_items(client, cfg, [item])
                    except Exception as e:  # noqa: BLE001 - the test inspects it
                        errors[mode] = e
        finally:
            await runner.cleanup()
        return base, errors

    base, errors = asyncio.run(go())
    assert isinstance(errors["short"], W.ProtocolError) and str(errors["short"]) == (
        f"teacher 'fake' at {base}/short returned 3 input_token_logprobs for a sequence of 5 tokens with logprob_start_len 1; expected 4"
    )
    assert str(errors["missing"]) == f"teacher 'fake' at {base}/missing returned 0 responses for a batch of 1 sequences"
    assert isinstance(errors["truncated"], ServerUnavailable) and hits["truncated"] == 3  # 1 + max_retries
    assert "ClientPayloadError" in str(errors["truncated"]) or "ServerDisconnected" in str(errors["truncated"])
    np.testing.assert_allclose(errors["good"][0].sampled_logprobs, [-1.0, -1.0, -1.0])


def test_pool_refuses_nan_hidden_states_naming_teacher_url_and_sample():
    """A teacher that answers 200 with NaN hidden states for some sequences (a broken model): the
    pool raises instead of handing NaN to the loss."""
    from aiohttp import web

    from megatron_opd.serving.app import HttpThread

    d = 6

    async def generate(request):
        body = await request.json()
        out = []
        for seq in body["input_ids"]:
            value = float("nan") if 13 in seq else 0.5
            out.append({"text": "", "output_ids": [1], "meta_info": {
                "prompt_tokens": len(seq), "completion_tokens": 1, "cached_tokens": 0, "weight_version": "w",
                "finish_reason": {"type": "length", "length": 1}, "hidden_states": [[value] * d for _ in seq]}})  # fmt: skip
        return web.Response(text=json.dumps(out), content_type="application/json")

    info = {"model_path": "fake", W.INFO_VOCAB_SIZE: V, W.INFO_FINGERPRINT: TOK.fingerprint, W.INFO_HIDDEN_SIZE: d}
    app = web.Application()
    app.router.add_post("/generate", generate)
    app.router.add_get("/model_info", lambda r: web.json_response(info))
    fake = HttpThread(app, "127.0.0.1", 0)
    fake.start()
    fake.ready.wait()
    url = f"http://127.0.0.1:{fake.port}"
    try:
        cfg = TeacherConfig(endpoints=[url], domains=["add"], signal="hidden", batch_size=4)
        with TeacherPool({"math": cfg}, student_vocab_size=V, student_fingerprint=TOK.fingerprint) as pool:
            pool.start_sync()
            good = [P.ScoreItem((3, 4, 5, 6, 7), 2), P.ScoreItem((3, 4, 5, 8), 2)]
            assert all(torch.isfinite(s.hidden).all() for s in pool.score(batch(good, ["add", "add"])))
            traj = batch(good + [P.ScoreItem((3, 4, 13, 6, 7), 2)], ["add"] * 3)
            with pytest.raises(W.ProtocolError) as e:
                pool.score(traj)
    finally:
        fake.stop()
    text = str(e.value)
    assert text.startswith(f"teacher 'math' at {url} (batch item 2, sample 'add/2') returned non-finite hidden states"), text


# ---------------------------------------------------------------------------------------------
# TeacherPool


def batch(items: list[P.ScoreItem], domains: list[str]) -> Trajectories:
    width = max(it.length for it in items)
    tokens = torch.zeros(len(items), width, dtype=torch.long)
    for i, it in enumerate(items):
        tokens[i, : it.length] = torch.tensor(it.tokens)
    return Trajectories(
        tokens=tokens,
        lengths=torch.tensor([it.length for it in items]),
        prompt_lens=torch.tensor([it.prompt_len for it in items]),
        domain=domains,
        sample_ids=[f"{d}/{i}" for i, d in enumerate(domains)],
    )


def test_pool_routes_by_domain_and_aligns_signals(servers, world):
    url = servers["main"].url
    pool = TeacherPool(
        {"math": TeacherConfig(endpoints=[url], domains=["add", "sort"], signal="topk", topk=3, api_key_env=KEY_ENV),
         "text": TeacherConfig(endpoints=[url], domains=["reverse"], signal="hidden", api_key_env=KEY_ENV, model_dir=str(world.dir_a))},
        student_vocab_size=V, student_fingerprint=TOK.fingerprint,
    )  # fmt: skip
    from megatron_opd.teachers.scorer import Scorer

    assert isinstance(pool, Scorer)  # what the on-policy stages type against
    with pool:
        pool.start_sync()
        items = sequences(5, seed=9)
        traj = batch(items, ["add", "reverse", "sort", "reverse", "add"])
        signals = {s.teacher: s for s in pool.score(traj)}
        assert traj.teacher == ["math", "text", "math", "text", "math"]
        R = traj.max_response_len
        math_sig, text_sig = signals["math"], signals["text"]
        assert math_sig.kind == "topk" and math_sig.rows.tolist() == [0, 2, 4] and math_sig.topk_ids.shape == (3, R, 3)
        assert text_sig.kind == "hidden" and text_sig.rows.tolist() == [1, 3] and text_sig.hidden.shape == (2, R, MODEL.hidden_size)
        assert math_sig.weight_version == "default"
        for sig, key in ((math_sig, "topk_logprobs"), (text_sig, "hidden")):
            for b, row in enumerate(sig.rows.tolist()):
                it = items[row]
                lp, hidden = world.ref_a(it.tokens)
                n = it.response_len
                assert int(sig.response_lens[b]) == n
                got = getattr(sig, key)[b]
                assert torch.all(got[n:] == 0)  # zero padding beyond the response
                want = -np.sort(-lp, axis=1)[:, :3] if key == "topk_logprobs" else hidden
                # Response token j is predicted at position prompt_len - 1 + j.
                np.testing.assert_allclose(got[:n].numpy(), want[it.prompt_len - 1 : it.length - 1], atol=1e-5)
        with pytest.raises(RoutingError, match=r"domain 'poetry', which no teacher owns; known domains: \['add', 'reverse', 'sort'\]"):
            pool.route(batch(items[:2], ["add", "poetry"]))


def test_pool_refuses_incompatible_and_unreachable_teachers(servers):
    from megatron_opd.runtime.spawn import free_port

    url, plain = servers["main"].url, servers["a"].url

    def start(cfg, vocab=V, fp=TOK.fingerprint):
        with TeacherPool({"math": cfg}, student_vocab_size=vocab, student_fingerprint=fp) as pool:
            pool.start_sync()

    with pytest.raises(TeacherIncompatible, match=rf"teacher 'math' at {url} has vocabulary size {V} \(reported by /model_info\) but the student has {V - 1}"):
        start(teacher(url), vocab=V - 1)
    with pytest.raises(TeacherIncompatible, match=rf"teacher 'math' at {url} has tokenizer fingerprint '{TOK.fingerprint}' .* but the student has 'feedface'"):
        start(teacher(url), fp="feedface")
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnavailable, match=rf"teacher 'math' at {dead} is not reachable"):
        start(teacher([url, dead]))
    # A stock SGLang server does not report its tokenizer: a declaration is required, then probed.
    with pytest.raises(TeacherIncompatible, match=rf"teacher 'math' at {plain} does not report its tokenizer .* declare teachers.math.tokenizer_fingerprint"):
        start(teacher(plain))
    start(teacher(plain, tokenizer_fingerprint=TOK.fingerprint, vocab_size=V))
    with pytest.raises(TeacherIncompatible, match=rf"fails the vocabulary probe: top {V - 1} logprobs returned {V - 1} ids in \[\d+, {V - 1}\] holding mass"):
        start(teacher(plain, tokenizer_fingerprint=TOK.fingerprint, vocab_size=V - 1), vocab=V - 1)
    with pytest.raises(TeacherIncompatible, match="cannot send signal 'logits'"):
        start(teacher(plain, "logits", tokenizer_fingerprint=TOK.fingerprint, vocab_size=V))


def test_pool_refuses_a_hidden_teacher_whose_model_dir_is_another_models(servers, world):
    """The head the trainer applies must belong to the served model: checkpoint ids compared."""
    from megatron_opd.models.model_dir import read_model_dir
    from megatron_opd.runtime.checkpoint import checkpoint_id

    url = servers["main"].url  # serves teacher A
    served = checkpoint_id(read_model_dir(world.dir_a).latest_checkpoint())
    assert served and json.loads(http("GET", url + "/model_info")[1])["checkpoint_id"] == served
    wrong = {
        "math": TeacherConfig(endpoints=[url], domains=["add"], signal="topk", topk=3, api_key_env=KEY_ENV, model_dir=str(world.dir_a)),
        "text": TeacherConfig(endpoints=[url], domains=["reverse"], signal="hidden", api_key_env=KEY_ENV, model_dir=str(world.dir_b)),
    }
    with TeacherPool(wrong, student_vocab_size=V, student_fingerprint=TOK.fingerprint) as pool:
        with pytest.raises(TeacherIncompatible) as e:
            pool.start_sync()
    text = str(e.value)
    assert text.startswith(f"teacher 'text' at {url} serves checkpoint {served}") and str(world.dir_b) in text
    assert f"it serves the checkpoint of teachers.math.model_dir ({world.dir_a})" in text
    right = dict(wrong, text=TeacherConfig(endpoints=[url], domains=["reverse"], signal="hidden", api_key_env=KEY_ENV, model_dir=str(world.dir_a)))
    with TeacherPool(right, student_vocab_size=V, student_fingerprint=TOK.fingerprint) as pool:
        pool.start_sync()


# ---------------------------------------------------------------------------------------------
# Weight updates (they change the main server's weights, then restore them)


def test_update_weights_from_disk_reports_weight_version(servers, world):
    url = servers["main"].url
    items = sequences(3, seed=31)
    status, raw = http("POST", url + "/update_weights_from_disk", {"model_path": str(world.dir_b), "weight_version": "v2", "flush_cache": True})
    assert status == 200 and json.loads(raw)["success"] is True
    try:
        assert json.loads(http("GET", url + "/model_info")[1])["weight_version"] == "v2"
        sigs, _ = run_client(teacher(url), items)
        assert {s.weight_version for s in sigs} == {"v2"}
        for it, sig in zip(items, sigs):
            lp_b, _ = world.ref_b(it.tokens)
            lp_a, _ = world.ref_a(it.tokens)
            pos = slice(it.prompt_len - 1, it.length - 1)
            want_b = lp_b[pos][np.arange(it.response_len), list(it.tokens[it.prompt_len :])]
            want_a = lp_a[pos][np.arange(it.response_len), list(it.tokens[it.prompt_len :])]
            np.testing.assert_allclose(sig.sampled_logprobs, want_b, atol=1e-5)
            assert np.abs(want_a - want_b).max() > 1e-2  # the two teachers really differ
        status, raw = http("POST", url + "/update_weights_from_disk", {"model_path": str(world.dir_b / "nowhere")})
        assert status == 400 and json.loads(raw)["success"] is False and "nowhere" in json.loads(raw)["message"]
    finally:
        status, _ = http("POST", url + "/update_weights_from_disk", {"model_path": str(world.dir_a), "weight_version": "default"})
        assert status == 200


def test_update_weights_from_distributed_protocol(servers, world, tmp_path):
    """This process plays trainer rank 0 of SGLang's weight-update group (gloo on loopback): it
    broadcasts teacher B's weights under Hugging Face names (from the export tool, an independent
    path) and the server then answers with B's log-probs; misuse gets SGLang's error replies."""
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.torch import load_file

    from megatron_opd.models.hf.export import megatron_to_hf
    from megatron_opd.rollout.sglang import update_body_for
    from megatron_opd.runtime.distributed import broadcast_from, standalone_group
    from megatron_opd.runtime.spawn import free_port

    url = servers["main"].url
    tensors = {}
    for f in sorted(megatron_to_hf(world.dir_b, tmp_path / "b_hf").glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    pool = ThreadPoolExecutor(2)

    def post(path, body):
        status, raw = http("POST", url + path, body)
        return status, json.loads(raw)

    port = free_port()
    (init,) = W.init_group_bodies(1, 1, "127.0.0.1", port, "test-group", "gloo")
    joining = pool.submit(post, "/init_weights_update_group", init)
    group = standalone_group("gloo", "127.0.0.1", port, 0, 2, timeout_s=60)
    assert joining.result() == (200, {"success": True, "message": "Succeeded to initialize custom process group."})
    body = update_body_for(tensors, "test-group", "v3")
    status, reply = post("/update_weights_from_distributed", body)  # no session: refused, nothing received
    assert status == 400 and "begin_weight_update" in reply["message"]
    assert post("/begin_weight_update", {})[0] == 200
    assert post("/begin_weight_update", {})[1]["success"] is False  # already open
    receiving = pool.submit(post, "/update_weights_from_distributed", body)
    for tensor in tensors.values():
        broadcast_from(group, tensor.contiguous(), 0)
    assert receiving.result() == (200, {"success": True, "message": "Succeeded to update parameter online."})
    assert post("/end_weight_update", {})[0] == 200
    assert post("/end_weight_update", {})[1]["success"] is False  # nothing open
    try:
        assert json.loads(http("GET", url + "/model_info")[1])["weight_version"] == "v3"
        items = sequences(3, seed=37)

        def serves_b():
            sigs, _ = run_client(teacher(url), items)
            for it, sig in zip(items, sigs):
                lp_b, _ = world.ref_b(it.tokens)
                pos = slice(it.prompt_len - 1, it.length - 1)
                want = lp_b[pos][np.arange(it.response_len), list(it.tokens[it.prompt_len :])]
                np.testing.assert_allclose(sig.sampled_logprobs, want, atol=1e-5)

        serves_b()
        # A tensor missing from an update is named; the weights stay as they were.
        assert post("/begin_weight_update", {})[0] == 200
        partial = {k: v for k, v in tensors.items() if k != "model.norm.weight"}
        receiving = pool.submit(post, "/update_weights_from_distributed", update_body_for(partial, "test-group", "v4"))
        for tensor in partial.values():
            broadcast_from(group, tensor.contiguous(), 0)
        status, reply = receiving.result()
        assert status == 400 and "model.norm.weight" in reply["message"]
        serves_b()
        assert post("/end_weight_update", {})[0] == 200
        assert post("/destroy_weights_update_group", {"group_name": "test-group"})[1]["success"] is True
        assert post("/destroy_weights_update_group", {"group_name": "test-group"})[1]["success"] is False
    finally:
        pool.shutdown()
        status, _ = http("POST", url + "/update_weights_from_disk", {"model_path": str(world.dir_a), "weight_version": "default"})
        assert status == 200


# ---------------------------------------------------------------------------------------------
# Failover


def score_while_killing(cfg: TeacherConfig, items, victim) -> tuple[list[P.ItemSignal], SGLangClient]:
    """Score `items` on a background loop; kill `victim` once a few requests have completed."""
    box, client_box = {}, {}

    async def go():
        async with client_for("math", cfg) as client:
            client_box["c"] = client
            await client.start()
            return await score_items(client, cfg, items, vocab_size=V), client

    thread = threading.Thread(target=lambda: box.update(result=asyncio.run(go())), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while "c" not in client_box or client_box["c"].stats.requests < 4:
        assert time.monotonic() < deadline and thread.is_alive(), "scoring finished or stalled before the kill"
        time.sleep(0.002)
    victim.kill()
    thread.join(120)
    assert "result" in box, "scoring did not finish"
    return box["result"]


def check_sampled(world, items, sigs):
    for it, sig in zip(items, sigs):
        lp, _ = world.ref_a(it.tokens)
        want = lp[it.prompt_len - 1 : it.length - 1][np.arange(it.response_len), list(it.tokens[it.prompt_len :])]
        np.testing.assert_allclose(sig.sampled_logprobs, want, atol=1e-5)


def test_through_the_real_sglang_router_with_a_worker_killed(servers, world):
    router = start_router([servers["a"].url, servers["b"].url], health_check_interval_s=1, health_failure_threshold=1)
    try:
        items = sequences(60, seed=22)
        # The router drops unknown top-level keys: asked for flat base64 top-k, it comes back nested.
        topk_cfg = teacher(router.url, "topk", topk=4, topk_format="b64", api_key_env="")
        topk, client = run_client(topk_cfg, items[:4], trace=True)
        assert all(b"input_top_logprobs_val_flat_b64" not in e.body and b'"input_top_logprobs"' in e.body for e in client.trace)
        lp, _ = world.ref_a(items[0].tokens)
        np.testing.assert_allclose(topk[0].topk_logprobs, -np.sort(-lp, 1)[items[0].prompt_len - 1 : items[0].length - 1, :4], atol=1e-5)
        cfg = teacher(router.url, "sampled", batch_size=3, max_concurrency=4, max_retries=6, retry_backoff_s=0.2, api_key_env="")
        sigs, client = score_while_killing(cfg, items, servers["b"])
        assert not servers["b"].alive() and all(s is not None for s in sigs)
        check_sampled(world, items, sigs)
        # Once the router's health check drops the dead worker, a fresh client starts through it.
        sigs, _ = run_client(cfg, items[:2])
        check_sampled(world, items[:2], sigs)
    finally:
        router.stop()


def test_failover_between_replicas_loses_no_request(servers, world, caplog):
    items = sequences(60, seed=21)
    cfg = teacher([servers["a"].url, servers["main"].url], batch_size=1, max_concurrency=4, max_retries=4, retry_backoff_s=0.05)
    with caplog.at_level("WARNING", logger="megatron_opd.serving.client"):
        sigs, client = score_while_killing(cfg, items, servers["a"])
    assert not servers["a"].alive()
    assert len(sigs) == len(items) and all(s is not None for s in sigs)
    assert client.stats.failovers >= 1 and client.stats.requests == len(items)
    check_sampled(world, items, sigs)
    # Every request in flight to the dead replica failed over, but the failure is logged once.
    failovers = [r.getMessage() for r in caplog.records if "retrying on the other replicas" in r.getMessage()]
    assert len(failovers) == 1 and failovers[0].startswith(f"teacher 'math' at {servers['a'].url} failed"), failovers

