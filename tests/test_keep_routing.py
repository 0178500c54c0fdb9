"""Keep routing: an MoE student's experts chosen while sampling, replayed in its training forwards.

One real spawned gloo world of 2 ranks at EP=2 (each rank its own data-parallel replica with its
own prompts, half of the experts; the all-to-alls pair the replicas) runs a real `Trainer` with
rollout.keep_routing=true (megatron-core's RouterReplay in every router):
- the embedded engine records the routed experts of the prefill and every KV-cached decode step,
  the same as the no-cache path records, at every fed position and nowhere else;
- the trainer's forward-only pass with the replayed routing reproduces the sampler's log-probs;
  replaying another routing does not (so the replay is really in effect);
- one optimizer step (a high learning rate, so the routers' choices move) changes the routing of
  the same tokens; then the forward with the sampler's routing differs from the free forward
  exactly on the rows whose routing changed, from the first changed position on, and equals it
  on the others;
- the same weights behind our server over real HTTP (the SGLang rollout engine, disk weight sync,
  `return_routed_experts`) give the same greedy tokens and the same routed experts as in-job;
- held-out evaluation at EP=2 whose replicas' shares need different numbers of generate calls
  finishes (every replica calls generate equally often);
- keep routing is refused for a dense model (config check and trainer), and without
  --enable-return-routed-experts the SGLang engine stops before any step, naming server and flag.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_opd.runtime.spawn import spawn_world
from megatron_opd.serving.launch import start_teacher_server

MOE = [
    "model.vocab_size=51",
    "model.hidden_size=32",
    "model.num_layers=3",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=64",
    "model.max_seq_len=48",
    "model.make_vocab_size_divisible_by=8",
    # Large weights: peaked, input-dependent routing and distributions (a flat model hides errors).
    "model.init_std=0.3",
    "model.num_experts=4",
    "model.moe_topk=2",
    "model.moe_ffn_hidden_size=32",
    "model.moe_layer_freq=[1,0,1]",  # a dense layer between: the layer map must skip it
    "rollout.keep_routing=true",
    "rollout.max_new_tokens=8",
    "run.progress=none",
    "train.micro_batch_size=3",
    "train.global_batch_size=12",
    "train.optim.lr=0.02",
    "train.optim.warmup_steps=0",
    "train.optim.decay=constant",
]
ROWS = 6  # prompts per replica: two micro-batches of 3


def _cfg(overrides: list[str], run_dir: str):
    from megatron_opd.config import load_config

    return load_config(None, MOE + overrides + [f"run.output_dir={run_dir}", "run.name=t"])


def _prompts(replica: int):
    from megatron_opd.data.domains import TinyDomains

    return TinyDomains(["add", "reverse", "sort"], seed=0, eval_size=0).prompts(20 * replica, ROWS)


def _micro_batches(batch, routed=None, size: int = 3):
    from megatron_opd.stages.trainer import MicroBatch

    positions = torch.arange(batch.tokens.shape[1]).expand_as(batch.tokens)
    mask = batch.prediction_mask()
    out = []
    for s in range(0, len(batch), size):
        mb = MicroBatch(batch.tokens[s : s + size], positions[s : s + size], {"mask": mask[s : s + size]})
        mb.routed_experts = None if routed is None else routed[s : s + size]
        out.append(mb)
    return out


def _next_token_logprobs(mb, logits):
    lp = torch.log_softmax(logits[:, :-1, :51].float(), -1)
    return lp.gather(-1, mb.tokens[:, 1:, None].to(lp.device)).squeeze(-1).cpu()


def _response(lp: torch.Tensor, batch) -> torch.Tensor:
    """[B, T-1] next-token log-probs -> [B, R] at the response tokens."""
    from megatron_opd.data.trajectories import gather_response

    padded = torch.cat([lp, torch.zeros(len(lp), 1)], 1)
    return gather_response(padded, batch.prompt_lens, batch.response_lens, offset=-1)


def _nll(mb, logits):
    from megatron_opd.stages.trainer import metric

    lp = torch.log_softmax(logits[:, :-1, :51].float(), -1).gather(-1, mb.tokens[:, 1:, None]).squeeze(-1)
    mask = mb.data["mask"][:, :-1]
    total, count = -(lp * mask).sum(), mask.sum()
    return total, count.to(torch.int), {"loss": metric(total, count)}


def _record(trainer, batch) -> torch.Tensor:
    """The routing the current weights choose for the batch's tokens (a plain RECORD forward)."""
    from megatron_opd.models.routing import recording

    model = trainer.module
    model.eval()
    positions = torch.arange(batch.tokens.shape[1]).expand_as(batch.tokens)
    with torch.no_grad(), recording(model) as recorder:
        model(batch.tokens, positions, None)
        routed = recorder.take(batch.tokens.shape[1], len(batch))
    model.train()
    return routed


