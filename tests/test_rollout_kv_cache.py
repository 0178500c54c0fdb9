"""The embedded engine's KV cache (megatron-core's static inference context) against its no-cache
path, and the kept sets it records for GRPO.

Cached and uncached rollouts of the same real megatron model, prompts of different lengths, the
same seeded generator: the same tokens, stops and finish reasons, log-probs within 1e-5 (fp32),
greedy and sampled, at TP=1 (also with multi-latent attention), at TP=2 (a spawned gloo world,
also equal to TP=1) and for an MoE model at EP=2 (replicas with different prompts and lengths, in lockstep). The forward token count
shows the cost: B*(P + L - 1) tokens with the cache, B*(L*P + L(L-1)/2) without.
"""

from __future__ import annotations

import pytest
import torch

from megatron_opd.data.domains import TinyDomains
from megatron_opd.data.prompts import Prompt
from megatron_opd.data.tokenizer import CharTokenizer
from megatron_opd.rollout.config import RolloutConfig, RolloutConfigError, SamplingParams
from megatron_opd.runtime.spawn import spawn_world

TOK = CharTokenizer()
MAX_LEN = 48
GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0)
# Truncating on purpose: top-k and top-p both cut, so kept sets are recorded.
SAMPLED = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=12, top_p=0.9)


def _model_config(**moe):
    from megatron_opd.models.config import ModelConfig

    # init_std=0.3: peaked, input-dependent distributions (a near-uniform model would hide errors).
    return ModelConfig(
        vocab_size=TOK.vocab_size, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=64, max_seq_len=MAX_LEN, init_std=0.3, make_vocab_size_divisible_by=8, **moe,
    )  # fmt: skip


def _build(layout, **moe):
    from megatron_opd.models.gpt import build_gpt_model
    from megatron_opd.runtime.distributed import init_runtime

    resolved = init_runtime(layout, seed=3)
    return build_gpt_model(_model_config(**moe), resolved).eval()


def _prompts(start: int = 0, count: int = 6) -> list[Prompt]:
    prompts = TinyDomains(["add", "reverse", "sort"], seed=0, eval_size=0).prompts(start, count)
    assert len({len(p.text) for p in prompts}) > 1, "the batch must mix prompt lengths"
    return prompts


def _generate(model, prompts, params, *, kv_cache: bool, seed: int = 11, counter: list | None = None):
    from megatron_opd.rollout.embedded import generate

    hook = None
    if counter is not None:
        hook = model.register_forward_pre_hook(lambda m, args: counter.append(args[0].numel()))
    try:
        return generate(
            model, prompts, TOK, params, max_len=MAX_LEN, generator=torch.Generator().manual_seed(seed), kv_cache=kv_cache
        )
    finally:
        if hook is not None:
            hook.remove()


def _with_stop(model, prompts, params, step: int = 2):
    """`params` plus a stop id: row 0's token at response position `step` under the uncached
    path, so that row stops there and others stop elsewhere or run to the length limit."""
    probe = _generate(model, prompts, params, kv_cache=False)
    stop = int(probe.tokens[0, int(probe.prompt_lens[0]) + step])
    return SamplingParams(**{**params.__dict__, "stop_token_ids": (stop,)})


def _outputs(batch) -> dict:
    return {
        "tokens": batch.tokens, "lengths": batch.lengths, "finish": batch.finish_reasons,
        "logprobs": batch.behavior_logprobs, "kept_ids": batch.kept_ids, "kept_logprobs": batch.kept_logprobs,
    }  # fmt: skip


def _assert_same(cached: dict, uncached: dict, tol: float = 1e-5):
    assert torch.equal(cached["tokens"], uncached["tokens"]), "the KV cache sampled other tokens"
    assert torch.equal(cached["lengths"], uncached["lengths"]) and cached["finish"] == uncached["finish"]
    err = (cached["logprobs"] - uncached["logprobs"]).abs().max().item()
    assert err <= tol, f"behaviour log-probs differ by {err}"
    assert (cached["kept_ids"] is None) == (uncached["kept_ids"] is None)
    if cached["kept_ids"] is not None:
        assert torch.equal(cached["kept_ids"], uncached["kept_ids"])
        err = (cached["kept_logprobs"] - uncached["kept_logprobs"]).abs().max().item()
        assert err <= tol, f"kept-set log-probs differ by {err}"


def _cache_vs_no_cache(model, prompts) -> list[tuple[dict, dict]]:
    """(cached, uncached) outputs for greedy and sampled decoding, each with a stop mid-batch."""
    pairs = []
    for params in (GREEDY, SAMPLED):
        params = _with_stop(model, prompts, params)
        uncached = _generate(model, prompts, params, kv_cache=False)
        cached = _generate(model, prompts, params, kv_cache=True)
        # The stop must end some rows early while others run on: finished rows leave the cache.
        assert "stop" in uncached.finish_reasons and "length" in uncached.finish_reasons, uncached.finish_reasons
        pairs.append((_outputs(cached), _outputs(uncached)))
    return pairs


