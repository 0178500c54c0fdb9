"""Students of every parallel kind: an OPD step with a PP=2 student and with an MoE student at
EP=2 equals the single-rank step on the same weights and the same rollouts (real gloo worlds).

The rollouts come from the SGLang rollout engine over real HTTP, one of our servers per world
(the embedded engine runs only at PP=1), loaded with the trainer's weights by the first push
(disk sync). Each sample is drawn with its own `sampling_seed`, so a replica's share of the
prompts samples exactly what the single rank samples for them. The teacher is one real server
with the hidden-state signal (the full-vocabulary reverse KL through the teacher's own head).
The MoE student runs with rollout.keep_routing: the server returns the routed experts
(`return_routed_experts`) and the training forward replays them through RouterReplay.

Compared: the step's KL (the loss) and every gradient by global parameter name (layers and
experts renumbered, test_parallel_equivalence's helpers).

The GRPO step is compared the same way (its loss and every gradient), on the same students and
the same server rollouts. A random student never solves add or reverse, so every group would
score 0 and every advantage vanish (a vacuous comparison): the worker grades responses with a
deterministic test reward instead (a function of the response text alone), which gives each
group different scores.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megatron_opd.config import derive, load_config, to_dict
from megatron_opd.runtime.spawn import spawn_world
from megatron_opd.serving.launch import start_teacher_server
from test_parallel_equivalence import _assert_same_grads, _grads, _merge

REPO = Path(__file__).resolve().parents[1]
DENSE = {"num_layers": 4}  # two layers per pipeline stage
MOE = {"num_layers": 2, "num_experts": 4, "moe_topk": 2, "moe_ffn_hidden_size": 64}
MODELS = {"teacher": {}, "dense": DENSE, "moe": MOE}


def _make_model_dirs(root: str) -> dict[str, str]:
    from megatron_opd.data.tokenizer import CharTokenizer
    from megatron_opd.models.gpt import build_gpt_model
    from megatron_opd.models.model_dir import write_model_dir
    from megatron_opd.runtime import checkpoint as ckpt
    from megatron_opd.runtime.distributed import init_runtime, seed_everything
    from megatron_opd.runtime.layout import ParallelLayout

    base = load_config(REPO / "configs/tiny/opd.yaml").model
    layout = init_runtime(ParallelLayout(), 0)
    out = {}
    for i, (name, changes) in enumerate(MODELS.items()):
        seed_everything(500 + i)
        cfg = replace(base, **changes)
        # Larger weights than a fresh init: peaked, input-dependent distributions and routing.
        model = build_gpt_model(replace(cfg, init_std=0.3), layout)
        d = write_model_dir(Path(root) / name, cfg, CharTokenizer())
        ckpt.save_checkpoint(d.checkpoints, 0, [model])
        out[name] = str(d.path)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    dirs = spawn_world(_make_model_dirs, 1, (str(tmp_path_factory.mktemp("models")),))[0]
    with start_teacher_server(model_dir=dirs["teacher"]) as teacher:
        yield dirs, teacher.url


def _install_graded_rewards() -> None:
    """Score add and reverse in [0, 1] from the response's characters: scores differ within a
    group, and are the same on every rank and in every world for the same response."""
    from megatron_opd.rewards import registry
    from megatron_opd.rewards.tiny import TinyDomainReward
    from megatron_opd.rewards.types import RewardResult

    class Graded(TinyDomainReward):
        def _score_one(self, sample):
            return RewardResult(score=(sum(map(ord, sample.response)) % 7) / 6.0, info={})

    for domain in ("add", "reverse"):
        registry.REWARDS[domain] = lambda d=domain: Graded(d)


def _step_worker(cfg_tree: dict) -> tuple:
    """One OPD or GRPO step's forward/backward on the first rollout: (the step's loss metric: KL
    for OPD, loss for GRPO; gradients; rollout tokens; the largest |advantage|, GRPO only)."""
    from megatron_opd.config import JobConfig, build
    from megatron_opd.data.tokenizer import CharTokenizer
    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.stages.grpo import GRPOStage
    from megatron_opd.stages.opd import OPDStage
    from megatron_opd.stages.trainer import Trainer

    cfg = build(JobConfig, cfg_tree)
    if cfg.stage == "grpo":
        _install_graded_rewards()
    trainer = Trainer(cfg, init_runtime(cfg.parallel, cfg.run.seed))
    stage = (GRPOStage if cfg.stage == "grpo" else OPDStage)(cfg, trainer, CharTokenizer())
    try:
        assert not trainer.resume(stage)  # loads train.init_from
        batch = stage.make_batch(0)  # pushes the weights, samples, scores
        metrics = trainer.forward_backward(batch.micro_batches, stage.loss, stage.forward)
        traj = stage.current.batch
        rows = {
            sid: (traj.tokens[i, : traj.lengths[i]], None if traj.routed_experts is None else traj.routed_experts[i, : traj.lengths[i]])
            for i, sid in enumerate(traj.sample_ids)
        }
        grads = _grads(trainer, cfg.model.num_layers, cfg.model.num_experts)
        if cfg.model.tie_embeddings and "output_layer.weight" in grads:
            # The last pipeline stage's copy of the tied embedding: megatron all-reduces the two
            # copies' gradients, so it must equal the first stage's (`_merge` checks).
            grads["embedding.word_embeddings.weight"] = grads.pop("output_layer.weight")
        if cfg.stage == "grpo":
            return metrics.get("loss"), grads, rows, float(stage.current.scores["advantages"].abs().max())
        return metrics["kl"], grads, rows, None
    finally:
        stage.close()


def _step(setup, tmp_path: Path, stage: str, student: str, name: str, nproc: int, *overrides: str) -> list:
    """The step of `stage` (opd or grpo) for `student` on `nproc` ranks, rollouts from a server
    of the student's weights; OPD's teacher is the setup's hidden-state server."""
    dirs, teacher_url = setup
    run = tmp_path / name
    extra = ["--enable-return-routed-experts"] if student == "moe" else []
    keys = {"run.output_dir": str(run), "run.name": stage, "train.init_from": dirs[student]}
    if stage == "opd":
        keys["teachers"] = {"expert": {"endpoints": [teacher_url], "domains": ["add", "reverse"], "signal": "hidden",
                                       "model_dir": dirs["teacher"]}}  # fmt: skip
    else:
        overrides = ("grpo.group_size=4", "rollout.max_new_tokens=6", *overrides)
    with start_teacher_server(model_dir=dirs[student], weights_dir=run / stage / "rollout_weights", extra_args=extra) as server:
        cfg = derive(
            load_config(REPO / f"configs/tiny/{stage}.yaml"),
            [f"run.nproc={nproc}", "parallel.tp=1", "train.steps=1", "train.global_batch_size=8", "train.micro_batch_size=2",
             "train.eval_every=0", "train.eval_at_start=false", "train.checkpoint_every=0", "run.progress=none",
             "rollout.engine=sglang", "rollout.weight_sync=disk", "data.domains=[add,reverse]",
             *[f"model.{k}={v}" for k, v in MODELS[student].items()], *overrides],
            **keys, **{"rollout.endpoints": [server.url]},
        )  # fmt: skip
        return spawn_world(_step_worker, nproc, (to_dict(cfg),), timeout_s=420)


