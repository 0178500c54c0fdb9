"""Multi-teacher OPD end to end over real HTTP teacher servers, under TP=2 gloo worlds.

- the loss the stage trains on equals an independent float64 reverse KL computed from the
  gathered student logits and the teacher's own full log-softmax (fused and unfused paths);
- a smoke run with all three wire signals (hidden, top-k, sampled) through the pool;
- a rank killed mid-run resumes from the last checkpoint and ends exactly where an uninterrupted
  run ends: same per-step losses, same weights, every sample trained on exactly once;
- bad input (teacher down, domain without a teacher, tokenizer mismatch) fails before any step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_opd.config import JobConfig, derive, load_config, to_dict
from megatron_opd.runtime.spawn import WorldFailed, spawn_world
from megatron_opd.stages.trainer import read_ledger
from megatron_opd.serving.launch import start_teacher_server, wait_ready

REPO = Path(__file__).resolve().parents[1]
DOMAINS = {"arith": "add", "rev": "reverse", "sorter": "sort"}


def _make_teacher_dirs(root: str) -> dict[str, str]:
    """Random-initialised teacher model dirs (different seeds), plus one with another tokenizer."""
    from megatron_opd.data.tokenizer import TINY_ALPHABET, CharTokenizer
    from megatron_opd.models.gpt import build_gpt_model
    from megatron_opd.models.model_dir import write_model_dir
    from megatron_opd.runtime import checkpoint as ckpt
    from megatron_opd.runtime.distributed import init_runtime, seed_everything
    from megatron_opd.runtime.layout import ParallelLayout

    cfg = load_config(REPO / "configs/tiny/opd.yaml").model
    layout = init_runtime(ParallelLayout(), 0)
    out = {}
    for i, name in enumerate([*DOMAINS, "mismatch"]):
        seed_everything(100 + i)
        model = build_gpt_model(cfg, layout)
        tok = CharTokenizer(alphabet=TINY_ALPHABET[::-1]) if name == "mismatch" else CharTokenizer()
        d = write_model_dir(Path(root) / name, cfg, tok)
        ckpt.save_checkpoint(d.checkpoints, 0, [model])
        out[name] = str(d.path)
    return out


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    dirs = spawn_world(_make_teacher_dirs, 1, (str(tmp_path_factory.mktemp("teachers")),))[0]
    handles = {name: start_teacher_server(model_dir=d, wait=False) for name, d in dirs.items()}
    wait_ready(list(handles.values()))
    yield {name: (dirs[name], h.url) for name, h in handles.items()}
    for h in handles.values():
        h.stop()


def _job(teachers, run_dir: Path, *overrides: str, signals: dict[str, str] | None = None) -> JobConfig:
    signals = signals or {}
    changes = {
        "teachers": {
            name: {
                "endpoints": [teachers[name][1]],
                "model_dir": teachers[name][0],
                "domains": [domain],
                "signal": signals.get(name, "hidden"),
                "topk": 8 if signals.get(name) == "topk" else 0,
                "batch_size": 32,
            }
            for name, domain in DOMAINS.items()
        },
        "run.output_dir": str(run_dir),
        "run.name": "opd",
        "run.progress": "none",
        "run.log_every": 1,
        "pipeline.expert_overrides": [],
        "pipeline.student_overrides": [],
    }
    base = [
        "train.steps=3",
        "train.global_batch_size=24",
        "train.micro_batch_size=12",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "data.eval_size=8",
    ]
    return derive(load_config(REPO / "configs/tiny/opd.yaml"), base + list(overrides), **changes)


# -- the loss against an independent reference ---------------------------------------------------


def _loss_paths_worker(cfg_tree: dict, temperature: float):
    from megatron.core import tensor_parallel

    from megatron_opd.config import build, derive
    from megatron_opd.data.tokenizer import CharTokenizer
    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.stages.opd import OPDStage
    from megatron_opd.stages.trainer import Trainer

    cfg = build(JobConfig, cfg_tree)
    layout = init_runtime(cfg.parallel, cfg.run.seed)
    trainer = Trainer(cfg, layout)
    tok = CharTokenizer()
    stages = {
        "unfused": OPDStage(cfg, trainer, tok),
        "fused": OPDStage(derive(cfg, ["opd.fused_output_layer=true", "opd.fused_chunk_size=7"]), trainer, tok),
    }
    batch = stages["unfused"].make_batch(0)
    results = {}
    for name, stage in stages.items():
        metrics = trainer.forward_backward(batch.micro_batches, stage.loss, stage.forward)
        grads = torch.cat([p.main_grad.flatten().clone() for p in trainer.module.parameters()])
        results[name] = (metrics["kl"], grads)
    # The reference: float64 KL from the gathered student logits and the teacher's full
    # log-softmax as its server computes it (signal=logits), at every response position.
    ref_cfg = derive(cfg, **{f"teachers.{t}.signal": "logits" for t in cfg.teachers})
    ref_stage = OPDStage(ref_cfg, trainer, tok)
    rollout = stages["unfused"].current
    traj = rollout.batch
    signals = ref_stage.score(rollout)
    with torch.no_grad():
        positions = torch.arange(traj.tokens.shape[1]).expand_as(traj.tokens)
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(trainer.module(traj.tokens, positions, None))
    logits = logits[..., : tok.vocab_size].double()
    kls = []
    for s in signals:
        for i, row in enumerate(s.rows.tolist()):
            r = int(s.response_lens[i])
            p0 = int(traj.prompt_lens[row]) - 1
            log_p = torch.log_softmax(logits[row, p0 : p0 + r] / temperature, -1)
            log_q = torch.log_softmax(s.logits[i, :r].double() / temperature, -1)
            kls.append((log_p.exp() * (log_p - log_q)).sum(-1))
    for stage in (*stages.values(), ref_stage):
        stage.close()
    return results, torch.cat(kls).mean().item(), len(torch.cat(kls))


def test_opd_loss_equals_float64_reference_fused_and_unfused(teachers, tmp_path):
    cfg = _job(teachers, tmp_path, "model.tie_embeddings=false", **{})
    cfg = derive(cfg, **{f"teachers.{t}.temperature": 1.5 for t in DOMAINS})
    out = spawn_world(_loss_paths_worker, 2, (to_dict(cfg), 1.5), timeout_s=240)
    results, reference, tokens = out[0]
    assert tokens > 24  # every row contributed response tokens
    for name in ("unfused", "fused"):
        kl = results[name][0]
        assert abs(kl - reference) <= 1e-5 * max(1.0, reference), f"{name} KL {kl} vs float64 reference {reference}"
    assert reference > 1e-3  # different random teachers and student: the KL is far from zero
    g_unfused, g_fused = results["unfused"][1], results["fused"][1]
    assert torch.allclose(g_unfused, g_fused, atol=1e-6, rtol=1e-4), (g_unfused - g_fused).abs().max()
    assert g_unfused.abs().sum() > 0
    assert out[1][0]["unfused"][0] == results["unfused"][0]  # both TP ranks report the same loss


# -- smoke through HTTP with every wire signal ------------------------------------------------------


def _run(cfg_tree: dict):
    from megatron_opd.stages.launch import _rank_entry

    return _rank_entry(cfg_tree)


def test_opd_smoke_tp2_all_signal_kinds(teachers, tmp_path):
    cfg = _job(teachers, tmp_path, "train.eval_every=3", signals={"rev": "topk", "sorter": "sampled"})
    spawn_world(_run, 2, (to_dict(cfg),), timeout_s=240)
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/kl" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    last = train[-1]
    for t in DOMAINS:
        assert last[f"train/kl/{t}"] == last[f"train/kl/{t}"] and last[f"train/kl/{t}"] != 0.0
    assert 0 < last["train/topk_mass/rev"] <= 1.0
    assert any("eval/acc/add" in r for r in records)
    ledger = read_ledger(cfg.run_dir)
    assert [e["step"] for e in ledger] == [1, 2, 3] and all(len(e["samples"]) == 24 for e in ledger)


# -- resume: a rank killed mid-run ------------------------------------------------------------------


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Model tensors of the newest checkpoint, read with torch's own DCP reader (no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from megatron_opd.runtime.checkpoint import latest_complete

    out = run_dir / "final.pt"
    dcp_to_torch_save(str(latest_complete(run_dir / "checkpoints")), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if torch.is_tensor(v) and not k.startswith("optimizer")}


def _per_step(run_dir: Path, key: str) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if key in r:
            out[r["step"]] = r[key]  # a resumed run re-logs redone steps: the last one counts
    return out


def test_rank_killed_mid_run_resumes_like_uninterrupted(teachers, tmp_path):
    straight = _job(teachers, tmp_path / "a", "train.steps=6", "train.checkpoint_every=2")
    spawn_world(_run, 2, (to_dict(straight),), timeout_s=240)

    # The interrupted run also keeps its teacher signals in a zarr store: after the restart, the
    # redone step 5 reads them back instead of scoring again, and must train identically.
    store = tmp_path / "signals"
    killed = _job(teachers, tmp_path / "b", "train.steps=6", "train.checkpoint_every=2", f"opd.signal_store={store}")
    with pytest.raises(WorldFailed, match="exit code 17"):
        spawn_world(_run, 2, (to_dict(killed),), timeout_s=240, env={"MEGATRON_OPD_FAULT": "exit:1:5"})
    ledger = read_ledger(killed.run_dir)
    assert [e["step"] for e in ledger] == [1, 2, 3, 4, 5]  # step 5 finished, then rank 1 died
    written = sorted(p.name for p in store.iterdir())
    assert written == [f"step_{s:08d}" for s in range(5)]  # steps 0..4 scored before the kill
    spawn_world(_run, 2, (to_dict(killed),), timeout_s=240)
    assert sorted(p.name for p in store.iterdir()) == [f"step_{s:08d}" for s in range(6)]

    a, b = _per_step(straight.run_dir, "train/kl"), _per_step(killed.run_dir, "train/kl")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, f"step {step}: {a[step]} vs {b[step]} after resume"
    wa, wb = _final_weights(straight.run_dir), _final_weights(killed.run_dir)
    assert wa.keys() == wb.keys() and len(wa) > 5
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    samples_a = [s for e in read_ledger(straight.run_dir) for s in e["samples"]]
    samples_b = [s for e in read_ledger(killed.run_dir) for s in e["samples"]]
    assert len(samples_b) == len(set(samples_b)) == 6 * 24, "a sample was lost or repeated"
    assert samples_a == samples_b

    # The same checkpoint continues under another tensor-parallel size (TP=2 -> TP=1).
    tp1 = derive(straight, ["train.steps=7", "parallel.tp=1", "run.nproc=1"])
    final = spawn_world(_run, 1, (to_dict(tp1),), timeout_s=240)[0]
    assert final["kl"] == final["kl"] and final["kl"] > 0
    assert [e["step"] for e in read_ledger(straight.run_dir)][-1] == 7


# -- bad input fails before any training step -------------------------------------------------------


def _expect_failure(cfg_tree: dict) -> str:
    from megatron_opd.stages.launch import _rank_entry

    try:
        _rank_entry(cfg_tree)
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        return str(e)
    return "no error"


def test_bad_input_fails_before_any_step(teachers, tmp_path):
    from megatron_opd.runtime.spawn import free_port

    cases = {
        "down": _job(teachers, tmp_path / "down", "run.nproc=1", "parallel.tp=1", **{}),
        "no_teacher": _job(teachers, tmp_path / "none", "run.nproc=1", "parallel.tp=1", "data.domains=[add,reverse,sort,count]"),
        "tokenizer": _job(teachers, tmp_path / "tok", "run.nproc=1", "parallel.tp=1"),
    }
    dead = f"http://127.0.0.1:{free_port()}"
    cases["down"] = derive(cases["down"], **{"teachers.rev.endpoints": [dead]})
    cases["tokenizer"] = derive(cases["tokenizer"], **{"teachers.sorter.endpoints": [teachers["mismatch"][1]]})
    messages = {name: spawn_world(_expect_failure, 1, (to_dict(cfg),), timeout_s=240)[0] for name, cfg in cases.items()}
    assert "before any training step" in messages["down"] and "'rev'" in messages["down"] and dead in messages["down"]
    assert "domain 'count'" in messages["no_teacher"] and "has no teacher" in messages["no_teacher"]
    assert "before any training step" in messages["tokenizer"] and "fingerprint" in messages["tokenizer"]
    assert "'sorter'" in messages["tokenizer"]
    for cfg in cases.values():
        assert not (cfg.run_dir / "metrics.jsonl").exists() or not (cfg.run_dir / "metrics.jsonl").read_text()


def _nan_signal_worker(cfg_tree: dict) -> str:
    from megatron_opd.config import build
    from megatron_opd.data.tokenizer import CharTokenizer
    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.stages.opd import OPDStage
    from megatron_opd.stages.trainer import Trainer

    cfg = build(JobConfig, cfg_tree)
    trainer = Trainer(cfg, init_runtime(cfg.parallel, cfg.run.seed))
    stage = OPDStage(cfg, trainer, CharTokenizer())
    real = stage.scorer

    class OneNaN:
        """A Scorer that passes one non-finite value through, as a broken teacher would."""

        route, close = real.route, real.close

        def score(self, traj):
            signals = real.score(traj)
            signals[0].hidden[0, 0] = float("nan")
            return signals

    stage.scorer = OneNaN()
    try:
        trainer.fit(stage)
        return "no error"
    except FloatingPointError as e:
        return f"FloatingPointError: {e} (trainer at step {trainer.step})"
    finally:
        stage.close()


def test_non_finite_kl_stops_the_run_naming_metric_and_step(teachers, tmp_path):
    """One NaN teacher hidden state: the stage's own loss metric (kl) is checked, the run stops at
    step 1 before its optimizer update (it used to run to the end with kl NaN)."""
    cfg = _job(teachers, tmp_path, "run.nproc=1", "parallel.tp=1", "train.steps=2")
    message = spawn_world(_nan_signal_worker, 1, (to_dict(cfg),), timeout_s=240)[0]
    assert message.startswith("FloatingPointError: kl became nan at step 1"), message
    assert "trainer at step 0" in message
    assert not (cfg.run_dir / "metrics.jsonl").exists() or "train/kl" not in (cfg.run_dir / "metrics.jsonl").read_text()


# -- the SGLang rollout engine against our SGLang-compatible server ---------------------------------


def _rollout_worker(cfg_tree: dict, rollout_url: str):
    import urllib.request

    from megatron_opd.config import build, derive
    from megatron_opd.data.tokenizer import CharTokenizer
    from megatron_opd.rollout.config import SamplingParams
    from megatron_opd.rollout.embedded import generate
    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.stages.opd import OPDStage
    from megatron_opd.stages.trainer import Trainer

    cfg = build(JobConfig, cfg_tree)
    layout = init_runtime(cfg.parallel, cfg.run.seed)
    trainer = Trainer(cfg, layout)
    tok = CharTokenizer()
    stage = OPDStage(cfg, trainer, tok)  # the engine pushes the student's weights at start
    prompts = stage.source.prompts(0, 12)
    # Greedy through HTTP equals greedy in-job: the server holds exactly the student's weights.
    greedy = derive(cfg, ["rollout.temperature=0.0"]).rollout
    from megatron_opd.rollout.sglang import SGLangRolloutEngine

    http = SGLangRolloutEngine(greedy, trainer, tok, max_len=cfg.model.max_seq_len, seed=0)
    remote = http.generate(prompts, 0)
    local = generate(trainer.module, prompts, tok, SamplingParams(max_new_tokens=6, temperature=0.0), max_len=cfg.model.max_seq_len)
    same_before = torch.equal(remote.tokens, local.tokens)
    # Train two steps (weights synced after each), then compare again.
    for step in range(2):
        batch = stage.make_batch(step)
        trainer.train_step(batch.micro_batches, stage.loss, stage.forward, stage.finite_metrics)
        stage.after_step(step)
    versions = stage.current.batch.weight_version
    http.sync_weights(2)
    remote = http.generate(prompts, 2)
    local = generate(trainer.module, prompts, tok, SamplingParams(max_new_tokens=6, temperature=0.0), max_len=cfg.model.max_seq_len)
    info = json.loads(urllib.request.urlopen(rollout_url + "/model_info").read())
    http.close()
    stage.close()
    return same_before, torch.equal(remote.tokens, local.tokens), versions, info["weight_version"], remote.behavior_logprobs


@pytest.mark.parametrize("sync", ["disk", "distributed"])
def test_sglang_rollout_engine_syncs_weights(teachers, tmp_path, sync):
    """TP=2 student, one server of other weights: after each sync the server samples exactly what
    the student does. "distributed": gathered, renamed to HF, broadcast over a gloo group."""
    cfg = _job(teachers, tmp_path, "rollout.engine=sglang", f"rollout.weight_sync={sync}")
    # Other weights than the student's; disk sync loads only from the trainer's rollout_weights/.
    rollout = start_teacher_server(model_dir=teachers["arith"][0], weights_dir=cfg.run_dir / "rollout_weights", weight_groups=True)
    try:
        cfg = derive(cfg, **{"rollout.endpoints": [rollout.url]})
        out = spawn_world(_rollout_worker, 2, (to_dict(cfg), rollout.url), timeout_s=240)
    finally:
        rollout.stop()
    same_before, same_after, version_at_step1, server_version, logprobs = out[0]
    assert same_before and same_after, "the rollout server does not hold the student's weights"
    assert version_at_step1 == "1"  # step 1's samples came from the weights after step 0's update
    assert server_version == "2"
    assert (logprobs <= 0).all() and logprobs.abs().sum() > 0
    assert out[1][0] == same_before  # both TP ranks got the same batch
    # Only disk sync writes checkpoints for the servers; distributed sync went over the group.
    assert (cfg.run_dir / "rollout_weights").exists() == (sync == "disk")
