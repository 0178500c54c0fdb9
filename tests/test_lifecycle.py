"""A run directory's lifecycle through the `megatron-opd train` command (stages/run_dir.py).

One finished tiny SFT run (3 steps, a checkpoint after every step) is copied for each test, which
then resumes, refuses, restarts or reruns it and checks what the directory holds afterwards:
- a refused or failing resume writes nothing (model.yaml, config.yaml, metrics, ledger...);
- fixed keys are refused with their old and new values; changeable ones are applied (the LR
  schedule follows the new values, checked against its closed form) and logged;
- train.resume=false on a run with checkpoints is refused; train.restart=true starts over cleanly;
- a rerun of a finished run leaves its summary as it was;
- metrics.jsonl and TensorBoard drop what an interrupted attempt logged after the resumed step.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SFT = [
    str(REPO / "configs/tiny/sft.yaml"),
    "run.name=base",
    "run.nproc=1",
    "parallel.tp=1",
    "run.progress=none",
    "run.log_every=1",
    "train.steps=3",
    "train.micro_batch_size=16",
    "train.global_batch_size=16",
    "train.eval_every=3",
    "data.eval_size=8",
    "train.checkpoint_every=1",
    "train.keep_checkpoints=5",
    "train.optim.lr=3e-3",
    "train.optim.warmup_steps=0",
    "train.optim.decay=linear",
    "train.optim.min_lr=0",
]


def _train(output_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "megatron_opd.cli", "train", *SFT, f"run.output_dir={output_dir}", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )


def _ok(out: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("template")
    _ok(_train(out))
    return out / "base"


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    """A private copy of the finished run: tmp_path/base."""
    shutil.copytree(finished_run, tmp_path / "base")
    return tmp_path / "base"


def _snapshot(run_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _train_rows(run_dir: Path, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in _rows(run_dir) if key in r]


def _ledger_steps(run_dir: Path) -> list[int]:
    from megatron_opd.stages.trainer import read_ledger

    return [e["step"] for e in read_ledger(run_dir)]


# -- item 2 and 13 (fixed keys): nothing is written before the checkpoint has loaded ---------------


def test_a_refused_or_failed_resume_leaves_the_run_as_it_was(run):
    from megatron_opd.models.model_dir import read_model_dir

    before = _snapshot(run)
    out = _train(run.parent, "model.num_layers=4", "model.rope_theta=5e5", "train.optim.lr=1e-4")
    assert out.returncode != 0
    assert _snapshot(run) == before, "a refused resume changed the run directory"
    assert read_model_dir(run).model.num_layers == 2
    # Refused before loading, naming every fixed key that changed with both values, and the way out.
    assert "model.num_layers: 2 -> 4" in out.stderr and "model.rope_theta: 10000.0 -> 500000.0" in out.stderr
    assert "train.restart=true" in out.stderr
    assert "train.optim.lr" not in out.stderr.split("cannot resume")[-1].split("these keys")[0]  # changeable

    # A checkpoint that fails to load (a truncated shard), with a config that passes the check.
    shard = max((run / "checkpoints/step_00000003").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:100])
    before = _snapshot(run)
    out = _train(run.parent, "train.steps=4")
    assert out.returncode != 0
    assert _snapshot(run) == before, "a resume that failed to load changed the run directory"


# -- item 13 (changeable keys): applied and logged --------------------------------------------------


def test_a_resume_applies_and_logs_changed_hyperparameters(run):
    out = _ok(_train(run.parent, "train.steps=6", "train.optim.lr=5e-4", "train.optim.adam_beta2=0.9"))
    # The LR after each resumed step is the new schedule's: linear from 5e-4 to 0 over 6 steps.
    lrs = dict(_train_rows(run, "train/lr"))
    for step in (4, 5, 6):
        assert lrs[step] == pytest.approx(5e-4 * (1 - step / 6), rel=1e-9, abs=1e-15), (step, lrs[step])
    # and the first attempt's, before it, was the old one's: linear from 3e-3 over 3 steps.
    assert lrs[1] == pytest.approx(3e-3 * (1 - 1 / 3), rel=1e-9)
    for line in (
        "resume: train.optim.lr: 0.003 -> 0.0005 (applied)",
        "resume: train.steps: 3 -> 6 (applied)",
        "resume: train.optim.adam_beta2: 0.95 -> 0.9 (applied)",
    ):
        assert line in out.stdout, out.stdout[-3000:]
    # The saved optimizer state carries the new Adam betas.
    from megatron_opd.runtime.checkpoint import latest_complete

    groups = _saved_param_groups(latest_complete(run / "checkpoints"))
    assert groups and all(tuple(g["betas"]) == (0.9, 0.9) and g["max_lr"] == 5e-4 for g in groups), groups


def _saved_param_groups(checkpoint: Path) -> list[dict]:
    """The optimizer's param groups as megatron saved them (in the checkpoint's common state)."""
    from megatron.core import dist_checkpointing

    return list(dist_checkpointing.load_common_state_dict(str(checkpoint))["optimizer"]["param_groups"])


# -- item 3: resume=false refused on a run with checkpoints; restart starts over ---------------------


def test_resume_false_is_refused_and_restart_starts_over_cleanly(run):
    base_losses = dict(_train_rows(run, "train/loss"))
    before = _snapshot(run)
    out = _train(run.parent, "train.resume=false", "train.steps=2")
    assert out.returncode != 0
    assert "train.resume=false" in out.stderr and "train.restart=true" in out.stderr
    assert _snapshot(run) == before

    out = _ok(_train(run.parent, "train.restart=true", "train.steps=2"))
    assert "moved the previous run to" in out.stdout
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    (previous,) = (run / "previous").iterdir()
    assert sorted(p.name for p in (previous / "checkpoints").iterdir()) == [f"step_{s:08d}" for s in (1, 2, 3)]
    assert _ledger_steps(run) == [1, 2]
    assert [s for s, _ in _train_rows(run, "train/loss")] == [1, 2]
    assert [r["step"] for r in _rows(run)] == [0, 1, 2, 2]  # eval at start, two steps, final eval
    # A clean start is a fresh run: the same first losses as the original's (same seeds, same data).
    new_losses = dict(_train_rows(run, "train/loss"))
    assert new_losses[1] == base_losses[1] and new_losses[2] == base_losses[2]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["step"], summary["finished"]) == (2, True)

    # The next rerun continues the new run, not the old one's newer step 3.
    out = _ok(_train(run.parent, "train.steps=2"))
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'}" in out.stdout
    assert _ledger_steps(run) == [1, 2]


# -- item 4: a rerun of a finished run keeps its summary ------------------------------------------


def test_a_rerun_of_a_finished_run_keeps_its_summary(run):
    from megatron_opd.stages.run_dir import is_finished

    summary = (run / "summary.json").read_bytes()
    records = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "samples.jsonl")}
    _ok(_train(run.parent))
    assert (run / "summary.json").read_bytes() == summary
    assert {name: (run / name).read_bytes() for name in records} == records
    final = json.loads(summary)
    assert final["finished"] is True and final["step"] == final["steps"] == 3 and final["stopped_early"] == 0
    assert {"loss", "acc/add", "acc/mean"} <= set(final)
    assert is_finished(run, 3) and not is_finished(run, 4)


# -- smaller: metrics.jsonl and TensorBoard drop what was logged after the resumed step -----------


def test_metrics_after_the_resumed_step_are_dropped(run):
    original = dict(_train_rows(run, "train/loss"))
    # Step 3 was logged, then the attempt died before its checkpoint was complete.
    (run / "checkpoints/step_00000003/COMPLETE").unlink()
    _ok(_train(run.parent))
    assert [s for s, _ in _train_rows(run, "train/loss")] == [1, 2, 3]
    assert [s for s, _ in _train_rows(run, "eval/acc/mean")] == [0, 3]
    assert dict(_train_rows(run, "train/loss")) == original  # and step 3 redone exactly
    assert _ledger_steps(run) == [1, 2, 3]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]


# -- the table of resume rules ----------------------------------------------------------------------


def test_every_config_key_has_a_resume_rule():
    from megatron_opd.config import derive, load_config, to_dict
    from megatron_opd.stages.run_dir import RESUME_RULES, config_changes, flatten, rule_for, saved_config

    cfg = load_config(REPO / "configs/tiny/opd.yaml")
    keys = {**flatten(to_dict(cfg)), **flatten(to_dict(load_config(None)))}  # with teachers, and without
    for key in keys:
        kind, why = rule_for(key)  # raises for a key without a rule
        assert kind in ("fixed", "changeable") and why
    assert all(kind in ("fixed", "changeable") for _, kind, _ in RESUME_RULES)
    assert rule_for("model.rope_theta")[0] == "fixed" and rule_for("train.optim.lr")[0] == "changeable"
    # A saved config from code without a newer key compares equal where the key has its default.
    tree = to_dict(cfg)
    del tree["model"]["rope_theta"]
    assert config_changes(tree, cfg) == []
    changed = {c.key: c for c in config_changes(saved_config(cfg), derive(cfg, ["model.num_layers=3", "train.steps=9"]))}
    assert set(changed) == {"model.num_layers", "train.steps"}
    assert (changed["model.num_layers"].kind, changed["train.steps"].kind) == ("fixed", "changeable")
    # A teacher added to a run that had none is a fixed change, named by its keys.
    sft = load_config(REPO / "configs/tiny/sft.yaml")
    kinds = {c.key: c.kind for c in config_changes(saved_config(sft), derive(sft, teachers={"t": {"domains": ["add"]}}))}
    assert kinds["teachers"] == kinds["teachers.t.domains"] == "fixed"