def _ep2_worker(run_dir: str, model_dir: str) -> dict:
    from megatron.core import parallel_state

    from megatron_opd.data.tokenizer import CharTokenizer
    from megatron_opd.models.model_dir import write_model_dir
    from megatron_opd.rollout.config import SamplingParams
    from megatron_opd.rollout.embedded import generate
    from megatron_opd.runtime import checkpoint as ckpt
    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.stages.trainer import Trainer

    cfg = _cfg(["run.nproc=2", "parallel.ep=2"], run_dir)
    trainer = Trainer(cfg, init_runtime(cfg.parallel, cfg.run.seed))
    assert parallel_state.get_expert_model_parallel_world_size() == 2
    tok, model = CharTokenizer(), trainer.module
    replica = parallel_state.get_data_parallel_rank()
    prompts = _prompts(replica)
    # Different budgets per replica: the EP lockstep runs idle forwards, which record nothing.
    params = SamplingParams(max_new_tokens=8 - 3 * replica, temperature=1.0)
    out: dict = {"replica": replica}

    def sampled(kv_cache: bool, p=params, seed=5):
        gen = torch.Generator().manual_seed(seed + replica)
        return generate(model, prompts, tok, p, max_len=48, generator=gen, kv_cache=kv_cache, record_routing=True)

    cached, uncached = sampled(True), sampled(False)
    out["cache_same_tokens"] = torch.equal(cached.tokens, uncached.tokens)
    out["cache_same_routing"] = torch.equal(cached.routed_experts, uncached.routed_experts)
    batch = cached
    out["batch"] = batch
    # Greedy rollouts and the weights that made them, for the HTTP comparison.
    out["greedy"] = sampled(True, SamplingParams(max_new_tokens=8, temperature=0.0))
    if dist_rank() == 0:
        write_model_dir(model_dir, cfg.model, tok)
    ckpt.save_checkpoint(Path(model_dir) / "checkpoints", 0, trainer.model)

    def logprobs(routed):
        return _response(torch.cat(trainer.forward_only(_micro_batches(batch, routed), _next_token_logprobs)), batch)

    r0 = batch.routed_experts
    out["replayed"], out["free"] = logprobs(r0), logprobs(None)
    shuffled = r0.clone()
    shuffled[r0 >= 0] = (r0[r0 >= 0] + 1) % 4  # every choice moved to the next expert
    out["shuffled"] = logprobs(shuffled)
    # One optimizer step on the sampled tokens (replaying their routing, as GRPO's update does).
    out["metrics"] = trainer.train_step(_micro_batches(batch, r0), _nll)
    out["r1"] = _record(trainer, batch)
    out["after_replayed"], out["after_free"] = logprobs(r0), logprobs(None)
    out["after_own"] = logprobs(out["r1"])
    # Held-out evaluation with shares of 3 and 2 prompts in chunks of 2: replica 0 needs two
    # generate calls, replica 1 one, yet every forward's all-to-all needs both (a hang before).
    from megatron_opd.data.domains import TinyDomains
    from megatron_opd.rewards.registry import rewards_for
    from megatron_opd.stages.evaluation import held_out_accuracy

    source = TinyDomains(["add"], seed=0, eval_size=5)
    out["held_out"] = held_out_accuracy(model, source, tok, rewards_for(source), max_len=48, max_new_tokens=3, batch_size=2)
    return out


def dist_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


@pytest.fixture(scope="module")
def ep2(tmp_path_factory):
    root = tmp_path_factory.mktemp("keep_routing")
    model_dir = root / "model"
    ranks = spawn_world(_ep2_worker, 2, (str(root / "ep2"), str(model_dir)), timeout_s=420)
    return ranks, model_dir


