"""The GRM's stages (stages/grm.py) on real megatron models, launched by `megatron-opd train` in
processes that cannot import the hidden oracle:

- the cold start (grm_sft) on the rubric task and the annotations, then judge RL plus policy RL
  with the live weights judging (actor as judge, data.domains [rubric, judge]);
- a run killed mid-way resumes with the same losses and the same judged rewards;
- the frozen-snapshot judge scores rollout 0 exactly as the live one (same weights, same seeds)
  and later rollouts differently (the live weights moved, the snapshot did not).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from run_records import step_records

REPO = Path(__file__).resolve().parents[1]

MODEL = [
    "model.vocab_size=51", "model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.ffn_hidden_size=96", "model.max_seq_len=32",
    "model.make_vocab_size_divisible_by=8", "run.progress=none", "run.log_every=1", "run.nproc=1",
    "data.eval_size=8", "train.eval_every=0", "train.optim.warmup_steps=0", "train.optim.decay=constant",
    "rollout.max_new_tokens=7",
]  # fmt: skip

BLOCKER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[:2] == ['megatron_opd', 'grm_oracle']:
            raise ImportError('the hidden oracle is unreachable from training (test)')
sys.meta_path.insert(0, _Block())
"""


def _train(tmp: Path, overrides: list[str], *, fault: str = "", check: bool = True) -> tuple[int, str]:
    """`megatron-opd train` with the oracle unimportable (a sitecustomize on the path: the spawned
    ranks inherit it); (exit code, log). It runs in its own session, which is killed once the
    command returns: a rank killed by the fault hook leaves no helper process behind."""
    block = tmp / "blocker"
    block.mkdir(exist_ok=True)
    (block / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=f"{block}{os.pathsep}{REPO}")
    env.pop("MEGATRON_OPD_FAULT", None)
    if fault:
        env["MEGATRON_OPD_FAULT"] = fault
    log_path = tmp / f"train-{len(list(tmp.glob('train-*.log')))}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "megatron_opd.cli", "train", str(_empty_config(tmp)), *overrides],
                                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True)  # fmt: skip
        try:
            code = proc.wait(timeout=900)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = log_path.read_text(errors="replace")
    if check:
        assert code == 0, text[-4000:]
    return code, text


def _empty_config(tmp: Path) -> Path:
    path = tmp / "empty.yaml"
    path.write_text("{}\n")
    return path


