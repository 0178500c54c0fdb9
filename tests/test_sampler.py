"""The one sampler (rollout/sampler.py) against SGLang's sampling rules.

Two independent references:
- `reference_kept`, a float64 reading of the rules in sglang==0.5.23:
  sglang/srt/sampling/sampling_params.py:SamplingParams.normalize (temperature < 1e-6 -> greedy,
  top_k=1 at temperature 1; top_k=-1 -> whole vocabulary),
  sglang/srt/layers/sampler.py:Sampler.forward (greedy: argmax, log_softmax(logits); otherwise
  logits / T, softmax, and the reported logprob is log of that softmax before filtering),
  sglang/srt/layers/sampler.py:top_k_top_p_min_p_sampling_from_probs_torch (descending sort;
  rank >= top_k dropped; dropped when the mass before a token is > top_p; dropped when below
  min_p * the top probability);
- SGLang's own `top_k_top_p_min_p_sampling_from_probs_torch`, compiled from the pinned wheel
  (serving/sglang_contract.py: wheel_function), whose filtered probabilities give its kept set.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pytest
import torch

from megatron_opd.rollout.config import SamplingParams
from megatron_opd.rollout.sampler import filters, is_greedy, reported_logprobs, sample, stops, token_logprobs
from megatron_opd.serving.sglang_contract import SAMPLER, load_contract, wheel_function


def reference_kept(logits: np.ndarray, params: SamplingParams) -> list[int]:
    """The kept token ids of one row, most probable first (ties: lower id first), in float64."""
    z = np.asarray(logits, np.float64)
    if params.temperature < 1e-6 or params.top_k == 1:
        return [int(np.argmax(z))]
    p = np.exp((z - z.max()) / params.temperature)
    p /= p.sum()
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    kept, before = [], 0.0
    for rank, i in enumerate(order):
        if params.top_k and rank >= params.top_k:
            break
        if before > params.top_p:
            break
        if p[i] < params.min_p * p[order[0]]:
            break
        kept.append(i)
        before += p[i]
    return kept


def reference_logprob(logits: np.ndarray, token: int, params: SamplingParams) -> float:
    z = np.asarray(logits, np.float64)
    if not (params.temperature < 1e-6 or params.top_k == 1):
        z = z / params.temperature
    return float(z[token] - z.max() - math.log(np.exp(z - z.max()).sum()))


def kept_lists(kept: torch.Tensor) -> list[list[int]]:
    return [[int(t) for t in row if t >= 0] for row in kept]


def sglang_kept(logits: torch.Tensor, params: SamplingParams) -> list[set[int]]:
    """SGLang's own torch sampler, fed what its Sampler.forward feeds it (softmax(logits / T))."""
    load_contract(fetch=True)  # makes sure the pinned wheel is there
    fn = wheel_function(SAMPLER, "top_k_top_p_min_p_sampling_from_probs_torch", {"torch": torch, "Optional": Optional})
    b = logits.shape[0]
    probs = torch.softmax(logits.float() / params.temperature, -1)
    top_k = params.top_k if params.top_k > 0 else 1 << 30  # sampling_params.py: TOP_K_ALL
    _, filtered, ids, _ = fn(
        probs.clone(), torch.full((b,), top_k), torch.full((b,), params.top_p), torch.full((b,), params.min_p),
        params.min_p > 0, None, torch.zeros(b, dtype=torch.long), return_filtered_probs=True,
    )  # fmt: skip
    return [set(ids[r][filtered[r] > 0].tolist()) for r in range(b)]


CASES = [
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_k=12, top_p=0.6),
    SamplingParams(temperature=0.5, min_p=0.05),
    SamplingParams(temperature=1.0, top_k=20, top_p=0.95, min_p=0.02),
    SamplingParams(temperature=2.0, top_p=0.3, min_p=0.2),
]


@pytest.mark.parametrize("params", CASES, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}")
def test_kept_sets_and_logprobs_match_sglang(params):
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 3
    result = sample(logits, params, torch.Generator().manual_seed(1), return_kept=True)
    ours = kept_lists(result.kept_ids)
    theirs = sglang_kept(logits, params)
    for r in range(len(logits)):
        want = reference_kept(logits[r].numpy(), params)
        assert ours[r] == want, (r, ours[r], want)  # same ids, same order
        assert set(want) == theirs[r], (r, want, theirs[r])
        assert int(result.tokens[r]) in want  # the draw comes from the kept set
        assert abs(float(result.logprobs[r]) - reference_logprob(logits[r].numpy(), int(result.tokens[r]), params)) < 1e-5
    assert result.kept_ids.shape[1] == max(len(k) for k in ours) and result.kept_ids.dtype == torch.long


def test_top_p_keeps_the_token_whose_preceding_mass_is_exactly_p():
    logits = torch.zeros(1, 4)  # four tokens of probability exactly 0.25
    kept = lambda p: kept_lists(sample(logits, SamplingParams(top_p=p), return_kept=True).kept_ids)[0]  # noqa: E731
    # Mass before token 2 is 0.5: not > 0.5, so it stays (the old embedded rule `>=` dropped it).
    assert kept(0.5) == [0, 1, 2] == reference_kept(logits[0].numpy(), SamplingParams(top_p=0.5))
    assert kept(0.49) == [0, 1] and kept(0.25) == [0, 1] and kept(0.2) == [0]
    assert [len(s) for s in sglang_kept(logits, SamplingParams(top_p=0.5))] == [3]
    assert sample(logits, SamplingParams(top_p=1.0), return_kept=True).kept_ids is None  # nothing filtered


