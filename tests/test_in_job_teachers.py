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

from megatron_opd.config import ConfigError, JobConfig, derive, load_config, to_dict
from megatron_opd.runtime.spawn import WorldFailed, spawn_world
from megatron_opd.stages.trainer import read_ledger
from test_opd import DOMAINS, REPO, _expect_failure, _final_weights, _job, _per_step, _run, teachers  # noqa: F401 (fixture)


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
    served.make_batch(0)  # the rollout, scored by the servers
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
        # One job, both placements: rev in the job, the others served.
        mixed = OPDStage(_in_job(cfg, ("rev",)), trainer, tok)
        out["mixed"] = (mixed.score(rollout), list(mixed.in_job.load_log))
        mixed.close()
    for stage in (served, in_job):
        stage.close()
    return out


def _by_teacher(signals):
    return {s.teacher: s for s in signals}


@pytest.mark.parametrize("tp", [1, 2])
def test_in_job_signals_and_loss_equal_the_server_path(teachers, tmp_path, tp):
    # TP=1 with the default tied embeddings (the head is the embedding), TP=2 with an output layer.
    tied = "true" if tp == 1 else "false"
    cfg = _job(teachers, tmp_path, f"run.nproc={tp}", f"parallel.tp={tp}", f"model.tie_embeddings={tied}")
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
    mixed, mixed_loads = res["mixed"]
    assert [s.teacher for s in mixed] == [s.teacher for s in res["server"][0]] and mixed_loads == ["rev"]
    for s in mixed:
        a = server[s.teacher]
        assert torch.equal(s.rows, a.rows)
        for i, n in enumerate(a.response_lens.tolist()):
            assert (s.hidden[i, :n] - a.hidden[i, :n]).abs().max().item() <= 1e-5, s.teacher


# -- bad input fails before any training step -------------------------------------------------------


def _copy_teacher(src: str, dst: Path, damage) -> str:
    import shutil

    shutil.copytree(src, dst)
    damage(dst)
    return str(dst)