def _rollouts(results) -> dict:
    """sample id -> (tokens, routed experts) over every replica's rollout (pipeline stages agree)."""
    out = {}
    for _, _, rows, _ in results:
        for sid, (tokens, routed) in rows.items():
            if sid in out:
                assert torch.equal(out[sid][0], tokens), f"ranks disagree on the rollout of {sid}"
            out[sid] = (tokens, routed)
    return out


def _assert_same_step(ref: list, got: list, tol: float) -> dict:
    """The parallel step equals the single-rank one: same rollouts, same loss metric (OPD's KL,
    GRPO's loss), same gradients; and the comparison is not vacuous (a KL, advantages and
    gradients that are not zero)."""
    same, theirs = _rollouts(ref), _rollouts(got)
    assert sorted(same) == sorted(theirs) and len(same) == 8, "the worlds sampled different prompts"
    for sid, (tokens, _) in same.items():
        assert torch.equal(tokens, theirs[sid][0]), f"sample {sid} differs between the worlds"
    value, advantage = ref[0][0], ref[0][3]
    if advantage is None:
        assert value > 1e-3, "a zero KL would make the comparison vacuous"
    else:
        assert advantage > 1e-3, "all advantages 0: the comparison would be vacuous"
    for r in got:
        if r[0] is not None:  # every rank that computed a loss
            assert abs(r[0] - value) <= tol * max(1.0, abs(value)), f"{r[0]} differs from the single rank's {value}"
    merged = _merge([(None, r[1]) for r in ref])
    assert max(float(g.abs().max()) for g in merged.values()) > 1e-4, "zero gradients: a vacuous comparison"
    _assert_same_grads(merged, _merge([(None, r[1]) for r in got]), tol)
    return same


def test_opd_step_with_a_pp2_student_equals_the_single_rank_step(setup, tmp_path):
    ref = _step(setup, tmp_path, "opd", "dense", "pp1", 1)
    got = _step(setup, tmp_path, "opd", "dense", "pp2", 2, "parallel.pp=2")
    _assert_same_step(ref, got, 1e-5)


def test_opd_step_with_an_moe_student_at_ep2_equals_the_single_rank_step(setup, tmp_path):
    # EP=2 on 2 ranks is DP=2: each replica samples and trains on 4 of the 8 rollouts with 2 of
    # the 4 experts; the single rank has all of both. Both replay the server's routed experts.
    keep = "rollout.keep_routing=true"
    ref = _step(setup, tmp_path, "opd", "moe", "ep1", 1, keep)
    got = _step(setup, tmp_path, "opd", "moe", "ep2", 2, "parallel.ep=2", keep)
    rollouts = _assert_same_step(ref, got, 1e-5)
    theirs = _rollouts(got)
    for sid, (tokens, routed) in rollouts.items():
        n = len(tokens)
        assert routed is not None and routed.shape == (n, 2, 2), f"{sid}: no routed experts from the server"
        assert (routed[: n - 1] >= 0).all() and (routed[n - 1] == -1).all()
        assert torch.equal(routed, theirs[sid][1]), f"{sid}: the server routed differently for the two worlds"


# -- GRPO ---------------------------------------------------------------------------------------


def test_grpo_step_with_a_pp2_student_equals_the_single_rank_step(setup, tmp_path):
    ref = _step(setup, tmp_path, "grpo", "dense", "pp1", 1)
    got = _step(setup, tmp_path, "grpo", "dense", "pp2", 2, "parallel.pp=2")
    _assert_same_step(ref, got, 1e-5)


def test_grpo_step_with_an_moe_student_at_ep2_equals_the_single_rank_step(setup, tmp_path):
    keep = "rollout.keep_routing=true"
    ref = _step(setup, tmp_path, "grpo", "moe", "ep1", 1, keep)
    got = _step(setup, tmp_path, "grpo", "moe", "ep2", 2, "parallel.ep=2", keep)
    rollouts = _assert_same_step(ref, got, 1e-5)
    for sid, (tokens, routed) in rollouts.items():
        assert routed is not None and routed.shape == (len(tokens), 2, 2), f"{sid}: no routed experts from the server"
