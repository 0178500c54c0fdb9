"""Keep sampling mask over SGLang's wire: the SGLang rollout engine gets each response token's kept
set from the server, in SGLang 0.5.23's own fields, and our server returns them that way.

- the fields are SGLang's: the request keys are `GenerateReqInput` fields of the pinned wheel's
  io_struct.py (and the request passes its api_types contract), the meta_info keys are the ones
  its tokenizer_manager.py writes, and our base64 routed experts decode with the wheel's own
  `extract_routed_experts_from_meta_info`;
- over real HTTP (a real trainer on one gloo rank, the SGLang engine, our server holding the
  trainer's weights after the first push), the kept sets `Trajectories.kept_ids` [B, R, K] and
  `kept_logprobs` [B, R] equal what the sampler keeps on the trainer's own logits of the same
  tokens, for top-p alone (sent with top_k = the vocabulary size: SGLang needs a finite top_k)
  and for top-k alone;
- a kept-set request to a server that cannot return them (a stock SGLang without the field,
  played by our server with --plain-sglang; a top_k beyond the server's
  --sampling-mask-max-tokens; any server behind the real sglang-router 0.3.2, which drops the
  fields it does not know) is an error naming the server and the fix, before any weights are
  pushed.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_opd.runtime.spawn import WorldFailed, spawn_world
from megatron_opd.serving import wire
from megatron_opd.serving.launch import start_router, start_teacher_server
from megatron_opd.serving.sglang_contract import load_contract, request_fields, wheel_function, wheel_source

REPO = Path(__file__).resolve().parents[1]


def test_the_rl_fields_are_sglangs():
    api = load_contract(fetch=True)
    fields = request_fields("GenerateReqInput")
    for key in ("return_sampling_mask", "sampling_logprobs_mode", "return_routed_experts", "routed_experts_start_len"):
        assert key in fields, f"{key} is not a GenerateReqInput field of sglang 0.5.23"
    written = set(re.findall(r'meta_info\["(\w+)"\]\s*=', wheel_source("sglang/srt/managers/tokenizer_manager.py")))
    for key in (wire.SAMPLING_MASK, wire.SAMPLING_LOGPROBS, wire.SAMPLING_MASK_LENGTH, wire.ROUTED_EXPERTS):
        assert key in written, f"sglang 0.5.23 writes no meta_info[{key!r}]"
    body = {"input_ids": [[3, 4]], "sampling_params": [{"max_new_tokens": 2, "top_k": 5}], "return_logprob": True,
            "return_sampling_mask": True, "return_routed_experts": True, "routed_experts_start_len": 0}  # fmt: skip
    req = api.GenerateRequest.from_json_value(json.loads(json.dumps(body)))
    assert req.return_sampling_mask is True and req.routed_experts_start_len == 0
    # Routed experts: base64 of the raw int32 [rows, layers, topk] array, as the wheel decodes it.
    routed = np.arange(5 * 3 * 2, dtype=np.int32).reshape(5, 3, 2) % 4
    extract = wheel_function("sglang/srt/state_capturer/routed_experts.py", "extract_routed_experts_from_meta_info",
                             {"np": np, "pybase64": base64})  # fmt: skip
    meta = {wire.ROUTED_EXPERTS: wire.encode_routed_experts(routed)}
    np.testing.assert_array_equal(extract({"meta_info": meta}).reshape(5, 3, 2), routed)
    np.testing.assert_array_equal(wire.decode_routed_experts(meta, 5, 3, 2, "here"), routed)
    with pytest.raises(wire.ProtocolError, match="holds 120 bytes; 4 positions x 3 layers x top-2"):
        wire.decode_routed_experts(meta, 4, 3, 2, "here")


# -- over HTTP -----------------------------------------------------------------------------------


def _make_model_dir(root: str) -> str:
    from megatron_opd.config import load_config
    from megatron_opd.data.tokenizer import CharTokenizer
    from megatron_opd.models.gpt import build_gpt_model
    from megatron_opd.models.model_dir import write_model_dir
    from megatron_opd.runtime import checkpoint as ckpt
    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.runtime.layout import ParallelLayout

    cfg = load_config(REPO / "configs/tiny/opd.yaml").model
    # Larger weights than a fresh init: peaked distributions, so top-p keeps sets of many sizes.
    model = build_gpt_model(replace(cfg, init_std=0.3), init_runtime(ParallelLayout(), 0))
    d = write_model_dir(Path(root) / "student", cfg, CharTokenizer())
    ckpt.save_checkpoint(d.checkpoints, 0, [model])
    return str(d.path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return spawn_world(_make_model_dir, 1, (str(tmp_path_factory.mktemp("models")),))[0]


def _kept_sets_worker(cfg_tree: dict, samplings: list[dict]) -> list[dict]:
    """For each sampling: the SGLang engine's rollout, and the kept sets the sampler keeps on the
    trainer's own logits of the same tokens."""
    from megatron.core import tensor_parallel

    from megatron_opd.config import JobConfig, build
    from megatron_opd.data.domains import TinyDomains
    from megatron_opd.data.tokenizer import CharTokenizer
    from megatron_opd.rollout.sampler import kept_set_logprobs, reported_logprobs, sample
    from megatron_opd.rollout.sglang import SGLangRolloutEngine
    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.stages.trainer import Trainer

    cfg = build(JobConfig, cfg_tree)
    trainer = Trainer(cfg, init_runtime(cfg.parallel, cfg.run.seed))
    trainer.resume(None)  # loads train.init_from
    tok = CharTokenizer()
    prompts = TinyDomains(["add", "reverse", "sort"], seed=0, eval_size=0).prompts(0, 6)
    out = []
    for step, changes in enumerate(samplings):
        rollout = replace(cfg.rollout, **changes)
        engine = SGLangRolloutEngine(rollout, trainer, tok, max_len=cfg.model.max_seq_len, seed=cfg.run.seed)
        try:
            batch = engine.generate(prompts, step)
        finally:
            engine.close()
        positions = torch.arange(batch.tokens.shape[1]).expand_as(batch.tokens)
        with torch.no_grad():
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(trainer.module(batch.tokens, positions, None))
        logits = logits[..., : tok.vocab_size].float()
        sets, lps = [], []
        for i in range(len(batch)):
            p, r = int(batch.prompt_lens[i]), int(batch.response_lens[i])
            rows, drawn = logits[i, p - 1 : p - 1 + r], batch.tokens[i, p : p + r]
            kept = sample(rows, rollout.sampling, torch.Generator().manual_seed(0), return_kept=True).kept_ids
            sets.append([sorted(int(t) for t in k if t >= 0) for k in kept])
            lps.append(kept_set_logprobs(reported_logprobs(rows, rollout.sampling), drawn, kept))
        out.append({"batch": batch, "sets": sets, "logprobs": lps})
    return out


