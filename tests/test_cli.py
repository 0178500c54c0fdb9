"""The `megatron-opd` command end to end: help, and a real tiny TP=2 training run with metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "megatron_opd.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_subcommands():
    out = _cli("--help")
    assert out.returncode == 0, out.stderr
    assert "train" in out.stdout


def test_unknown_config_key_exits_with_named_key(tmp_path):
    out = _cli("train", str(REPO / "configs/tiny/sft.yaml"), "train.stepz=3")
    assert out.returncode != 0
    assert "did you mean 'train.steps'" in out.stderr


def test_train_tiny_tp2_writes_metrics_and_resumes(tmp_path):
    common = [
        str(REPO / "configs/tiny/sft.yaml"),
        f"run.output_dir={tmp_path}",
        "run.name=cli",
        "run.log_every=2",
        "train.eval_every=0",
        "data.eval_size=16",
        "train.optim.warmup_steps=0",
    ]
    out = _cli("train", *common, "train.steps=6")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "cli"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert records[-1]["train/loss"] < records[0]["train/loss"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "checkpoints/step_00000006/COMPLETE").is_file()
    assert json.loads((run / "summary.json").read_text())["loss"] == records[-1]["train/loss"]
    assert (run / "model.yaml").is_file() and (run / "tokenizer.json").is_file()
    # A longer run of the same name continues from step 6 instead of starting over.
    out = _cli("train", *common, "train.steps=8")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout and "step_00000006" in out.stdout
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]


def test_bf16_tp2_resume_equals_uninterrupted(tmp_path):
    """bf16 params with float32 main params in megatron's optimizer: checkpoint, resume, same losses."""
    common = [
        str(REPO / "configs/tiny/sft.yaml"),
        f"run.output_dir={tmp_path}",
        "run.log_every=1",
        "train.precision=bf16",
        "train.eval_every=0",
        "data.eval_size=16",
        "train.micro_batch_size=16",
        "train.global_batch_size=32",
    ]
    straight = _cli("train", *common, "run.name=straight", "train.steps=4")
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    first = _cli("train", *common, "run.name=resumed", "train.steps=2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = _cli("train", *common, "run.name=resumed", "train.steps=4")
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stderr[-3000:]

    def losses(name: str) -> dict[int, float]:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}

    assert losses("straight") == losses("resumed")  # bit-identical, bf16 included
    assert losses("straight")[4] < losses("straight")[1]