def test_top_k_ties_keep_exactly_k_lowest_ids_first():
    logits = torch.tensor([[0.0, 2.0, 2.0, 2.0, 1.0]])
    result = sample(logits, SamplingParams(top_k=2), torch.Generator().manual_seed(0), return_kept=True)
    assert kept_lists(result.kept_ids) == [[1, 2]]
    assert [len(s) for s in sglang_kept(logits, SamplingParams(top_k=2))] == [2]


def test_greedy_is_argmax_with_the_unscaled_logprob():
    logits = torch.tensor([[0.5, 3.0, 3.0, -1.0], [2.0, 0.0, 1.0, 9.0]])
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=1e-7), SamplingParams(temperature=0.7, top_k=1)):
        assert is_greedy(params) and filters(params)
        result = sample(logits, params, return_kept=True)
        assert result.tokens.tolist() == [1, 3]  # ties: the first maximum
        assert kept_lists(result.kept_ids) == [[1], [3]]
        want = torch.log_softmax(logits.double(), -1)[[0, 1], [1, 3]]
        torch.testing.assert_close(result.logprobs.double(), want, rtol=0, atol=1e-6)
    assert not is_greedy(SamplingParams(temperature=2e-6))


def test_reported_logprob_is_the_tempered_distribution_before_filtering():
    torch.manual_seed(3)
    logits = torch.randn(8, 30)
    params = SamplingParams(temperature=0.6, top_k=3)
    result = sample(logits, params, torch.Generator().manual_seed(2))
    want = torch.log_softmax(logits.double() / 0.6, -1).gather(-1, result.tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(result.logprobs.double(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(token_logprobs(logits, result.tokens, params), result.logprobs)
    assert reported_logprobs(logits, params).shape == (8, 30)
    assert float(result.logprobs.exp().max()) < 1.0  # not renormalised over the 3 kept tokens


def test_draws_follow_the_kept_distribution():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -1.0, -3.0])
    params = SamplingParams(temperature=0.8, top_p=0.8, min_p=0.1)
    n = 40_000
    result = sample(logits.expand(n, -1), params, torch.Generator().manual_seed(5))
    kept = reference_kept(logits.numpy(), params)
    p = np.exp(logits.double().numpy() / 0.8)
    want = np.zeros(len(p))
    want[kept] = p[kept] / p[kept].sum()
    freq = np.bincount(result.tokens.numpy(), minlength=len(p)) / n
    assert set(np.nonzero(freq)[0]) == set(kept)
    assert np.all(np.abs(freq - want) < 4 * np.sqrt(want * (1 - want) / n) + 1e-9)


def test_stop_tokens_and_refused_params():
    params = SamplingParams(stop_token_ids=[7, 9])
    assert params.stop_token_ids == (7, 9)
    assert stops(7, params, eos_id=2) and stops(2, params, eos_id=2) and not stops(3, params, eos_id=2)
    assert not stops(2, params, eos_id=None)  # ignore_eos
    for bad, key in (({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
                     ({"temperature": -0.1}, "temperature"), ({"min_p": 2.0}, "min_p")):  # fmt: skip
        with pytest.raises(ValueError, match=key):
            SamplingParams(**bad)


def test_embedded_generation_uses_the_sampler_and_stops(tmp_path):
    """The in-job engine: greedy equals the argmax chain, its behaviour log-probs are the
    sampler's, and a stop id ends a row with finish reason 'stop' (the stop token kept)."""
    from megatron_opd.data.domains import TinyDomains
    from megatron_opd.data.tokenizer import CharTokenizer
    from megatron_opd.models.config import ModelConfig
    from megatron_opd.models.gpt import build_gpt_model
    from megatron_opd.rollout.embedded import generate
    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.runtime.layout import ParallelLayout

    tok = CharTokenizer()
    init_runtime(ParallelLayout(), seed=3)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_attention_heads=4, max_seq_len=64, init_std=0.3)
    model = build_gpt_model(cfg, ParallelLayout()).eval()
    prompts = TinyDomains(["add"], seed=0, eval_size=0).prompts(0, 3)
    greedy = generate(model, prompts, tok, SamplingParams(max_new_tokens=6, temperature=0.0), max_len=64)
    for i in range(len(prompts)):
        seq = greedy.tokens[i, : int(greedy.prompt_lens[i])].tolist()
        for j in range(int(greedy.response_lens[i])):
            with torch.no_grad():
                logits = model(torch.tensor([seq]), torch.arange(len(seq))[None], None)[0, -1, : tok.vocab_size]
            token = int(greedy.tokens[i, len(seq)])
            assert token == int(logits.argmax())
            assert abs(float(greedy.behavior_logprobs[i, j]) - float(torch.log_softmax(logits.float(), -1)[token])) < 1e-5
            seq.append(token)
    # Stop at the second greedy token of row 0.
    stop = int(greedy.tokens[0, int(greedy.prompt_lens[0]) + 1])
    stopped = generate(model, prompts[:1], tok, SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=(stop,)), max_len=64)
    response = stopped.tokens[0, int(stopped.prompt_lens[0]) : int(stopped.lengths[0])].tolist()
    first = greedy.tokens[0, int(greedy.prompt_lens[0]) :].tolist().index(stop)
    assert response[-1] == stop and len(response) == first + 1 and stopped.finish_reasons == ["stop"]