def _judged(run_dir: Path) -> dict[tuple[int, str], tuple[str, float]]:
    """(rollout, sample id) -> (response, GRM reward) from grm_samples.jsonl (a redone rollout: the last)."""
    out = {}
    for line in (run_dir / "grm_samples.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[(r["rollout"], r["sample_id"])] = (r["response"], r["reward"])
    return out


@pytest.fixture(scope="module")
def cold_start(tmp_path_factory) -> tuple[Path, Path]:
    """(annotation file, cold-start run dir): 60 noisy annotations of random answers, 80 SFT steps
    (enough for the verdict format: the judged rewards vary)."""
    from megatron_opd.data.rubric import RubricTasks, random_response
    from megatron_opd.grm_oracle.annotate import make_annotation_file

    tmp = tmp_path_factory.mktemp("grm")
    rng = random.Random(0)
    items = [(p.sample_id, p.metadata["query"], p.metadata["rubric"], random_response(rng, p.metadata["query"]))
             for p in RubricTasks(seed=7, eval_size=0).prompts(0, 60)]  # fmt: skip
    annotations = tmp / "annotations.jsonl"
    make_annotation_file(annotations, items, noise=0.1, seed=0)
    _train(tmp, MODEL + ["stage=grm_sft", "data.domains=[rubric,judge]", f"data.annotations={annotations}",
                         "train.steps=80", "train.global_batch_size=64", "train.micro_batch_size=64",
                         "train.optim.lr=3e-3", "grm.judge_temperature=0", f"run.output_dir={tmp}", "run.name=cold"])  # fmt: skip
    return annotations, tmp / "cold"


def _grm(annotations: Path, cold: Path, out: Path, name: str, *extra: str) -> list[str]:
    return MODEL + [
        "stage=grm", "data.domains=[rubric,judge]", f"data.annotations={annotations}", f"train.init_from={cold}",
        "train.steps=4", "train.global_batch_size=8", "train.micro_batch_size=8", "train.checkpoint_every=2",
        "train.optim.lr=1e-3", "grpo.group_size=4", "grpo.kl_coef=0.01", "grm.votes=2", "grm.judge_temperature=1.0",
        f"run.output_dir={out}", f"run.name={name}", *extra,
    ]  # fmt: skip


def test_actor_as_judge_runs_without_the_oracle_and_a_killed_run_resumes_exactly(cold_start, tmp_path):
    annotations, cold = cold_start
    _train(tmp_path, _grm(annotations, cold, tmp_path, "straight"))
    run = tmp_path / "straight"
    rec = step_records(run)
    steps = {s: r for s, r in rec.items() if "train/loss" in r}
    assert sorted(steps) == [1, 2, 3, 4]
    for r in steps.values():
        # Both halves of the interleaved rollout: judge RL and the policy judged by the live weights.
        assert "train/reward/judge" in r and "train/reward/rubric" in r
        assert 0.0 <= r["train/judge_format_fail"] <= 1.0 and 0.0 <= r["train/grm_format_fail"] <= 1.0
        assert -1.0 <= r["train/reward/judge"] <= 1.0 and 0.0 <= r["train/reward/rubric"] <= 1.0
    judged = _judged(run)
    assert {k[0] for k in judged} == {0, 1, 2, 3} and len(judged) == 16  # 1 rubric prompt x 4 per rollout

    code, _ = _train(tmp_path, _grm(annotations, cold, tmp_path, "killed"), fault="exit:0:3", check=False)
    assert code != 0
    _train(tmp_path, _grm(annotations, cold, tmp_path, "killed"))
    again = {s: r for s, r in step_records(tmp_path / "killed").items() if "train/loss" in r}
    assert sorted(again) == sorted(steps)
    for s in steps:
        for k in ("train/loss", "train/kl", "train/reward/judge", "train/reward/rubric"):
            assert again[s][k] == pytest.approx(steps[s][k], abs=1e-6), (s, k)
    assert _judged(tmp_path / "killed") == judged


def test_the_frozen_snapshot_judges_like_the_live_weights_only_before_they_move(cold_start, tmp_path):
    annotations, cold = cold_start
    live = _grm(annotations, cold, tmp_path, "live", "data.domains=[rubric]", "train.steps=3", "train.optim.lr=1e-2")
    frozen = _grm(annotations, cold, tmp_path, "frozen", "data.domains=[rubric]", "train.steps=3",
                  "train.optim.lr=1e-2", "grm.judge=frozen")  # fmt: skip
    _train(tmp_path, live)
    _train(tmp_path, frozen)
    a, b = _judged(tmp_path / "live"), _judged(tmp_path / "frozen")
    assert a.keys() == b.keys()
    first = sorted(k for k in a if k[0] == 0)
    assert len(first) == 8 and [a[k] for k in first] == [b[k] for k in first]  # same weights and seeds
    # Rollout 1 is sampled by the same weights in both runs (step 1 saw the same rewards), but the
    # live judge has moved with them and the snapshot has not.
    second = sorted(k for k in a if k[0] == 1)
    assert [a[k][0] for k in second] == [b[k][0] for k in second]
    assert [a[k][1] for k in second] != [b[k][1] for k in second]


def test_judging_over_http_equals_the_in_job_judge(cold_start, tmp_path):
    """The cold start served by `megatron-opd serve` judges rollout 0 exactly as the in-job judge
    holding the same weights, with the same sampling seeds (votes sampled at temperature 1)."""
    from megatron_opd.serving.launch import start_teacher_server

    annotations, cold = cold_start
    one = ["data.domains=[rubric]", "train.steps=1", "train.checkpoint_every=0"]
    _train(tmp_path, _grm(annotations, cold, tmp_path, "in_job", *one))
    with start_teacher_server(model_dir=cold, log_path=tmp_path / "judge.log") as server:
        _train(tmp_path, _grm(annotations, cold, tmp_path, "http", *one, "grm.judge=http", f"grm.judge_url={server.url}"))
    a, b = _judged(tmp_path / "in_job"), _judged(tmp_path / "http")
    assert len(a) == 8 and a == b
    assert len({r for _, r in a.values()}) > 1, "the verdicts do not vary: the comparison would prove little"


def test_the_scalar_reward_model_fits_the_annotations_and_rewards_grpo_without_the_oracle(cold_start, tmp_path):
    """grm_rm regresses the annotations' scores from the cold start (its squared error on them
    falls well below the start's, its ranking of them rises above chance); GRPO then takes the
    scalar RM's values as the rubric reward with the oracle unreachable, while the oracle baseline,
    the one run meant to read it, fails to start without it."""
    annotations, cold = cold_start
    _train(tmp_path, MODEL + ["stage=grm_rm", "data.domains=[judge]", f"data.annotations={annotations}",
                              f"train.init_from={cold}", "train.steps=40", "train.global_batch_size=30",
                              "train.micro_batch_size=30", "train.optim.lr=1e-3", "train.eval_every=40",
                              "train.eval_at_start=true", "train.checkpoint_every=0", f"run.output_dir={tmp_path}",
                              "run.name=rm"])  # fmt: skip
    rec = step_records(tmp_path / "rm")
    assert rec[40]["eval/rm_mse"] < 0.5 * rec[0]["eval/rm_mse"], (rec[0]["eval/rm_mse"], rec[40]["eval/rm_mse"])
    assert rec[40]["eval/rm_pairwise_acc"] > 0.6
    one = ["data.domains=[rubric]", "train.steps=2", "train.checkpoint_every=0"]
    _train(tmp_path, _grm(annotations, cold, tmp_path, "by_rm", *one, "grm.policy_reward=scalar_rm",
                          f"grm.reward_model={tmp_path / 'rm'}"))  # fmt: skip
    rewards = [r for _, r in _judged(tmp_path / "by_rm").values()]
    assert len(rewards) == 16 and len(set(rewards)) > 1 and all(-1.0 < r < 2.0 for r in rewards)
    code, log = _train(tmp_path, _grm(annotations, cold, tmp_path, "by_oracle", *one, "grm.policy_reward=oracle"), check=False)
    assert code != 0 and "the hidden oracle is unreachable from training" in log
