"""The SGLang rollout engine's first push (issue 11 item 11): the servers sample with the trainer's
weights from the very first rollout, fresh (train.init_from) and on resume.

A real OPD stage on one gloo rank, a real teacher server for the pool, and a real rollout server
started from other weights than the student's; greedy rollouts over HTTP must equal greedy
generation in-job (rollout/embedded.py) on the trainer's weights, at the first step of a fresh
run (weights from init_from) and at the first step after a resume (weights from the checkpoint,
with the previous run's newer exports still on disk).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megatron_opd.config import JobConfig, derive, load_config, to_dict
from megatron_opd.runtime.spawn import spawn_world
from megatron_opd.serving.launch import start_teacher_server

REPO = Path(__file__).resolve().parents[1]


def _make_model_dirs(root: str) -> dict[str, str]:
    from megatron_opd.data.tokenizer import CharTokenizer
    from megatron_opd.models.gpt import build_gpt_model
    from megatron_opd.models.model_dir import write_model_dir
    from megatron_opd.runtime import checkpoint as ckpt
    from megatron_opd.runtime.distributed import init_runtime, seed_everything
    from megatron_opd.runtime.layout import ParallelLayout

    cfg = load_config(REPO / "configs/tiny/opd.yaml").model
    layout = init_runtime(ParallelLayout(), 0)
    out = {}
    for i, name in enumerate(("teacher", "init", "server")):
        seed_everything(300 + i)
        # Larger weights than a fresh init: tiny random models all answer the same greedy tokens,
        # which would hide whose weights a server holds.
        model = build_gpt_model(replace(cfg, init_std=0.5), layout)
        d = write_model_dir(Path(root) / name, cfg, CharTokenizer())
        ckpt.save_checkpoint(d.checkpoints, 0, [model])
        out[name] = str(d.path)
    return out


def _first_rollout_worker(cfg_tree: dict) -> dict:
    from megatron_opd.config import build
    from megatron_opd.data.tokenizer import CharTokenizer
    from megatron_opd.rollout.embedded import generate
    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.stages.opd import OPDStage
    from megatron_opd.stages.trainer import Trainer

    cfg = build(JobConfig, cfg_tree)
    trainer = Trainer(cfg, init_runtime(cfg.parallel, cfg.run.seed))
    tok = CharTokenizer()
    stage = OPDStage(cfg, trainer, tok)
    greedy = lambda prompts: generate(trainer.module, prompts, tok, cfg.rollout.sampling, max_len=cfg.model.max_seq_len)  # noqa: E731
    try:
        before = greedy(stage.source.prompts(0, 8))  # the trainer's own random init
        resumed = trainer.resume(stage)  # what Trainer.fit does first
        start = trainer.step
        prompts = stage.source.prompts(start * cfg.train.global_batch_size, 8)
        remote = stage.engine.generate(prompts, start)
        local = greedy(prompts)
        loaded = greedy(stage.source.prompts(0, 8))
        final = trainer.fit(stage)
    finally:
        stage.close()
    return {
        "resumed": resumed,
        "start": start,
        "same": torch.equal(remote.tokens, local.tokens),
        "distinguishable": not torch.equal(before.tokens, loaded.tokens),  # else "same" would prove nothing
        "version": remote.weight_version,
        "final_step": trainer.step,
        "final": final,
    }


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return spawn_world(_make_model_dirs, 1, (str(tmp_path_factory.mktemp("models")),))[0]


def test_rollout_servers_get_the_trainers_weights_before_the_first_rollout(model_dirs, tmp_path):
    run = tmp_path / "run"
    with start_teacher_server(model_dir=model_dirs["teacher"]) as teacher, start_teacher_server(
        model_dir=model_dirs["server"], weights_dir=run / "opd" / "rollout_weights"
    ) as rollout:  # fmt: skip
        cfg = derive(
            load_config(REPO / "configs/tiny/opd.yaml"),
            ["run.nproc=1", "parallel.tp=1", "train.steps=2", "train.global_batch_size=8", "train.micro_batch_size=8",
             "train.eval_every=0", "train.eval_at_start=false", "train.checkpoint_every=1", "run.progress=none",
             "rollout.engine=sglang", "rollout.temperature=0.0", "rollout.weight_sync=disk", "data.domains=[add]"],
            **{"run.output_dir": str(run), "run.name": "opd", "train.init_from": model_dirs["init"],
               "rollout.endpoints": [rollout.url],
               "teachers": {"arith": {"endpoints": [teacher.url], "domains": ["add"], "signal": "sampled"}}},
        )  # fmt: skip
        fresh = spawn_world(_first_rollout_worker, 1, (to_dict(cfg),), timeout_s=300)[0]
        # The previous run pushed step 2 last; the resumed one pushes step 2 again, then step 3.
        resumed = spawn_world(_first_rollout_worker, 1, (to_dict(derive(cfg, ["train.steps=3"])),), timeout_s=300)[0]
    assert fresh["distinguishable"] and resumed["distinguishable"]
    assert not fresh["resumed"] and fresh["start"] == 0 and fresh["same"], "the first rollout did not use the init_from weights"
    assert fresh["version"] == "0" and fresh["final_step"] == 2
    assert resumed["resumed"] and resumed["start"] == 2 and resumed["same"], "the first rollout after resume used other weights"
    assert resumed["version"] == "2" and resumed["final_step"] == 3
    assert sorted(p.name for p in (cfg.run_dir / "rollout_weights").iterdir()) == ["step_00000003"]
