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