# --- TP=1 -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense():
    from megatron_opd.runtime.layout import ParallelLayout

    return _build(ParallelLayout())


@pytest.fixture(scope="module")
def dense_checkpoint(dense, tmp_path_factory):
    """The TP=1 model's weights as a real dist checkpoint (megatron reshards it on load)."""
    from megatron_opd.runtime import checkpoint as ckpt

    root = tmp_path_factory.mktemp("dense")
    ckpt.save_checkpoint(root, 0, [dense])
    return str(ckpt.latest_complete(root))


def test_cached_rollout_equals_uncached_greedy_and_sampled(dense):
    pairs = _cache_vs_no_cache(dense, _prompts())
    for cached, uncached in pairs:
        _assert_same(cached, uncached)
    (greedy, _), (sampled, _) = pairs
    assert greedy["kept_ids"] is None  # greedy does not truncate a distribution: nothing recorded
    assert sampled["kept_ids"] is not None
    # A real sampled rollout: not the greedy chain.
    assert not torch.equal(greedy["tokens"], sampled["tokens"])


def test_cached_rollout_equals_uncached_with_multi_latent_attention(dense):
    """DeepSeek-style MLA with YaRN RoPE: megatron's static context caches its keys and values too."""
    from megatron_opd.models.gpt import build_gpt_model
    from megatron_opd.runtime.layout import ParallelLayout

    cfg = _model_config()
    cfg.num_query_groups = 0  # MLA has no query groups (megatron's core attention would repeat keys)
    cfg.multi_latent_attention, cfg.kv_lora_rank, cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim = True, 8, 8, 4, 8
    cfg.rope_scaling, cfg.rope_scaling_factor, cfg.yarn_original_max_position = "yarn", 4.0, 16
    mla = build_gpt_model(cfg, ParallelLayout()).eval()  # the runtime `dense` initialised
    for cached, uncached in _cache_vs_no_cache(mla, _prompts()):
        _assert_same(cached, uncached)


