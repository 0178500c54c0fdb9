"""The GRPO stage (stages/grpo.py) in real gloo worlds with real megatron models.

- one GRPO step at TP=2 equals TP=1 with the same weights and the same rollout (loss, every
  metric, every gradient), on full-vocabulary log-probs and on kept-set log-probs (top-k/top-p);
  the reference log-probs come from the frozen initial weights (checked against an independent
  float64 forward of those weights, after the trained weights moved on);
- a run with 2 updates per rollout batch, dynamic sampling and a KL to the reference under DP=2:
  ratios are 1 on each rollout's first update and not on its second, all-equal groups are
  dropped and refilled from the rollout's own prompt batches, and a rank killed mid-run resumes
  (from a checkpoint inside a refilled rollout) with identical losses, weights and sample ledger;
- bad input fails before any step: group size 1, kl_coef > 0 with no reference weights (through
  JobConfig.check: `megatron-opd train` exits 2 with one line), a NaN reward (naming the
  sample), an unknown verifier (naming the domain and the closest name), a rollout without the
  kept sets the keep-sampling mask needs (naming rollout.engine).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_opd.config import ConfigError, JobConfig, derive, load_config, to_dict
from run_records import final_weights, step_records
from megatron_opd.runtime.spawn import WorldFailed, spawn_world
from megatron_opd.stages.trainer import read_ledger

REPO = Path(__file__).resolve().parents[1]

MODEL = [
    "model.vocab_size=51",
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.ffn_hidden_size=96",
    "model.max_seq_len=32",
    "model.make_vocab_size_divisible_by=8",
    "model.tie_embeddings=false",
    "run.progress=none",
    "run.log_every=1",
    "data.domains=[count,add]",
    "data.eval_size=16",
    "train.eval_every=0",
    "train.optim.warmup_steps=0",
    "train.optim.decay=constant",
]
# After the short warm start, count is right now and then (some groups with an advantage); add
# never is (all-zero groups: what dynamic sampling drops).
GRPO = MODEL + [
    "stage=grpo",
    "rollout.max_new_tokens=3",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
    "grpo.group_size=4",
    "grpo.eps_high=0.28",
]


def _cfg(overrides: list[str], run_dir: str | Path, name: str = "t") -> JobConfig:
    return load_config(None, overrides + [f"run.output_dir={run_dir}", f"run.name={name}"])


def _run(cfg_tree: dict):
    from megatron_opd.stages.launch import _rank_entry

    return _rank_entry(cfg_tree)


@pytest.fixture(scope="module")
def warm_start(tmp_path_factory) -> Path:
    """A short SFT run of the test model on count and add: the warm start (and the reference)."""
    cfg = _cfg(MODEL + ["stage=sft", "train.steps=30", "train.global_batch_size=64", "train.micro_batch_size=64",
                        "train.optim.lr=3e-3"], tmp_path_factory.mktemp("warm"), "sft")  # fmt: skip
    spawn_world(_run, 1, (to_dict(cfg),), timeout_s=300)
    return cfg.run_dir


# -- one step: TP=2 equals TP=1 -------------------------------------------------------------------


def _step_worker(tp: int, cfg_trees: dict, ck: str, reference_grads: dict | None):
    """TP=1 (reference_grads None): sample each case's rollout with the warm-start weights (also
    the frozen reference), move the weights, save them and the rollouts. TP=2: load them. Both
    score the same rollout and run one forward/backward with the moved weights."""
    from megatron.core import parallel_state, tensor_parallel

    from megatron_opd.config import build
    from megatron_opd.data.tokenizer import CharTokenizer
    from megatron_opd.models.full_weights import tp_shard
    from megatron_opd.runtime import checkpoint as ckpt
    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.stages.grpo import GRPOStage
    from megatron_opd.stages.on_policy import _rollout_from_state, _rollout_state
    from megatron_opd.stages.trainer import Trainer

    cfgs = {name: build(JobConfig, tree) for name, tree in cfg_trees.items()}
    first = next(iter(cfgs.values()))
    trainer = Trainer(first, init_runtime(first.parallel, first.run.seed))
    tok = CharTokenizer()
    out = {}
    for name, cfg in cfgs.items():
        stage = GRPOStage(cfg, trainer, tok)
        if tp == 1:
            if name == next(iter(cfgs)):
                trainer.load_weights(cfg.train.init_from)
            rollout = stage.sample(0)
            # The initial weights' own log-probs of the sampled tokens, float64 from the gathered
            # logits (renormalised over the kept sets where the rollout has them).
            batch = rollout.batch
            with torch.no_grad():
                positions = torch.arange(batch.tokens.shape[1]).expand_as(batch.tokens)
                logits = trainer.module(batch.tokens, positions, None)[..., : tok.vocab_size].double()
            plain = torch.zeros(len(batch), batch.max_response_len, dtype=torch.float64)
            for i in range(len(batch)):
                p, n = int(batch.prompt_lens[i]), int(batch.response_lens[i])
                z = logits[i, p - 1 : p - 1 + n] / cfg.rollout.temperature
                if batch.kept_ids is not None:
                    kept = batch.kept_ids[i, :n]
                    z = torch.where(torch.zeros_like(z, dtype=torch.bool).scatter_(1, kept.clamp(min=0), kept >= 0), z, -torch.inf)
                plain[i, :n] = torch.log_softmax(z, -1).gather(1, batch.tokens[i, p : p + n, None]).squeeze(1)
            out[f"{name}/initial_logprobs"] = plain
            torch.save(_rollout_state(rollout), f"{ck}/{name}.pt")
            if name == next(reversed(cfgs)):
                with torch.no_grad():  # the policy moves away from the reference and the sampler
                    gen = torch.Generator().manual_seed(5)
                    for p in trainer.module.parameters():
                        p.add_(0.03 * torch.randn(p.shape, generator=gen))
                ckpt.save_checkpoint(f"{ck}/policy", 0, trainer.model)
        elif name == next(iter(cfgs)):
            ckpt.load_checkpoint(ckpt.latest_complete(f"{ck}/policy"), trainer.model, load_rng=False)
    for name, cfg in cfgs.items():
        stage = GRPOStage(cfg, trainer, tok)
        rollout = _rollout_from_state(torch.load(f"{ck}/{name}.pt", weights_only=True))
        rollout.scores = stage.score(rollout)
        stage.current = rollout
        step = stage.make_batch(0)
        metrics = trainer.forward_backward(step.micro_batches, stage.loss, stage.forward)
        out[f"{name}/metrics"] = metrics
        out[f"{name}/ref"] = rollout.scores["ref"]
        out[f"{name}/kept"] = rollout.batch.kept_ids is not None
        grads = {n: p.main_grad.detach().clone() for n, p in trainer.module.named_parameters()}
        if reference_grads is None:
            out[f"{name}/grads"] = grads
        else:
            rank = parallel_state.get_tensor_model_parallel_rank()
            params = dict(trainer.module.named_parameters())
            out[f"{name}/grad_diff"] = max(
                float((g - tp_shard(n, params[n], _vocab_padded(reference_grads[name][n], params[n], tp), rank, tp)).abs().max())
                for n, g in grads.items()
            )
        stage.close()
    del tensor_parallel
    return out


def _vocab_padded(full: torch.Tensor, param: torch.nn.Parameter, tp: int) -> torch.Tensor:
    """A TP=1 gradient of a vocabulary-sized parameter, zero-padded to the TP=`tp` padded
    vocabulary (padding rows are never looked up nor scored: their gradient is 0 at any TP)."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    rows = param.shape[dim] * tp
    if full.shape[dim] >= rows:
        return full
    pad = list(full.shape)
    pad[dim] = rows - full.shape[dim]
    return torch.cat([full, full.new_zeros(pad)], dim=dim)


