"""In-job teachers (teachers.<name>.placement: in_job): megatron models loaded on demand inside
the training job, scheduled by teacher, against the server path over real HTTP.

- for the same trajectories and weights, the in-job hidden states and the loss (and its
  gradients) equal the server path's, at TP=1 and TP=2; the order teachers run in does not change
  them; a batch of one teacher's samples loads that teacher only;
- peak memory of the trainer ranks with one resident teacher does not grow with the number of
  teachers (spawned worlds, peak RSS; see `test_peak_memory_does_not_grow_with_teachers`);
- a rank killed mid-run resumes exactly, and the steps it redoes read their signals from the
  store: no teacher forward is recomputed for them;
- bad input (missing or corrupt checkpoint, another tokenizer or vocabulary, config errors) fails
  before any step, naming the teacher.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_opd.config import ConfigError, JobConfig, derive, to_dict
from megatron_opd.runtime.spawn import WorldFailed, spawn_world
from megatron_opd.stages.trainer import read_ledger
from test_opd import DOMAINS, _expect_failure, _final_weights, _job, _per_step, _run, teachers  # noqa: F401 (fixture)


def _in_job(cfg: JobConfig, names=tuple(DOMAINS), *overrides: str) -> JobConfig:
    changes = {}
    for name in names:
        changes[f"teachers.{name}.placement"] = "in_job"
        changes[f"teachers.{name}.endpoints"] = []
    return derive(cfg, list(overrides), **changes)


# -- exactness against the server path -------------------------------------------------------------


def _equality_worker(cfg_tree: dict, extra: bool):
    from dataclasses import replace

    from megatron_opd.config import build
    from megatron_opd.data.tokenizer import CharTokenizer
    from megatron_opd.models.weights import resident_bytes
    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.stages.on_policy import Rollout
    from megatron_opd.stages.opd import OPDStage
    from megatron_opd.stages.trainer import Trainer

    cfg = build(JobConfig, cfg_tree)
    trainer = Trainer(cfg, init_runtime(cfg.parallel, cfg.run.seed))
    tok = CharTokenizer()
    served = OPDStage(cfg, trainer, tok)
    in_job = OPDStage(_in_job(cfg), trainer, tok)
    batch = served.make_batch(0)  # the rollout, scored by the servers
    rollout = served.current

    def loss_and_grads(stage, signals):
        mbs = stage.micro_batches(replace(rollout, scores=signals), range(len(rollout.batch)))
        metrics = trainer.forward_backward(mbs, stage.loss, stage.forward)
        return metrics["kl"], torch.cat([p.main_grad.flatten().clone() for p in trainer.module.parameters()])

    server_signals = rollout.scores
    job_signals = in_job.score(rollout)
    out = {
        "server": (server_signals, *loss_and_grads(served, server_signals)),
        "in_job": (job_signals, *loss_and_grads(in_job, job_signals)),
        "first_order": list(in_job.in_job.last_stats.order),
        "first_loads": list(in_job.in_job.last_stats.loads),
    }
    if extra:
        # The same batch again: the resident teacher now runs first; the signals must not change.
        again = in_job.score(rollout)
        out["second_order"] = list(in_job.in_job.last_stats.order)
        out["second_loads"] = list(in_job.in_job.last_stats.loads)
        out["again"] = again
        # A batch whose samples all belong to one teacher loads that one only (a fresh scorer).
        fresh = in_job._start_in_job({n: in_job.cfg.teachers[n] for n in in_job.in_job_teachers})
        rows = [i for i, d in enumerate(rollout.batch.domain) if d == "sort"]
        part = rollout.batch.select(rows)
        one = Rollout(0, [rollout.prompts[i] for i in rows], part)
        in_job.in_job, kept = fresh, in_job.in_job
        single = in_job.score(one)
        out["single"] = ([s.teacher for s in single], list(fresh.load_log), {n: resident_bytes(t.model) for n, t in fresh.teachers.items()})
        fresh.close()
        in_job.in_job = kept
    for stage in (served, in_job):
        stage.close()
    return out


def _by_teacher(signals):
    return {s.teacher: s for s in signals}


@pytest.mark.parametrize("tp", [1, 2])
def test_in_job_signals_and_loss_equal_the_server_path(teachers, tmp_path, tp):
    cfg = _job(teachers, tmp_path, f"run.nproc={tp}", f"parallel.tp={tp}", "model.tie_embeddings=false")
    out = spawn_world(_equality_worker, tp, (to_dict(cfg), tp == 2), timeout_s=300)
    res = out[0]
    server, in_job = _by_teacher(res["server"][0]), _by_teacher(res["in_job"][0])
    assert sorted(server) == sorted(in_job) == sorted(DOMAINS)
    assert [s.teacher for s in res["server"][0]] == [s.teacher for s in res["in_job"][0]]  # same order
    for name in DOMAINS:
        a, b = server[name], in_job[name]
        assert torch.equal(a.rows, b.rows) and torch.equal(a.response_lens, b.response_lens)
        assert b.kind == "hidden" and b.hidden.dtype == torch.float32
        for i, n in enumerate(a.response_lens.tolist()):
            diff = (a.hidden[i, :n] - b.hidden[i, :n]).abs().max().item()
            assert diff <= 1e-5, f"teacher {name} row {i}: hidden states differ by {diff}"
        assert a.hidden[:, : int(a.response_lens.max())].abs().sum() > 0
    kl_server, g_server = res["server"][1:]
    kl_job, g_job = res["in_job"][1:]
    assert kl_server > 1e-3  # random teachers and student: far from zero
    assert abs(kl_job - kl_server) <= 1e-5 * max(1.0, kl_server), (kl_job, kl_server)
    assert torch.allclose(g_job, g_server, atol=1e-6, rtol=1e-4), (g_job - g_server).abs().max()
    # Loaded in the schedule's order, each teacher once.
    assert res["first_order"] == sorted(DOMAINS) and res["first_loads"] == sorted(DOMAINS)
    if tp == 1:
        return
    assert out[1]["in_job"][1] == kl_job  # both TP ranks computed the same loss
    # Teacher order within a step does not change the signals: the resident teacher runs first.
    assert res["second_order"][0] == res["first_order"][-1] and res["second_order"] != res["first_order"]
    assert res["second_loads"] == res["second_order"][1:]  # the resident one is not loaded again
    for a, b in zip(res["in_job"][0], res["again"]):
        assert a.teacher == b.teacher and torch.equal(a.rows, b.rows) and torch.equal(a.hidden, b.hidden)
    # One teacher's samples: only it was loaded, the others hold no memory.
    teachers_scored, loaded, resident = res["single"]
    assert teachers_scored == ["sorter"] and loaded == ["sorter"]
    assert resident["sorter"] > 0 and resident["arith"] == resident["rev"] == 0
