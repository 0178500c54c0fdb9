"""The trainer's forward-only pass, the shared held-out evaluation, and the on-policy skeleton
(real gloo worlds, real megatron models):

- `Trainer.forward_only` log-probs equal a plain model call, at PP=1 and through the 1F1B schedule
  at PP=2, with no gradient left behind, for the trainer's weights and for frozen reference chunks;
- evaluation decodes `rollout.max_new_tokens` tokens for SFT too (it was fixed at 8): a model
  made to always answer "3" is right on the count prompts of three letters only with a budget of 1;
- a stage on the skeleton with groups of 2 samples and 2 updates per rollout, under DP=2: prompts
  by global index, one rollout per 2 steps, old log-probs from the forward-only pass equal to the
  sampler's own, every sample trained on once, and a run killed inside a rollout resumes exactly.
"""

from __future__ import annotations


import pytest
import torch

from run_records import final_weights, step_records
from megatron_opd.runtime.spawn import WorldFailed, spawn_world

MODEL = [
    "model.vocab_size=51",
    "model.hidden_size=64",
    "model.num_layers=4",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.ffn_hidden_size=96",
    "model.max_seq_len=32",
    "model.make_vocab_size_divisible_by=8",
    "model.tie_embeddings=false",
    "run.progress=none",
]


def _trainer(overrides: list[str], run_dir: str):
    from megatron_opd.config import load_config
    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.stages.trainer import Trainer

    cfg = load_config(None, overrides + [f"run.output_dir={run_dir}", "run.name=t"])
    return cfg, Trainer(cfg, init_runtime(cfg.parallel, cfg.run.seed))


# -- forward-only ------------------------------------------------------------------------------------


def _logprobs_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    from megatron_opd.losses import vocab_parallel_logprobs

    group = parallel_state.get_tensor_model_parallel_group()
    return vocab_parallel_logprobs(logits[:, :-1], tokens[:, 1:, None], vocab_size=51, group=group).squeeze(-1)


