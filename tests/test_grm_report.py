"""The GRM report (launchers/grm.py), `megatron-opd run configs/tiny/grm.yaml` cut down: the
annotation file made once with its sha256 in the summary, every phase (cold start, judge RL, the
scalar RM, the RL runs of each reward) with the same budget, the evaluation against the oracle,
and a rerun that reuses everything; plus the aggregation over seeds by hand."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CUT_DOWN = [
    "model.hidden_size=64", "model.ffn_hidden_size=96", "run.progress=none", "train.steps=2",
    "train.global_batch_size=16", "train.micro_batch_size=16", "train.checkpoint_every=0",
    "grpo.group_size=4", "data.eval_size=6", "grm.eval_samples=4", "grm.annotations_size=40", "grm.seeds=[5]",
    "grm.cold_start_overrides=[train.steps=30,train.global_batch_size=64,train.micro_batch_size=64,"
    "train.optim.lr=3e-3,train.checkpoint_every=0]",
    "grm.judge_rl_overrides=[train.steps=1]", "grm.reward_model_overrides=[train.steps=10,train.checkpoint_every=0]",
]  # fmt: skip


def _run(out: Path, *extra: str) -> str:
    cmd = [sys.executable, "-m", "megatron_opd.cli", "run", str(REPO / "configs/tiny/grm.yaml"),
           f"run.output_dir={out}", *CUT_DOWN, *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def test_grm_report_cut_down_end_to_end_and_rerun_reuses_it(tmp_path):
    out = _run(tmp_path)
    run = tmp_path / "tiny-grm"
    summary = json.loads((run / "summary.json").read_text())
    ann = run / "annotations.jsonl"
    assert summary["annotations"]["sha256"] == hashlib.sha256(ann.read_bytes()).hexdigest()
    assert summary["annotations"]["size"] == 40 == len(ann.read_text().splitlines())
    assert summary["seeds"] == [5]
    # The budget: every RL run the same optimizer steps and rubric samples; the GRM runs add as
    # many judge-RL samples on the annotations, the others none.
    budget = summary["budget"]
    assert set(budget) == {"grm", "grm_frozen", "scalar_rm", "oracle"}
    assert {(b["optimizer_steps"], b["rubric_samples"]) for b in budget.values()} == {(2, 32)}
    assert [budget[p]["judge_samples"] for p in ("grm", "grm_frozen", "scalar_rm", "oracle")] == [32, 32, 0, 0]
    mean = summary["mean"]
    assert set(mean["policy_oracle_score"]) == {"grm", "grm_frozen", "scalar_rm", "oracle", "none"}
    assert all(0.0 <= v <= 1.0 for v in mean["policy_oracle_score"].values())
    for who in ("judge", "scalar_rm"):
        assert set(mean[who]) == {"start_policy", "end_policy"}
    assert set(mean["judge"]["start_policy"]) == {"k1", "k4"}
    for report in (*mean["judge"]["end_policy"].values(), *mean["scalar_rm"].values()):
        assert 0.0 <= report["pairwise_acc"] <= 1.0 and report["pairs"] > 0 and -1.0 <= report["rank_corr"] <= 1.0
    bon = mean["best_of_n"]
    assert set(bon) == {"1", "4"}  # N = 16 needs 16 samples per prompt; the cut-down draws 4
    assert set(bon["4"]) == {"judge", "scalar_rm", "oracle", "random"}
    assert bon["1"]["judge"] == bon["1"]["oracle"] == bon["1"]["random"]  # one sample: one pick
    assert all(bon["4"][w] <= bon["4"]["oracle"] + 1e-12 for w in bon["4"])  # the oracle's pick is the ceiling
    assert set(summary["reward_gap_by_rollout"]["5"]) == {"grm", "grm_frozen", "scalar_rm"}
    assert (run / "reward_gap.png").read_bytes()[:4] == b"\x89PNG"
    assert "held-out oracle score of the policy" in out and "best-of-N" in out
    # A rerun trains and evaluates nothing and reports the same.
    again = _run(tmp_path)
    assert "seed 5:" not in again, again
    assert json.loads((run / "summary.json").read_text())["mean"] == mean


def test_aggregate_over_seeds_by_hand():
    from launchers.grm import aggregate

    per_seed = {1: {"policy_oracle_score": {"grm": 0.2, "none": 0.1}, "best_of_n": {"4": {"judge": 0.5}}},
                2: {"policy_oracle_score": {"grm": 0.4, "none": 0.1}, "best_of_n": {"4": {"judge": 0.7}},
                    "extra": {"only": 1.0}}}  # fmt: skip
    mean, spread = aggregate(per_seed)
    assert set(mean) == {"policy_oracle_score", "best_of_n"}  # "extra" is not in every seed
    assert mean["policy_oracle_score"] == pytest.approx({"grm": 0.3, "none": 0.1})
    assert mean["best_of_n"]["4"]["judge"] == pytest.approx(0.6)
    assert spread["policy_oracle_score"]["grm"] == pytest.approx(math.sqrt(0.02))
    assert spread["policy_oracle_score"]["none"] == pytest.approx(0.0)


def test_a_bad_phase_override_is_refused_naming_the_phase_before_anything_runs(tmp_path):
    cmd = [sys.executable, "-m", "megatron_opd.cli", "run", str(REPO / "configs/tiny/grm.yaml"), f"run.output_dir={tmp_path}",
           "grm.reward_model_overrides=['data.domains=[rubric]']"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    assert "seed1234/reward_model (grm_rm)" in proc.stderr + proc.stdout and "data.domains=[judge]" in proc.stderr + proc.stdout
    assert not (tmp_path / "tiny-grm").exists()  # refused before the annotations or any phase