def test_grpo_step_tp2_equals_tp1_and_the_reference_is_the_initial_model(warm_start, tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    # 8 groups: the short warm start gets count right now and then, so some groups have an advantage.
    base = GRPO + [f"train.init_from={warm_start}", "grpo.kl_coef=0.05", "grpo.opsm_delta=0.0", "grpo.advantage_scale=std",
                   "train.global_batch_size=32", "train.micro_batch_size=8"]  # fmt: skip
    cases = {
        "full": _cfg(base, tmp_path / "a"),
        "kept": _cfg(base + ["rollout.top_k=12", "rollout.top_p=0.9", "grpo.aggregation=sequence"], tmp_path / "a"),
    }
    one = spawn_world(_step_worker, 1, (1, {n: to_dict(c) for n, c in cases.items()}, str(ck), None), timeout_s=300)[0]
    grads = {name: one.pop(f"{name}/grads") for name in cases}
    tp2 = {n: to_dict(derive(c, ["parallel.tp=2", "run.nproc=2", f"run.output_dir={tmp_path / 'b'}"])) for n, c in cases.items()}
    two = spawn_world(_step_worker, 2, (2, tp2, str(ck), grads), timeout_s=300)
    assert not one["full/kept"] and one["kept/kept"], "the top-k/top-p rollout must carry kept sets"
    for name in cases:
        m1, m2 = one[f"{name}/metrics"], two[0][f"{name}/metrics"]
        assert two[1][f"{name}/metrics"] == m2  # both TP ranks report the same
        assert set(m1) == set(m2) and {"loss", "kl", "entropy", "ratio", "clip_low", "clip_high", "opsm_masked",
                                       "entropy/count", "kl/add"} <= set(m1)  # fmt: skip
        for k in m1:
            assert abs(m1[k] - m2[k]) <= 1e-5 * max(1.0, abs(m1[k])), (name, k, m1[k], m2[k])
        # The step is off-policy (the weights moved after sampling): ratios, clipping, masking.
        assert abs(m1["ratio"] - 1.0) > 1e-3 and m1["clip_low"] + m1["clip_high"] > 0 and m1["kl"] > 1e-4, m1
        assert m1["opsm_masked"] > 0, m1
        for rank in (0, 1):
            assert two[rank][f"{name}/grad_diff"] <= 1e-6, (name, rank, two[rank][f"{name}/grad_diff"])
        assert max(float(g.abs().max()) for g in grads[name].values()) > 1e-4
        # The reference log-probs are the initial weights' (the trainer's had moved on), at both TPs.
        initial, ref1, ref2 = one[f"{name}/initial_logprobs"], one[f"{name}/ref"], two[0][f"{name}/ref"]
        assert ref1.shape == initial.shape and initial.abs().sum() > 0
        assert torch.allclose(ref1.double(), initial, atol=1e-5), (ref1.double() - initial).abs().max()
        assert torch.allclose(ref2, ref1, atol=1e-5)


# -- a run: updates per batch, dynamic sampling, a rank killed mid-run ----------------------------


def _run_with_lenient_count(cfg_tree: dict):
    """`_run` with count verified leniently (an answer within 1 of the count scores 1): the short
    warm start gets count exactly right too rarely for every rollout to have groups with an
    advantage, and this run needs both kinds of group (add's stay all wrong)."""
    from megatron_opd.rewards import registry
    from megatron_opd.rewards.tiny import TinyDomainReward
    from megatron_opd.rewards.types import RewardResult

    class LenientCount(TinyDomainReward):
        def _score_one(self, sample):
            expected = self.domain.solve(sample.prompt)
            close = sample.response.isdigit() and abs(int(sample.response) - int(expected)) <= 1
            return RewardResult(score=1.0 if close else 0.0, info={"expected": expected})

    registry.REWARDS["count"] = lambda: LenientCount("count")
    return _run(cfg_tree)


def _run_job(warm_start: Path, run_dir: Path, *extra: str) -> JobConfig:
    return _cfg(GRPO + [
        f"train.init_from={warm_start}", "run.nproc=2", "train.steps=6", "train.checkpoint_every=3",
        "train.optim.lr=3e-3", "grpo.updates_per_batch=2", "grpo.dynamic_sampling=true", "grpo.refill_rounds=2",
        "grpo.kl_coef=0.05", *extra,
    ], run_dir, "grpo")  # fmt: skip


def test_updates_per_batch_dynamic_sampling_and_a_killed_rank_resumes_exactly(warm_start, tmp_path):
    from megatron_opd.data.domains import TinyDomains

    straight = _run_job(warm_start, tmp_path / "straight")
    spawn_world(_run_with_lenient_count, 2, (to_dict(straight),), timeout_s=600)
    rec = step_records(straight.run_dir)
    train = {s: r for s, r in rec.items() if "train/loss" in r}
    assert sorted(train) == [1, 2, 3, 4, 5, 6]
    # Each rollout feeds 2 updates: the first on-policy, the second not.
    for s in (1, 3, 5):
        assert train[s]["train/ratio"] == pytest.approx(1.0, abs=2e-5), (s, train[s]["train/ratio"])
        assert "train/dynamic/dropped_frac" in train[s] and "train/reward/count" in train[s]
    for s in (2, 4, 6):
        assert abs(train[s]["train/ratio"] - 1.0) > 1e-4, (s, train[s]["train/ratio"])
    assert all(train[s]["train/kl"] == train[s]["train/kl"] for s in train)
    # The first update's policy is the reference (the same initial weights): KL 0; then it leaves it.
    assert abs(train[1]["train/kl"]) < 1e-7 and train[6]["train/kl"] > 1e-4, (train[1]["train/kl"], train[6]["train/kl"])
    # add's groups (all wrong) are dropped; refills come from the rollout's own prompt batches
    # (rollout k reads batches 3k, 3k + 1, 3k + 2 of 4 prompts), each sample trained on once.
    assert all(train[s]["train/dynamic/dropped_frac"] > 0 for s in (1, 3, 5))
    ledger = read_ledger(straight.run_dir)
    samples = [i for e in ledger for i in e["samples"]]
    assert len(samples) == len(set(samples)) == 6 * 8, "a sample was lost or repeated"
    prompt_index = {int(i.split("/")[1]) for i in samples}
    rollout_of = {i: i // 12 for i in prompt_index}
    assert any(i % 12 >= 4 for i in prompt_index), "no refill prompt was trained on"
    for step, entry in enumerate(ledger):
        assert {rollout_of[int(i.split("/")[1])] for i in entry["samples"]} == {step // 2}
    source = TinyDomains(["count", "add"], seed=0, eval_size=16)
    for i in samples:
        index, k = int(i.split("/")[1]), int(i.split("/")[2])
        assert i == f"{source.prompt(index).sample_id}/{k}"
    trained_add = sum(i.startswith("add/") for i in samples)
    assert trained_add < sum(i.startswith("count/") for i in samples)

    # Killed after step 5, resumed from the checkpoint at step 3, inside rollout 1 (refilled).
    killed = _run_job(warm_start, tmp_path / "killed")
    with pytest.raises(WorldFailed, match="exit code 17"):
        spawn_world(_run_with_lenient_count, 2, (to_dict(killed),), timeout_s=600, env={"MEGATRON_OPD_FAULT": "exit:1:5"})
    spawn_world(_run_with_lenient_count, 2, (to_dict(killed),), timeout_s=600)
    again = {s: r for s, r in step_records(killed.run_dir).items() if "train/loss" in r}
    assert sorted(again) == sorted(train)
    for s in train:
        for k in ("train/loss", "train/kl", "train/ratio", "train/entropy"):
            assert again[s][k] == pytest.approx(train[s][k], abs=1e-6), (s, k)
        if "train/dynamic/dropped_frac" in train[s]:
            assert again[s]["train/dynamic/dropped_frac"] == train[s]["train/dynamic/dropped_frac"]
    assert [e["samples"] for e in read_ledger(killed.run_dir)] == [e["samples"] for e in ledger]
    wa, wb = final_weights(straight.run_dir), final_weights(killed.run_dir)
    assert wa.keys() == wb.keys() and len(wa) > 5
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k


def _reduce_worker() -> dict[str, float]:
    import torch.distributed as dist

    from megatron_opd.stages.trainer import Trainer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # Replica 0's rows are all count, replica 1's all add: each reports only its own domain.
    mine = {"kl": torch.tensor([1.0 + rank, 1.0], dtype=torch.float64)}
    mine[f"kl/{['count', 'add'][rank]}"] = torch.tensor([10.0 * (rank + 1), 2.0], dtype=torch.float64)
    return Trainer.reduce_reports(None, [mine])  # it reads no trainer state


def test_replicas_reporting_different_metric_names_reduce_name_by_name():
    out = spawn_world(_reduce_worker, 2, (), timeout_s=120)
    assert out[0] == out[1] == {"kl": 1.5, "kl/count": 5.0, "kl/add": 10.0}


def test_grpo_samples_through_the_sglang_engine_from_a_real_server(warm_start, tmp_path):
    """GRPO with rollout.engine=sglang against our embedded SGLang-compatible server on 127.0.0.1,
    which starts with random weights: the trainer pushes the warm start before the first rollout
    and its weights after every step (disk sync), so each rollout's first update is on-policy
    (ratio 1: the server's log-probs of its own samples equal the trainer's) and the server ends
    on the last step's weights."""
    from megatron_opd.serving.launch import start_teacher_server

    run = tmp_path / "runs"
    with start_teacher_server(model_dir=str(warm_start), random_init=True, weights_dir=run / "grpo" / "rollout_weights") as server:
        cfg = _cfg(GRPO + [f"train.init_from={warm_start}", "run.nproc=1", "train.steps=2", "rollout.engine=sglang",
                           "rollout.weight_sync=disk", "train.checkpoint_every=0"], run, "grpo")  # fmt: skip
        cfg = derive(cfg, **{"rollout.endpoints": [server.url]})
        spawn_world(_run, 1, (to_dict(cfg),), timeout_s=400)
    train = {s: r for s, r in step_records(cfg.run_dir).items() if "train/loss" in r}
    assert sorted(train) == [1, 2]
    for s in (1, 2):
        assert train[s]["train/ratio"] == pytest.approx(1.0, abs=1e-4), (s, train[s]["train/ratio"])
        assert "train/reward/count" in train[s] and train[s]["train/rollout_tokens_per_s"] > 0
    assert sorted(p.name for p in (cfg.run_dir / "rollout_weights").iterdir()) == ["step_00000002"]


# -- bad input, before any step -------------------------------------------------------------------


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_config_errors_name_the_key_before_any_rank_starts(tmp_path):
    grpo = REPO / "configs/tiny/grpo.yaml"
    cases = {
        "grpo.group_size=1": "grpo.group_size=1: GRPO compares the samples of one prompt",
        "grpo.kl_coef=0.1": "grpo.kl_coef=0.1 > 0 needs reference weights",
        "rollout.temperature=0.0": "GRPO needs rollout.temperature > 0",
        "grpo.updates_per_batch=3": "does not split into groups of grpo.group_size=8",
        "grpo.eps_low=1.0": "grpo.eps_low must be in [0, 1)",
        "grpo.refill_rounds=0": "grpo.refill_rounds=0",
    }
    extra = {"grpo.kl_coef=0.1": ["train.init_from="], "grpo.refill_rounds=0": ["grpo.dynamic_sampling=true"],
             "grpo.updates_per_batch=3": ["train.global_batch_size=12", "train.micro_batch_size=12"]}  # fmt: skip
    for override, message in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config(grpo, [override, *extra.get(override, [])]).check()
        assert message in str(info.value) and "\n" not in str(info.value), (override, str(info.value))
    load_config(grpo).check()  # the shipped config itself is fine
    load_config(grpo, ["grpo.kl_coef=0.1"]).check()  # its warm start is the reference
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "megatron_opd.cli", "train", str(grpo), "grpo.group_size=1"],
                            capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert _one_line_error(result).startswith("error: grpo.group_size=1: GRPO compares the samples of one prompt")
    assert not (tmp_path / "runs").exists()


def _bad_input_worker(cfg_tree: dict, case: str) -> str:
    from megatron_opd.config import build
    from megatron_opd.data.domains import TinyDomains
    from megatron_opd.data.tokenizer import CharTokenizer
    from megatron_opd.rewards import registry
    from megatron_opd.rewards.tiny import TinyDomainReward
    from megatron_opd.rewards.types import RewardResult
    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.stages.grpo import GRPOStage
    from megatron_opd.stages.trainer import Trainer

    class NaNOnce(TinyDomainReward):
        """A broken verifier: its third sample scores NaN."""

        def score(self, samples):
            results = super().score(samples)
            results[2] = RewardResult(score=float("nan"))
            return results

    if case == "nan":
        registry.REWARDS["count"] = lambda: NaNOnce("count")
    if case == "unknown":
        TinyDomains.reward_name = lambda self, domain: "cuont" if domain == "count" else domain
    cfg = build(JobConfig, cfg_tree)
    trainer = Trainer(cfg, init_runtime(cfg.parallel, cfg.run.seed))
    stage = None
    try:
        stage = GRPOStage(cfg, trainer, CharTokenizer())
        trainer.fit(stage)
        return "no error"
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        return f"{type(e).__name__}: {e} (trainer at step {trainer.step})"
    finally:
        if stage is not None:
            stage.close()


def test_a_nan_reward_and_an_unknown_verifier_fail_before_any_step(tmp_path):
    cfg = _cfg(GRPO + ["train.steps=2"], tmp_path)
    nan = spawn_world(_bad_input_worker, 1, (to_dict(cfg), "nan"), timeout_s=300)[0]
    assert nan.startswith("RewardError: reward 'count' scored sample 'count/0/2' (domain 'count') nan"), nan
    assert nan.endswith("(trainer at step 0)")
    assert not (cfg.run_dir / "metrics.jsonl").exists() or "train/" not in (cfg.run_dir / "metrics.jsonl").read_text()
    unknown = spawn_world(_bad_input_worker, 1, (to_dict(_cfg(GRPO, tmp_path, "u")), "unknown"), timeout_s=300)[0]
    assert unknown.startswith(
        "ValueError: the verifier of domain 'count': unknown reward 'cuont'; did you mean 'count'?"
    ), unknown
    assert unknown.endswith("(trainer at step 0)")


def test_a_rollout_without_the_kept_sets_the_mask_needs_names_the_engine():
    from megatron_opd.data.trajectories import Trajectories
    from megatron_opd.rollout.config import SamplingParams
    from megatron_opd.stages.grpo import old_policy

    batch = Trajectories(
        tokens=torch.tensor([[1, 5, 6, 2]]), lengths=torch.tensor([4]), prompt_lens=torch.tensor([2]),
        domain=["add"], sample_ids=["add/0/0"], behavior_logprobs=torch.tensor([[-0.5, -0.1]]),
    )  # fmt: skip
    truncating = SamplingParams(temperature=1.0, top_p=0.9)
    with pytest.raises(RuntimeError, match=r"rollout.engine=sglang returned no kept sets.*grpo.keep_sampling_mask=false"):
        old_policy(batch, truncating, keep_sampling_mask=True, engine="sglang")
    # Without truncation there is nothing to keep; with the mask off the full-vocabulary log-probs.
    for params, mask in ((SamplingParams(temperature=1.0), True), (truncating, False)):
        old, kept = old_policy(batch, params, keep_sampling_mask=mask, engine="sglang")
        assert kept is None and torch.equal(old, batch.behavior_logprobs)
    batch.kept_ids, batch.kept_logprobs = torch.tensor([[[5, 7], [6, -1]]]), torch.tensor([[-0.2, 0.0]])
    old, kept = old_policy(batch, truncating, keep_sampling_mask=True, engine="embedded")
    assert torch.equal(old, batch.kept_logprobs) and torch.equal(kept, batch.kept_ids)