def _cfg(model_dir: str, run: Path, url: str, *overrides: str) -> dict:
    from megatron_opd.config import derive, load_config, to_dict

    cfg = derive(
        load_config(REPO / "configs/tiny/opd.yaml"),
        ["stage=sft", "run.nproc=1", "parallel.tp=1", "rollout.engine=sglang", "rollout.weight_sync=disk",
         "rollout.max_new_tokens=6", "rollout.temperature=1.0", "run.progress=none", *overrides],
        **{"run.output_dir": str(run.parent), "run.name": run.name, "train.init_from": model_dir, "rollout.endpoints": [url]},
    )  # fmt: skip
    return to_dict(cfg)


def test_kept_sets_from_our_server_equal_the_samplers_on_the_trainers_logits(model_dir, tmp_path):
    run = tmp_path / "t"
    samplings = [{"top_p": 0.8, "top_k": 0}, {"top_p": 1.0, "top_k": 4}]
    with start_teacher_server(model_dir=model_dir, weights_dir=run / "rollout_weights") as server:
        got = spawn_world(_kept_sets_worker, 1, (_cfg(model_dir, run, server.url), samplings), timeout_s=300)[0]
    sizes = set()
    for case, res in zip(samplings, got):
        batch = res["batch"]
        b, r = len(batch), batch.max_response_len
        assert batch.kept_ids is not None and batch.kept_ids.dtype == torch.long
        assert batch.kept_ids.shape[:2] == (b, r) and batch.kept_logprobs.shape == (b, r)
        assert batch.kept_ids.shape[2] < 51, "a dense [B, R, V] mask, not padded kept sets"
        for i in range(b):
            n = int(batch.response_lens[i])
            for j in range(n):
                kept = batch.kept_ids[i, j]
                ids = sorted(int(t) for t in kept if t >= 0)
                assert (kept[len(ids) :] == -1).all(), "kept ids are not left-aligned, -1 padded"
                assert ids == res["sets"][i][j], f"{case}: row {i} token {j}: the server kept {ids}, the sampler {res['sets'][i][j]}"
                assert int(batch.tokens[i, int(batch.prompt_lens[i]) + j]) in ids
                sizes.add(len(ids))
            assert (batch.kept_ids[i, n:] == -1).all() and (batch.kept_logprobs[i, n:] == 0).all()
            err = (batch.kept_logprobs[i, :n] - res["logprobs"][i]).abs().max().item()
            assert err < 1e-5, f"{case}: row {i}: kept-set log-probs differ by {err}"
        if case["top_k"]:
            assert max(len(s) for row in res["sets"] for s in row) == case["top_k"]
    assert len(sizes) > 2, f"every kept set had the same size {sizes}: top-p would go untested"


def test_a_server_that_cannot_return_kept_sets_is_refused_before_any_weights_are_pushed(model_dir, tmp_path):
    cases = {
        "plain": (["--plain-sglang"], ["rollout.top_p=0.8"], "cannot return sampling masks"),
        "cap": (["--sampling-mask-max-tokens", "3"], ["rollout.top_k=5"], "increase --sampling-mask-max-tokens"),
    }
    # The real sglang-router 0.3.2 forwards only the request fields it knows: not these.
    cases["router"] = ([], ["rollout.top_p=0.8"], "behind an sglang-router")
    for name, (flags, overrides, says) in cases.items():
        run = tmp_path / name
        with start_teacher_server(model_dir=model_dir, weights_dir=run / "rollout_weights", extra_args=flags) as server:
            front = start_router([server.url]) if name == "router" else server
            try:
                with pytest.raises(WorldFailed) as failure:
                    spawn_world(_kept_sets_worker, 1, (_cfg(model_dir, run, front.url, *overrides), [{}]), timeout_s=300)
            finally:
                if front is not server:
                    front.stop()
        message = str(failure.value)
        assert f"rollout server at {front.url} cannot return sampling masks" in message, message[-2000:]
        assert says in message and "rollout.keep_sampling_mask=false" in message, message[-2000:]
        assert not (run / "rollout_weights").exists(), f"{name}: weights were pushed before the refusal"