def test_embedded_engine_records_routing_at_every_fed_position(ep2):
    ranks, _ = ep2
    for out in ranks:
        assert out["cache_same_tokens"] and out["cache_same_routing"], "KV-cached and prefix routing records differ"
        batch = out["batch"]
        routed = batch.routed_experts
        assert routed.dtype == torch.int32 and routed.shape == (ROWS, batch.tokens.shape[1], 2, 2)
        for i in range(ROWS):
            n = int(batch.lengths[i])
            assert (routed[i, : n - 1] >= 0).all() and (routed[i, : n - 1] < 4).all()
            assert (routed[i, n - 1 :] == -1).all()  # the last token was never fed, nor the padding
            assert (routed[i, : n - 1, :, 0] != routed[i, : n - 1, :, 1]).all()  # top-2: two distinct experts
    # Both EP ranks route to experts they do not hold: the ids are global.
    assert {int(e) for out in ranks for e in out["batch"].routed_experts.unique() if e >= 0} == {0, 1, 2, 3}
    assert ranks[0]["batch"].tokens.shape != ranks[1]["batch"].tokens.shape  # the replicas really differed


def test_replayed_routing_reproduces_the_samplers_logprobs_and_differs_after_an_update(ep2):
    ranks, _ = ep2
    for out in ranks:
        batch = out["batch"]
        mask = torch.arange(batch.max_response_len)[None] < batch.response_lens[:, None]
        err = ((out["replayed"] - batch.behavior_logprobs).abs() * mask).max().item()
        assert err < 1e-5, f"the replayed training forward is {err} away from the sampler's log-probs"
        assert ((out["free"] - batch.behavior_logprobs).abs() * mask).max().item() < 1e-5
        assert ((out["shuffled"] - batch.behavior_logprobs).abs() * mask).max().item() > 0.1, "replay had no effect"
        assert out["metrics"]["grad_norm"] > 0
        # The update moved the routers: the new weights route some of the same tokens elsewhere.
        r0, r1 = batch.routed_experts, out["r1"]
        assert r1.shape == r0.shape, f"recorded routing {tuple(r1.shape)} vs sampled {tuple(r0.shape)}"
        fed = r0[:, :, 0, 0] >= 0  # [B, T]
        changed = ((r0 != r1).any(-1).any(-1)) & fed
        assert changed.any(), "the optimizer step did not change any routing: the test would prove nothing"
        # Replaying one's own routing is the free forward.
        assert ((out["after_own"] - out["after_free"]).abs() * mask).max().item() < 1e-5
        # With the sampler's routing the new weights differ from their free forward exactly where
        # the routing changed: at predictions from the first changed position on.
        diff = (out["after_replayed"] - out["after_free"]).abs() * mask
        for i in range(len(batch)):
            p = int(batch.prompt_lens[i])
            positions = p - 1 + torch.arange(batch.max_response_len)  # where response token j is predicted
            first = changed[i].nonzero()
            if not len(first):
                assert diff[i].max().item() < 1e-5, f"row {i}: routing unchanged, yet the replay changed its log-probs"
                continue
            t = int(first[0])
            before, after = positions < t, (positions >= t) & mask[i]
            if before.any():
                assert diff[i][before].max().item() < 1e-5, f"row {i}: predictions before position {t} changed"
            if after.any():
                assert diff[i][after].max().item() > 1e-4, f"row {i}: routing changed at {t}, replay made no difference"
        assert (diff.amax(-1) > 1e-4).any()


def test_held_out_evaluation_at_ep2_with_uneven_shares_finishes(ep2):
    ranks, _ = ep2
    accs = [out["held_out"] for out in ranks]
    assert accs[0] == accs[1] and set(accs[0]) == {"acc/add", "acc/mean"}  # all-reduced over both replicas
    assert 0.0 <= accs[0]["acc/add"] <= 1.0


# -- our server over HTTP ----------------------------------------------------------------------------


def _http_worker(cfg_tree: dict, prompts_by_replica: list) -> list:
    from megatron_opd.config import JobConfig, build
    from megatron_opd.data.tokenizer import CharTokenizer
    from megatron_opd.rollout.sglang import SGLangRolloutEngine
    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.stages.trainer import Trainer

    cfg = build(JobConfig, cfg_tree)
    trainer = Trainer(cfg, init_runtime(cfg.parallel, cfg.run.seed))
    trainer.resume(None)  # loads train.init_from: the EP=2 run's weights, resharded to EP=1
    engine = SGLangRolloutEngine(cfg.rollout, trainer, CharTokenizer(), max_len=cfg.model.max_seq_len, seed=cfg.run.seed)
    try:
        return [engine.generate(prompts, 0) for prompts in prompts_by_replica]  # pushes the weights first
    finally:
        engine.close()