def test_forward_tokens_are_linear_in_length_with_the_cache(dense):
    prompts = _prompts()
    b, p = len(prompts), max(len(TOK.encode(x.text)) + 1 for x in prompts)
    for length in (4, 12):
        params = SamplingParams(max_new_tokens=length, temperature=0.0, stop_token_ids=())
        counts = {}
        for kv in (True, False):
            counts[kv] = []
            batch = _generate(dense, prompts, params, kv_cache=kv, counter=counts[kv])
            assert int(batch.response_lens.min()) == length  # no row stopped: the formulas below hold
        assert sum(counts[True]) == b * (p + length - 1)  # one prefill, then one token per row per step
        assert sum(counts[False]) == b * (length * p + length * (length - 1) // 2)
        assert len(counts[True]) == len(counts[False]) == length


def test_kept_sets_are_the_samplers_own(dense):
    """Each recorded kept set is what the sampler keeps on that position's logits (recomputed by
    a plain full forward of the row's prefix), the sampled token is in it, and `kept_logprobs`
    is the token's log-prob renormalised over it (float64 reference)."""
    from megatron_opd.rollout.sampler import sample

    prompts = _prompts(count=4)
    batch = _generate(dense, prompts, SAMPLED, kv_cache=True)
    assert batch.kept_ids.shape[:2] == batch.behavior_logprobs.shape and batch.kept_ids.dtype == torch.long
    assert batch.kept_ids.shape[2] == int((batch.kept_ids >= 0).sum(-1).max())  # K: the largest set
    for i in range(len(prompts)):
        p, n = int(batch.prompt_lens[i]), int(batch.lengths[i])
        assert (batch.kept_ids[i, n - p :] == -1).all()  # nothing beyond the response
        for j in range(n - p):
            seq = batch.tokens[i, : p + j]
            with torch.no_grad():
                logits = dense(seq[None], torch.arange(p + j)[None], None)[0, -1, : TOK.vocab_size].float()
            want = sample(logits[None], SAMPLED, torch.Generator().manual_seed(0), return_kept=True).kept_ids[0]
            got = batch.kept_ids[i, j]
            assert torch.equal(got[got >= 0], want[want >= 0])
            token = int(batch.tokens[i, p + j])
            assert token in want.tolist()
            tempered = torch.log_softmax(logits.double() / SAMPLED.temperature, -1)
            renormalised = tempered[token] - torch.logsumexp(tempered[want[want >= 0]], -1)
            assert abs(float(batch.kept_logprobs[i, j]) - float(renormalised)) < 1e-5
            assert abs(float(batch.behavior_logprobs[i, j]) - float(tempered[token])) < 1e-5  # before truncation
    assert (batch.kept_logprobs >= batch.behavior_logprobs - 1e-6).all()  # renormalising never lowers it
    # select() carries the kept sets with their rows.
    sub = batch.select([2, 0])
    assert torch.equal(sub.kept_ids, batch.kept_ids[[2, 0]]) and torch.equal(sub.kept_logprobs, batch.kept_logprobs[[2, 0]])


def test_kept_sets_on_request_and_untruncated_sampling(dense):
    prompts = _prompts(count=3)
    from megatron_opd.rollout.embedded import generate

    plain = SamplingParams(max_new_tokens=4, temperature=1.0)  # the whole vocabulary: nothing to keep
    assert generate(dense, prompts, TOK, plain, max_len=MAX_LEN, record_kept=True).kept_ids is None
    greedy = generate(dense, prompts, TOK, GREEDY, max_len=MAX_LEN, record_kept=True)
    assert torch.equal(greedy.kept_ids[..., 0][greedy.kept_ids[..., 0] >= 0], greedy.response_tokens()[greedy.kept_ids[..., 0] >= 0])
    assert greedy.kept_ids.shape[2] == 1 and torch.all(greedy.kept_logprobs == 0)
    assert generate(dense, prompts, TOK, SAMPLED, max_len=MAX_LEN, record_kept=False).kept_ids is None


def test_a_prompt_too_long_for_max_seq_len_is_a_clear_error(dense):
    long = Prompt("1" * (MAX_LEN - 1), "add", "add/too-long")  # BOS + 47 characters: no room left
    for kv in (True, False):
        with pytest.raises(ValueError, match=r"'add/too-long' has 48 tokens.*model\.max_seq_len=48"):
            _generate(dense, _prompts(count=4) + [long], GREEDY, kv_cache=kv)


def test_rollout_kv_cache_key():
    assert RolloutConfig().kv_cache is True
    RolloutConfig(kv_cache=False).check()
    with pytest.raises(RolloutConfigError, match="rollout.kv_cache must be true or false"):
        RolloutConfig(kv_cache="false").check()


# --- TP=2 and EP=2 worlds -------------------------------------------------------------------


def _tp_worker(tp: int, checkpoint: str):
    from megatron_opd.runtime import checkpoint as ckpt
    from megatron_opd.runtime.layout import ParallelLayout

    model = _build(ParallelLayout(tp=tp))
    ckpt.load_checkpoint(checkpoint, [model], load_rng=False)
    return _cache_vs_no_cache(model, _prompts())


def test_cached_rollout_equals_uncached_at_tp2_and_tp1(dense, dense_checkpoint):
    ranks = spawn_world(_tp_worker, 2, (2, dense_checkpoint), timeout_s=300)
    for cached, uncached in ranks[0]:
        _assert_same(cached, uncached)
    for pair0, pair1 in zip(ranks[0], ranks[1]):  # every TP rank holds the same batch
        for a, b in zip(pair0, pair1):
            _assert_same(a, b, tol=0.0)
    # The same weights at TP=1 (the checkpoint's source) sample the same rollouts.
    for (tp2, _), (tp1, _) in zip(ranks[0], _cache_vs_no_cache(dense, _prompts())):
        _assert_same(tp2, tp1)


def _ep_worker():
    from megatron.core import parallel_state

    from megatron_opd.runtime.layout import ParallelLayout

    model = _build(ParallelLayout(ep=2), num_experts=4, moe_topk=2, moe_ffn_hidden_size=32)
    assert parallel_state.get_expert_model_parallel_world_size() == 2
    # Each data-parallel replica its own prompts and length limit: the all-to-alls of the two
    # replicas' generation loops pair up only if they run in lockstep.
    replica = parallel_state.get_data_parallel_rank()
    prompts = _prompts(start=10 * replica, count=5 - replica)
    pairs = []
    for params in (GREEDY, SAMPLED):
        params = SamplingParams(**{**params.__dict__, "max_new_tokens": 10 - 4 * replica})
        params = _with_stop(model, prompts, params, step=1 + replica)
        uncached = _generate(model, prompts, params, kv_cache=False)
        cached = _generate(model, prompts, params, kv_cache=True)
        pairs.append((_outputs(cached), _outputs(uncached)))
    return pairs


def test_moe_cached_rollout_equals_uncached_at_ep2():
    ranks = spawn_world(_ep_worker, 2, timeout_s=300)
    for rank in ranks:
        for cached, uncached in rank:
            _assert_same(cached, uncached)
    # The replicas really differed (else lockstep would be untested).
    assert ranks[0][0][0]["tokens"].shape != ranks[1][0][0]["tokens"].shape