def _truncate_shard(d: Path) -> None:
    shard = sorted(d.glob("checkpoints/step_*/*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _other_vocab(d: Path) -> None:
    text = (d / "model.yaml").read_text()
    assert "vocab_size: 51" in text
    (d / "model.yaml").write_text(text.replace("vocab_size: 51", "vocab_size: 60"))


def test_bad_in_job_teacher_fails_before_any_step_naming_it(teachers, tmp_path):
    import shutil

    base = _in_job(_job(teachers, tmp_path / "base", "run.nproc=1", "parallel.tp=1"))
    damaged = {
        "missing": ("rev", _copy_teacher(teachers["rev"][0], tmp_path / "missing", lambda d: shutil.rmtree(d / "checkpoints"))),
        "corrupt": ("arith", _copy_teacher(teachers["arith"][0], tmp_path / "corrupt", _truncate_shard)),
        "tokenizer": ("sorter", teachers["mismatch"][0]),
        "vocab": ("rev", _copy_teacher(teachers["rev"][0], tmp_path / "vocab", _other_vocab)),
    }
    messages = {}
    for case, (name, model_dir) in damaged.items():
        cfg = derive(base, **{f"teachers.{name}.model_dir": model_dir, "run.output_dir": str(tmp_path / case)})
        messages[case] = spawn_world(_expect_failure, 1, (to_dict(cfg),), timeout_s=240)[0]
        assert "in-job teachers failed to load, before any training step" in messages[case], messages[case]
        assert f"in-job teacher {name!r}" in messages[case], messages[case]
        assert not (cfg.run_dir / "metrics.jsonl").exists() or not (cfg.run_dir / "metrics.jsonl").read_text()
    assert "no complete checkpoint" in messages["missing"]
    assert "CorruptCheckpoint" in messages["corrupt"] and ".distcp" in messages["corrupt"]
    assert "fingerprint" in messages["tokenizer"]
    assert "vocabulary size 60" in messages["vocab"] and "51" in messages["vocab"]


def test_in_job_config_errors_name_the_key(teachers, tmp_path):
    cfg = _job(teachers, tmp_path)
    _in_job(cfg).check()  # the in-job job itself is valid
    bad = {
        r"teachers\.rev\.endpoints=.*placement is 'in_job'": {"teachers.rev.placement": "in_job"},  # endpoints kept
        r"teachers\.rev\.signal='topk'.*set teachers\.rev\.signal=hidden": {
            "teachers.rev.placement": "in_job", "teachers.rev.endpoints": [], "teachers.rev.signal": "topk", "teachers.rev.topk": 8,
        },
        r"teachers\.rev\.placement: 'gpu' is not one of": {"teachers.rev.placement": "gpu"},
        r"opd\.resident_teachers must be >= 1": {"opd.resident_teachers": 0},
    }
    for message, changes in bad.items():
        with pytest.raises(ConfigError, match=message):
            derive(cfg, **changes).check()


# -- memory grows with the resident count, not with the teacher count -------------------------------

MEMORY_DOMAINS = ["add", "reverse", "sort", "count"]
# Teachers much wider and deeper than the tiny student (~72 MB of float32 weights each), so that
# one teacher's weights stand well above the noise of a process's peak RSS.
BIG_TEACHER = {"hidden_size": 512, "num_layers": 6, "num_attention_heads": 8, "num_query_groups": 2, "ffn_hidden_size": 1536}


def _make_sized_teachers(root: str, count: int, model_changes: dict) -> list[str]:
    from dataclasses import replace

    from megatron_opd.config import load_config
    from megatron_opd.data.tokenizer import CharTokenizer
    from megatron_opd.models.gpt import build_gpt_model
    from megatron_opd.models.model_dir import write_model_dir
    from megatron_opd.runtime import checkpoint as ckpt
    from megatron_opd.runtime.distributed import init_runtime, seed_everything
    from megatron_opd.runtime.layout import ParallelLayout

    cfg = replace(load_config(REPO / "configs/tiny/opd.yaml").model, **model_changes)
    layout = init_runtime(ParallelLayout(), 0)
    out = []
    for i in range(count):
        seed_everything(300 + i)
        d = write_model_dir(Path(root) / f"t{i}", cfg, CharTokenizer())
        ckpt.save_checkpoint(d.checkpoints, 0, [build_gpt_model(cfg, layout)])
        out.append(str(d.path))
    return out


@pytest.fixture(scope="module")
def sized_teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("sized")
    big = spawn_world(_make_sized_teachers, 1, (str(root / "big"), 4, BIG_TEACHER))[0]
    tiny = spawn_world(_make_sized_teachers, 1, (str(root / "tiny"), 4, {}))[0]
    return {"big": big, "tiny": tiny}


def _memory_job(dirs: list[str], run_dir: Path, *overrides: str) -> JobConfig:
    owners = [MEMORY_DOMAINS[i :: len(dirs)] for i in range(len(dirs))]  # 2 teachers: two domains each
    teachers = {f"t{i}": {"placement": "in_job", "model_dir": d, "domains": owners[i], "signal": "hidden"} for i, d in enumerate(dirs)}
    base = [
        "run.nproc=1", "parallel.tp=1", "train.steps=2", "train.global_batch_size=24", "train.micro_batch_size=12",
        "train.eval_every=0", "train.eval_at_start=false", "train.checkpoint_every=0", "data.eval_size=8",
        f"data.domains=[{','.join(MEMORY_DOMAINS)}]",
    ]
    changes = {"teachers": teachers, "run.output_dir": str(run_dir), "run.name": "mem", "run.progress": "none", "run.log_every": 1}
    return derive(load_config(REPO / "configs/tiny/opd.yaml"), base + list(overrides), **changes)


def _peak_rss_worker(cfg_tree: dict) -> dict:
    import resource

    from megatron_opd.stages.launch import _rank_entry

    _rank_entry(cfg_tree)
    return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _teacher_bytes(model_dir: str) -> int:
    from megatron_opd.models.model_dir import read_model_dir

    m = read_model_dir(model_dir).model
    h, f, L = m.hidden_size, m.ffn_hidden_size, m.num_layers
    kv = h // m.num_attention_heads * m.num_query_groups
    per_layer = h * (h + 2 * kv) + h * h + 2 * h * f + h * f + 2 * h  # qkv, proj, fc1 (SwiGLU), fc2, norms
    return 4 * (L * per_layer + m.padded_vocab_size(1) * h + h)  # float32, embedding, final norm


# A measurement of whole-process peak RSS: on a loaded machine the baseline's own peak (imports,
# the rollout) can hide the teachers' weights (seen: the control at 2.0 teachers, not 4), so it
# runs with the slow set on a quiet machine, not in the default run.
@pytest.mark.slow
def test_peak_memory_does_not_grow_with_teachers(sized_teachers, tmp_path):
    """Peak RSS of the trainer rank (a spawned world each) for: four tiny teachers (the student-only
    baseline: their weights are ~1% of one big teacher's), 2 and 4 big teachers with one resident
    (read from disk, the next one prefetched), 4 without prefetch, and 4 big teachers all kept in
    host memory (the control: the measurement does see teachers' weights). Growth is in units of
    one teacher's weights. Reading a teacher holds about half a teacher more for a moment (SwiGLU's
    fc1 halves are read apart and merged: models/weights.py), so with prefetch the peak is the
    resident teacher + the one being read + that transient, without it the resident one + the
    transient: either way a constant, not a multiple of the teacher count."""
    one = _teacher_bytes(sized_teachers["big"][0])
    runs = {
        "baseline": _memory_job(sized_teachers["tiny"], tmp_path / "baseline"),
        "2 teachers": _memory_job(sized_teachers["big"][:2], tmp_path / "two"),
        "4 teachers": _memory_job(sized_teachers["big"], tmp_path / "four"),
        "4, no prefetch": _memory_job(sized_teachers["big"], tmp_path / "serial", "opd.prefetch_teachers=false"),
        "4 in host memory": _memory_job(sized_teachers["big"], tmp_path / "host", "opd.teacher_weights=host"),
    }
    peak = {name: spawn_world(_peak_rss_worker, 1, (to_dict(cfg),), timeout_s=300)[0]["peak_rss"] for name, cfg in runs.items()}
    growth = {name: (p - peak["baseline"]) / one for name, p in peak.items()}
    print("teacher weights", one / 2**20, "MiB; peak RSS", {n: round(p / 2**20, 1) for n, p in peak.items()},
          "MiB; growth in teachers", {n: round(g, 2) for n, g in growth.items()})
    (tmp_path / "memory.json").write_text(json.dumps({"teacher_bytes": one, "peak_rss": peak}))
    loads = _per_step(runs["4 teachers"].run_dir, "train/teacher_loads")
    assert loads and all(v >= 3 for v in loads.values()), loads  # the teachers really were swapped in and out
    assert growth["4 in host memory"] >= 3.0, growth  # the control: four resident teachers are seen
    # One resident teacher plus the one staging buffer the prefetch fills (and the read's
    # transient), whatever the count; without prefetch, one teacher and the transient.
    assert growth["2 teachers"] <= 3.0 and growth["4 teachers"] <= 3.0, growth
    assert growth["4 teachers"] - growth["2 teachers"] <= 0.5, growth
    assert growth["4, no prefetch"] <= 2.0, growth


# -- restart with the signal store ------------------------------------------------------------------


def test_rank_killed_resumes_exactly_and_redone_steps_read_the_store(teachers, tmp_path):
    steps = ["train.steps=4", "train.checkpoint_every=2"]
    straight = _in_job(_job(teachers, tmp_path / "a", *steps))
    spawn_world(_run, 2, (to_dict(straight),), timeout_s=300)

    store = tmp_path / "signals"
    killed = _in_job(_job(teachers, tmp_path / "b", *steps, f"opd.signal_store={store}"))
    with pytest.raises(WorldFailed, match="exit code 17"):
        spawn_world(_run, 2, (to_dict(killed),), timeout_s=300, env={"MEGATRON_OPD_FAULT": "exit:1:3"})
    assert [e["step"] for e in read_ledger(killed.run_dir)] == [1, 2, 3]  # step 3 finished, then rank 1 died
    assert sorted(p.name for p in store.iterdir()) == [f"step_{s:08d}" for s in range(3)]
    first_rows = _per_step(killed.run_dir, "train/teacher_rows")
    assert first_rows == {1: 24.0, 2: 24.0, 3: 24.0}, first_rows
    spawn_world(_run, 2, (to_dict(killed),), timeout_s=300)

    # The resumed run redid step 3 (from the checkpoint of step 2) with the stored signals: no
    # teacher was loaded or run for it; step 4 was scored by the teachers.
    rows, loads = _per_step(killed.run_dir, "train/teacher_rows"), _per_step(killed.run_dir, "train/teacher_loads")
    forward = _per_step(killed.run_dir, "train/teacher_forward_s")
    assert rows[3] == 0.0 and loads[3] == 0.0 and forward[3] == 0.0, (rows, loads, forward)
    assert rows[4] == 24.0 and loads[4] >= 1 and forward[4] > 0, (rows, loads, forward)
    a, b = _per_step(straight.run_dir, "train/kl"), _per_step(killed.run_dir, "train/kl")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, f"step {step}: {a[step]} vs {b[step]} after resume"
    wa, wb = _final_weights(straight.run_dir), _final_weights(killed.run_dir)
    assert wa.keys() == wb.keys() and len(wa) > 5
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    samples = [s for e in read_ledger(killed.run_dir) for s in e["samples"]]
    assert len(samples) == len(set(samples)) == 4 * 24, "a sample was lost or repeated"
