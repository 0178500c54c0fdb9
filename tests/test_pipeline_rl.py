"""`megatron-opd run` with RL for the experts (launchers/local.py, pipeline.expert_rl_overrides).

A real `megatron-opd run` process (spawned rank worlds, a real teacher server on 127.0.0.1): an
expert with GRPO overrides is trained by SFT into `<expert dir>-sft`, then by GRPO from that run
into the expert directory, which is the one served to the OPD stage; the report shows the expert
after SFT and after GRPO beside the student before and after OPD (table and summary.json). An
expert without GRPO overrides stays SFT only (tests/test_local_launcher.py runs that job). A bad
GRPO override is refused in one line before anything starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from megatron_opd.config import derive, dump_config, load_config

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_opd.cli", *args]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MEGATRON_OPD_FAULT"}
    return dict(env, PYTHONPATH=str(REPO), COLUMNS="200")  # the report's table unwrapped


def _config(path: Path, *rl: str) -> Path:
    one_rank = ["run.nproc=1", "parallel.tp=1", "train.checkpoint_every=0", "train.eval_at_start=false"]
    cfg = derive(
        load_config(REPO / "configs/tiny/opd.yaml"),
        [
            "run.name=tiny",
            "run.progress=none",
            "run.log_every=1",
            "data.domains=[add]",
            "data.eval_size=8",
            "train.steps=2",
            "train.global_batch_size=8",
            "train.micro_batch_size=8",
            "train.eval_every=2",
            "train.checkpoint_every=0",
        ],
        teachers={"arith": {"domains": ["add"], "signal": "hidden"}},
        **{
            "pipeline.expert_overrides": one_rank + ["train.steps=3", "train.eval_every=3", "train.global_batch_size=16",
                                                     "train.micro_batch_size=16"],  # fmt: skip
            "pipeline.expert_overrides_by_teacher": {},
            "pipeline.expert_rl_overrides": [],
            "pipeline.expert_rl_overrides_by_teacher": {"arith": list(rl)},
            "pipeline.student_overrides": [],
        },
    )
    dump_config(cfg, path)
    return path


def test_run_trains_an_expert_by_sft_then_grpo_and_reports_both(tmp_path):
    rl = ["run.nproc=1", "parallel.tp=1", "train.steps=2", "train.eval_every=2", "train.checkpoint_every=0",
          "train.global_batch_size=8", "train.micro_batch_size=8", "grpo.group_size=4"]  # fmt: skip
    config = _config(tmp_path / "job.yaml", *rl)
    out = subprocess.run(_cli("run", str(config), f"run.output_dir={tmp_path}"), cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    experts = tmp_path / "tiny/experts"
    sft, grpo = experts / "arith-sft", experts / "arith"
    sft_summary = json.loads((sft / "summary.json").read_text())
    grpo_summary = json.loads((grpo / "summary.json").read_text())
    assert sft_summary["finished"] and sft_summary["step"] == 3
    assert grpo_summary["finished"] and grpo_summary["step"] == 2
    grpo_cfg = yaml.safe_load((grpo / "config.yaml").read_text())
    assert grpo_cfg["stage"] == "grpo" and grpo_cfg["train"]["init_from"] == str(sft)
    assert grpo_cfg["data"]["domains"] == ["add"] and grpo_cfg["grpo"]["group_size"] == 4
    # The GRPO run trained on its own rollouts (train/reward) from the SFT weights.
    rows = [json.loads(line) for line in (grpo / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    assert all("train/reward/add" in r and "train/entropy/add" in r for r in rows if "train/loss" in r)
    # The distillation's teacher is the GRPO run's model directory.
    opd_cfg = yaml.safe_load((tmp_path / "tiny/opd/config.yaml").read_text())
    assert opd_cfg["teachers"]["arith"]["model_dir"] == str(grpo)
    assert "GRPO: arith (2 steps)" in out.stdout
    summary = json.loads((tmp_path / "tiny/summary.json").read_text())
    row = summary["domains"]["add"]
    assert row["expert_accuracy_after_sft"] == sft_summary["acc/add"]
    assert row["expert_accuracy_after_grpo"] == grpo_summary["acc/add"] == row["teacher_accuracy"]
    for column in ("expert after SFT", "expert after GRPO", "student before OPD", "student after OPD"):
        assert column in out.stdout, column


def test_a_bad_grpo_override_is_refused_before_anything_starts(tmp_path):
    config = _config(tmp_path / "job.yaml", "grpo.group_size=1")
    out = subprocess.run(_cli("run", str(config), f"run.output_dir={tmp_path}"), cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: the GRPO job of expert 'arith' (pipeline.expert_rl_overrides)"), line
    assert "grpo.group_size=1" in line
    assert not (tmp_path / "tiny").exists()