def _sglang_cfg(tmp_path: Path, model_dir: Path, url: str):
    from megatron_opd.config import to_dict

    cfg = _cfg(
        ["run.nproc=1", "rollout.engine=sglang", "rollout.temperature=0.0", "rollout.weight_sync=disk",
         f"train.init_from={model_dir}", f"rollout.endpoints=[{url}]"],
        str(tmp_path),
    )  # fmt: skip
    return to_dict(cfg)


def test_routed_experts_from_our_server_over_http_equal_the_in_job_ones(ep2, tmp_path):
    ranks, model_dir = ep2
    run = tmp_path / "t"
    with start_teacher_server(
        model_dir=model_dir, weights_dir=run / "rollout_weights", extra_args=["--enable-return-routed-experts"]
    ) as server:  # fmt: skip
        got = spawn_world(_http_worker, 1, (_sglang_cfg(tmp_path, model_dir, server.url), [_prompts(0), _prompts(1)]), timeout_s=300)[0]
    for out, remote in zip(ranks, got):
        local = out["greedy"]
        assert torch.equal(remote.tokens, local.tokens), "greedy tokens over HTTP differ from in-job"
        assert remote.routed_experts.shape == local.routed_experts.shape
        assert torch.equal(remote.routed_experts, local.routed_experts), "routed experts over HTTP differ from in-job"
        assert remote.weight_version == "0"


def test_a_server_without_routed_experts_is_refused_before_any_step(ep2, tmp_path):
    from megatron_opd.runtime.spawn import WorldFailed

    _, model_dir = ep2
    run = tmp_path / "t"
    with start_teacher_server(model_dir=model_dir, weights_dir=run / "rollout_weights") as server:
        with pytest.raises(WorldFailed) as failure:
            spawn_world(_http_worker, 1, (_sglang_cfg(tmp_path, model_dir, server.url), [_prompts(0)]), timeout_s=300)
    message = str(failure.value)
    assert f"rollout server at {server.url} cannot return routed experts" in message
    assert "--enable-return-routed-experts" in message and "rollout.keep_routing=false" in message
    assert not (run / "rollout_weights").exists(), "weights were pushed before the refusal"


# -- refusals ----------------------------------------------------------------------------------------


def test_keep_routing_is_refused_for_a_dense_model_and_under_context_parallelism():
    from megatron_opd.models.config import ModelConfig
    from megatron_opd.rollout.config import RolloutConfig, RolloutConfigError
    from megatron_opd.runtime.layout import ParallelLayout
    from megatron_opd.stages.run_dir import rule_for

    with pytest.raises(RolloutConfigError, match=r"rollout.keep_routing=true .* model.num_experts=0"):
        RolloutConfig(keep_routing=True).check(model=ModelConfig(), layout=ParallelLayout())
    with pytest.raises(RolloutConfigError, match=r"parallel.cp=2"):
        RolloutConfig(keep_routing=True).check(model=ModelConfig(num_experts=4), layout=ParallelLayout(cp=2))
    RolloutConfig(keep_routing=True).check(model=ModelConfig(num_experts=4), layout=ParallelLayout())
    with pytest.raises(RolloutConfigError, match="rollout.keep_routing must be true or false"):
        RolloutConfig(keep_routing="yes").check()
    assert rule_for("rollout.keep_routing")[0] == "fixed" and rule_for("rollout.keep_sampling_mask")[0] == "fixed"


def _dense_trainer_worker(run_dir: str) -> str:
    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.stages.trainer import Trainer

    cfg = _cfg(["model.num_experts=0", "model.moe_layer_freq=[]"], run_dir)
    try:
        Trainer(cfg, init_runtime(cfg.parallel, cfg.run.seed))
    except ValueError as e:
        return str(e)
    return "built"


def test_the_trainer_refuses_keep_routing_for_a_dense_model(tmp_path):
    message = spawn_world(_dense_trainer_worker, 1, (str(tmp_path),))[0]
    assert "rollout.keep_routing=true" in message and "model.num_experts=0" in message