def _forward_only_worker(pp: int, run_dir: str, ckpt_root: str):
    from megatron.core import parallel_state

    from megatron_opd.models.gpt import build_gpt_model
    from megatron_opd.runtime import checkpoint as ckpt
    from megatron_opd.stages.trainer import MicroBatch

    cfg, trainer = _trainer(MODEL + [f"parallel.pp={pp}"], run_dir)
    if pp == 1:
        ckpt.save_checkpoint(ckpt_root, 0, trainer.model)
    else:
        ckpt.load_checkpoint(ckpt.latest_complete(ckpt_root), trainer.model, load_rng=False)
    # Frozen reference weights: other model chunks of the same layout, given to forward_only.
    reference = [build_gpt_model(cfg.model, trainer.layout, dtype=trainer.dtype)]
    ckpt.load_checkpoint(ckpt.latest_complete(ckpt_root), reference, load_rng=False)
    tokens = torch.randint(3, 51, (8, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).expand(2, 16)
    mbs = [MicroBatch(tokens[i : i + 2], positions) for i in range(0, 8, 2)]  # 4 micro-batches: 1F1B warm-up and drain

    def collect(mb, logits):
        return _logprobs_of(logits, mb.tokens).cpu()

    def run(**kw):
        out = trainer.forward_only(mbs, collect, **kw)
        return torch.cat(out) if out else None

    own = run()
    left = sum(float(p.main_grad.abs().sum()) for p in trainer.module.parameters())
    training = trainer.module.training
    plain = None
    if pp == 1:
        trainer.module.eval()
        with torch.no_grad():
            plain = _logprobs_of(trainer.module(tokens, positions[:1].expand(8, 16), None), tokens)
        trainer.module.train()
    with torch.no_grad():  # the trained weights move on; the reference stays where it was
        for p in trainer.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    last = parallel_state.is_pipeline_last_stage()
    return {"own": own, "ref": run(model=reference), "moved": run(), "plain": plain, "last": last, "left": left,
            "training": training}  # fmt: skip


def test_forward_only_logprobs_equal_a_plain_call_at_pp1_and_pp2(tmp_path):
    ck = str(tmp_path / "ck")
    one = spawn_world(_forward_only_worker, 1, (1, str(tmp_path / "a"), ck))[0]
    plain = one["plain"]
    assert one["last"] and one["own"].shape == plain.shape == (8, 15)
    assert torch.allclose(one["own"], plain, atol=1e-6), (one["own"] - plain).abs().max()
    assert (plain < 0).all() and plain.std() > 0.01
    assert one["left"] == 0.0 and one["training"], "forward_only left gradients behind or the model in eval mode"
    first, second = spawn_world(_forward_only_worker, 2, (2, str(tmp_path / "b"), ck))
    assert not first["last"] and first["own"] is None and first["ref"] is None  # the first stage collects nothing
    assert second["last"] and torch.allclose(second["own"], plain, atol=1e-5), (second["own"] - plain).abs().max()
    assert first["left"] == second["left"] == 0.0
    for out in (one, second):
        assert torch.allclose(out["ref"], plain, atol=1e-5), (out["ref"] - plain).abs().max()
        assert (out["moved"] - plain).abs().max() > 1e-3  # the trainer's own weights did change


# -- evaluation's budget ----------------------------------------------------------------------------


def _always_three_worker(run_dir: str):
    """An SFT stage whose model greedily answers '3' forever: zero weights except the norms, a
    constant embedding and the output row of '3' (so the hidden state, and the logits, are constant)."""
    from megatron_opd.data.tokenizer import CharTokenizer
    from megatron_opd.stages.sft import SFTStage

    cfg, trainer = _trainer(MODEL + ["data.domains=[count]", "data.eval_size=80", "rollout.max_new_tokens=1"], run_dir)
    tok = CharTokenizer()
    with torch.no_grad():
        for name, p in trainer.module.named_parameters():
            p.fill_(1.0 if "norm" in name or "word_embeddings" in name else 0.0)
        trainer.module.output_layer.weight[tok.encode("3")[0]] = 1.0
    stage = SFTStage(cfg, trainer, tok)
    threes = sum(len(p.text) == len("n:abc=") for p in stage.source.eval_prompts("count"))
    return stage.evaluate(0), threes / cfg.data.eval_size


def test_sft_evaluates_with_the_configs_response_budget(tmp_path):
    acc, expected = spawn_world(_always_three_worker, 1, (str(tmp_path),))[0]
    assert expected > 0.0
    assert acc["acc/count"] == pytest.approx(expected), acc  # decoded "3", not "33333333"


# -- the skeleton: groups, several updates per rollout, resume inside a rollout ---------------------


def _toy_stage_class():
    from megatron_opd.data.trajectories import gather_response
    from megatron_opd.losses import vocab_parallel_logprobs
    from megatron_opd.stages.on_policy import OnPolicyStage, Rollout
    from megatron_opd.stages.trainer import MicroBatch, logits_forward, metric

    class ReweightedSelfSFT(OnPolicyStage):
        """A small stage on the skeleton: likelihood of the student's own samples weighted by
        (1 + reward) and by the importance ratio to the weights that sampled them, whose
        log-probs come from a forward-only pass when the rollout is made."""

        name = "toy"
        progress_keys = ["loss"]
        finite_metrics = ["loss"]
        forward = staticmethod(logits_forward)

        def score(self, rollout: Rollout) -> torch.Tensor:
            batch = rollout.batch
            old = self.rollout_logprobs(batch)  # [B, T - 1], from a forward-only pass
            # The sampler's behaviour log-probs at the same response tokens (embedded engine, T=1).
            at_response = gather_response(old, batch.prompt_lens, batch.response_lens, offset=-1)
            keep = torch.arange(batch.max_response_len)[None, :] < batch.response_lens[:, None]
            rollout.metrics["old_vs_sampler"] = float((at_response - batch.behavior_logprobs)[keep].abs().max())
            return old

        def micro_batches(self, rollout: Rollout, rows: range) -> list[MicroBatch]:
            batch = rollout.batch
            mask = batch.prediction_mask()[:, :-1]
            weight = 1.0 + batch.rewards
            return self.row_micro_batches(
                batch, rows, lambda r: {"old": rollout.scores[r.start : r.stop], "mask": mask[r.start : r.stop],
                                        "weight": weight[r.start : r.stop]},
            )  # fmt: skip

        def loss(self, mb: MicroBatch, logits: torch.Tensor):
            lp = vocab_parallel_logprobs(
                logits[:, :-1], mb.tokens[:, 1:, None], vocab_size=self.tokenizer.vocab_size, group=self.tp_group
            ).squeeze(-1)
            mask = mb.host["mask"].to(lp.device)
            ratio = (lp - mb.host["old"].to(lp.device)).exp()
            total = -(ratio * mb.host["weight"].to(lp.device)[:, None] * mask).sum()
            count = mask.sum()
            ratio_sum = (ratio.detach() * mask).sum()
            return total, count.to(torch.int), {"loss": metric(total, count), "ratio": metric(ratio_sum, count)}

    return ReweightedSelfSFT


TOY = MODEL + [
    "model.num_layers=2",
    "data.domains=[add,reverse]",
    "rollout.max_new_tokens=5",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.steps=4",
    "train.eval_every=0",
    "train.optim.lr=1e-2",
    "train.optim.warmup_steps=0",
    "train.optim.decay=constant",
    "run.log_every=1",
]


def _toy_worker(overrides: list[str], run_dir: str):
    from megatron_opd.data.tokenizer import CharTokenizer

    cfg, trainer = _trainer(TOY + overrides, run_dir)
    stage = _toy_stage_class()(cfg, trainer, CharTokenizer(), group_size=2, updates_per_rollout=2)
    try:
        trainer.fit(stage)
    finally:
        stage.close()
    groups = [stage.current.batch.tokens[i : i + 2] for i in range(0, len(stage.current.batch), 2)]
    return trainer.dp_size, sum(not torch.equal(g[0], g[1]) for g in groups)


def test_skeleton_groups_updates_per_rollout_and_resume_inside_a_rollout(tmp_path):
    from megatron_opd.data.domains import TinyDomains
    from megatron_opd.stages.trainer import read_ledger

    straight = tmp_path / "straight"
    (dp, distinct_groups), _ = spawn_world(_toy_worker, 2, ([], str(straight)), timeout_s=300)
    assert dp == 2 and distinct_groups > 0  # a group's samples are sampled separately
    rec = step_records(straight / "t")
    assert sorted(rec) == [1, 2, 3, 4]
    # One rollout per two optimizer steps: its metrics come with its first update.
    assert [("train/rollout_acc" in rec[s]) for s in (1, 2, 3, 4)] == [True, False, True, False]
    for s in (1, 3):
        assert rec[s]["train/old_vs_sampler"] <= 2e-5, "forward-only log-probs differ from the sampler's"
        assert rec[s]["train/ratio"] == pytest.approx(1.0, abs=1e-5)  # first update: the sampling weights
    for s in (2, 4):
        assert abs(rec[s]["train/ratio"] - 1.0) > 1e-4  # later updates are off-policy
    # Prompts by global index: rollout k holds prompts [8k, 8k + 8), replica d the d-th half, each twice.
    source = TinyDomains(["add", "reverse"], seed=0, eval_size=200)
    ledger = read_ledger(straight / "t")
    assert [e["step"] for e in ledger] == [1, 2, 3, 4]
    expected = []
    for step in range(4):
        k, u = divmod(step, 2)
        for d in range(2):
            prompts = [p for i in range(8 * k + 4 * d, 8 * k + 4 * d + 4) for p in [source.prompt(i)] * 2]
            rows = range(4 * u, 4 * u + 4)
            expected.append([f"{prompts[r].sample_id}/{r % 2}" for r in rows])
    assert [e["samples"] for e in ledger] == [expected[2 * s] + expected[2 * s + 1] for s in range(4)]

    # Killed after step 4, resumed from the checkpoint at step 3, inside rollout 1.
    killed = tmp_path / "killed"
    with pytest.raises(WorldFailed, match="exit code 17"):
        spawn_world(
            _toy_worker, 2, (["train.checkpoint_every=3"], str(killed)), timeout_s=300, env={"MEGATRON_OPD_FAULT": "exit:1:4"}
        )
    spawn_world(_toy_worker, 2, (["train.checkpoint_every=3"], str(killed)), timeout_s=300)
    again = step_records(killed / "t")
    for s in (1, 2, 3, 4):
        assert again[s]["train/loss"] == pytest.approx(rec[s]["train/loss"], abs=1e-6), s
    assert [e["samples"] for e in read_ledger(killed / "t")] == [e["samples"] for e in ledger]
    wa, wb = final_weights(straight / "t"), final_weights(killed / "t")
    assert wa.keys() == wb.keys() and len(wa) > 5
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
