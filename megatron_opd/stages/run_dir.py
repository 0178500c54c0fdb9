"""A run directory's lifecycle: how a run starts (fresh, resumed or over), what may change on
resume, and when it is finished.

    <run_dir>/checkpoints/step_N/   megatron dist checkpoints (runtime/checkpoint.py); each one's
                                    common state holds the job config that wrote it
    <run_dir>/config.yaml           the job config of the latest attempt
    <run_dir>/model.yaml, tokenizer.json or hf/   the model directory (models/model_dir.py)
    <run_dir>/metrics.jsonl, tensorboard/   stages/reporting.py
    <run_dir>/samples.jsonl         the sample ledger (stages/trainer.py)
    <run_dir>/summary.json          final metrics, the step reached, and whether that was train.steps
    <run_dir>/previous/<time>/      what `train.restart=true` moved aside

Rules the trainer keeps with these helpers:
- nothing about a run is written before its checkpoint has loaded (or it starts fresh), so a
  refused or failed resume leaves the directory as it was;
- `train.resume=false` on a directory that holds checkpoints is refused; `train.restart=true`
  moves the old run's files aside first and starts at step 0;
- on resume the saved config is compared with the new one through `RESUME_RULES`, the one table
  of which keys may change: a changed `fixed` key is refused (every such key, old and new value),
  a changed `changeable` key is applied and logged;
- a run is finished when its summary says it reached `train.steps`; launchers rerun (resume)
  whatever is not.
"""

from __future__ import annotations

import fnmatch
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from megatron_opd.config import ConfigError, JobConfig, build, load_config, to_dict

Kind = Literal["fixed", "changeable"]

# Which config keys may differ between a run's checkpoint and the job that resumes it. Dotted
# keys, fnmatch patterns, first match wins; tests/test_lifecycle.py checks that every key of the
# config tree matches a rule, so a new key must be placed here.
RESUME_RULES: list[tuple[str, Kind, str]] = [
    ("stage", "fixed", "a checkpoint belongs to one stage's objective"),
    ("model.*", "fixed", "the architecture: the checkpoint's tensors have its shapes and meaning"),
    ("run.seed", "fixed", "seeds: the resumed steps must draw what the first attempt would have"),
    ("data.domains", "fixed", "the prompt source: the step is the data cursor into it"),
    ("data.datasets", "fixed", "the prompt files, their weights and held-out rows: the step is the data cursor into their mix"),
    ("data.bad_rows", "fixed", "which rows the data cursor runs over"),
    ("data.seed", "fixed", "the prompt source"),
    ("data.annotations", "fixed", "the judge's prompt source and labels"),
    ("data.judge_template", "fixed", "the judge's prompts"),
    ("data.samples", "fixed", "the prompt source: the responses SFT trains on"),
    ("data.tokenizer", "changeable", "the run keeps its own tokenizer; another one is refused by its fingerprint"),
    ("data.*", "changeable", "evaluation size"),
    ("train.global_batch_size", "fixed", "samples per step: the step is the data cursor"),
    ("train.precision", "fixed", "the optimizer state (float32 main params under bf16)"),
    ("train.use_distributed_optimizer", "fixed", "the optimizer state's layout"),
    ("train.export_hf", "changeable", "where the finished run is released; the weights are the checkpoint's"),
    ("train.optim.*", "changeable", "applied: the LR schedule is rebuilt from the new values at the checkpoint's step"),
    ("train.*", "changeable", "steps, micro-batch size, eval/checkpoint cadence, resume/restart/init_from"),
    ("teachers", "fixed", "the set of teachers (an empty section; a named teacher has the keys below)"),
    ("teachers.*.domains", "fixed", "which teacher supervises which samples"),
    ("teachers.*.signal", "fixed", "the distillation objective"),
    ("teachers.*.topk", "fixed", "the distillation objective"),
    ("teachers.*.temperature", "fixed", "the distillation objective"),
    ("teachers.*.model_dir", "fixed", "the teacher itself"),
    ("teachers.*.placement", "changeable", "where the teacher runs: in-job and served teachers give the same signals"),
    ("teachers.*", "changeable", "endpoints, keys, timeouts, batching, wire format: how the teacher is reached"),
    ("parallel.*", "changeable", "checkpoints reshard to another layout (RNG states restore only under the same one)"),
    ("rollout.keep_routing", "fixed", "the training forward's routing: replayed experts are part of the objective"),
    ("rollout.keep_sampling_mask", "fixed", "the policy's action space: log-probs renormalised over the kept sets"),
    ("rollout.*", "changeable", "sampling settings and the engine"),
    ("opd.*", "changeable", "numerically equivalent paths, the signal cache, how in-job teachers are scheduled"),
    ("grpo.eps_low", "changeable", "the clip range: applied to the updates after the resumed step"),
    ("grpo.eps_high", "changeable", "the clip range: applied to the updates after the resumed step"),
    ("grpo.opsm_delta", "changeable", "the masking threshold: applied to the updates after the resumed step"),
    ("grpo.aggregation", "changeable", "how token losses are averaged: applied to the updates after the resumed step"),
    ("grpo.*", "fixed", "group size, updates per batch, dynamic sampling and refill rounds place the data cursor; "
     "advantages, reference, KL and kept-set log-probs are part of a rollout a checkpoint keeps"),
    ("grm.judge_url", "changeable", "where the judge server is"),
    *[(f"grm.{k}", "changeable", "what the GRM report runs and measures (launchers/grm.py), not this run's training")
      for k in ("seeds", "compare", "cold_start_overrides", "judge_rl_overrides", "reward_model_overrides", "eval_samples",
                "eval_votes")],  # fmt: skip
    ("grm.*", "fixed", "the judge and its rewards: a rollout a checkpoint keeps was scored with them"),
    ("run.*", "changeable", "where and how the run reports"),
    ("pipeline.*", "changeable", "read by `megatron-opd run`, not by the trainer"),
    ("recipe.*", "changeable", "read by `megatron-opd run` (launchers/recipe.py), not by the trainer"),
    ("cluster.*", "changeable", "read by the SLURM launcher, not by the trainer"),
]

_ABSENT = "<absent>"


class ResumeRefused(ConfigError):
    """The run directory cannot be continued by this job as configured; the message says why and what to do."""


def rule_for(key: str) -> tuple[Kind, str]:
    for pattern, kind, why in RESUME_RULES:
        if fnmatch.fnmatchcase(key, pattern):
            return kind, why
    raise KeyError(f"config key {key!r} has no rule in RESUME_RULES (megatron_opd/stages/run_dir.py)")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and empty mappings are values."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def saved_config(cfg: JobConfig) -> dict[str, Any]:
    """The config as a checkpoint keeps it: a plain tree (it holds no API key: keys are read
    from the environment or a file, config/job.py)."""
    return to_dict(cfg)


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any
    kind: Kind

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


def config_changes(saved: dict[str, Any], new: JobConfig) -> list[Change]:
    """Every leaf key whose value differs between a saved config tree and `new`, with its rule."""
    try:  # fill keys that this code has and the saved config's code had not, with their defaults
        saved = to_dict(build(JobConfig, saved))
    except ConfigError:  # a key this code no longer knows: compare the trees as they are
        pass
    old, now = flatten(saved), flatten(saved_config(new))
    changes = []
    for key in sorted(set(old) | set(now)):
        a, b = old.get(key, _ABSENT), now.get(key, _ABSENT)
        if a != b:
            changes.append(Change(key, a, b, rule_for(key)[0]))
    return changes


@dataclass
class StartPlan:
    """How this attempt starts: from `checkpoint` at `step`, or fresh (checkpoint None)."""

    checkpoint: Path | None = None
    step: int = 0
    changes: list[Change] = field(default_factory=list)  # changeable keys, applied
    moved_aside: Path | None = None  # where train.restart=true put the old run


def plan_start(cfg: JobConfig, tokenizer_fingerprint: str | None = None, *, act: bool = True) -> StartPlan:
    """Decide how `cfg` starts in its run directory; refuse (ResumeRefused) before anything is
    touched when it cannot. Moves the old run aside when `train.restart` says so and `act`
    (act=False: only the check, as the CLI runs it before any rank starts)."""
    from megatron_opd.runtime import checkpoint as ckpt

    t, run_dir = cfg.train, cfg.run_dir
    latest = ckpt.latest_complete(run_dir / "checkpoints")
    if t.restart:
        return StartPlan(moved_aside=move_aside(run_dir) if act else None)
    if latest is None:
        return StartPlan()
    step = ckpt.checkpoint_step(latest)
    if not t.resume:
        raise ResumeRefused(
            f"train.resume=false but {run_dir} holds checkpoints (newest: step {step}, {latest}); "
            f"set train.restart=true to move the old run aside and start over, drop train.resume=false "
            f"to continue it, or choose another run.name"
        )
    common = ckpt.read_common_state(latest)
    saved = common.get("config")
    if saved is None:  # written before checkpoints carried their config
        yaml_path = run_dir / "config.yaml"
        if not yaml_path.is_file():
            raise ResumeRefused(
                f"{latest} does not record the config that wrote it and {yaml_path} is missing, so "
                f"this job cannot be checked against it; set train.restart=true to start over, or "
                f"choose another run.name"
            )
        saved = to_dict(load_config(yaml_path))
    changes = config_changes(saved, cfg)
    problems = [str(c) for c in changes if c.kind == "fixed"]
    saved_tokenizer = common.get("tokenizer")
    if tokenizer_fingerprint and saved_tokenizer and saved_tokenizer != tokenizer_fingerprint:
        problems.append(f"tokenizer fingerprint: {saved_tokenizer} -> {tokenizer_fingerprint}")
    if step > t.steps:
        problems.append(f"train.steps: {t.steps} is below the checkpoint's step {step}")
    if problems:
        raise ResumeRefused(
            f"cannot resume {run_dir} from {latest.name} with this config:\n  "
            + "\n  ".join(problems)
            + "\nthese keys fix what the checkpoint holds (RESUME_RULES in megatron_opd/stages/run_dir.py): "
            "set them back, start over with train.restart=true (the old run is moved aside), or "
            "choose another run.name"
        )
    return StartPlan(checkpoint=latest, step=step, changes=[c for c in changes if c.kind == "changeable"])


# What a run writes into its directory; train.restart=true moves exactly these aside.
RUN_FILES = ("checkpoints", "samples.jsonl", "metrics.jsonl", "tensorboard", "summary.json", "config.yaml",
             "model.yaml", "tokenizer.json", "hf")


def move_aside(run_dir: Path) -> Path | None:
    """Move the run's own files into `<run_dir>/previous/<time>/` (nothing else in the directory:
    a pipeline keeps other runs below its own). Returns where, or None when there was nothing."""
    present = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    if not present:
        return None
    dest = run_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while dest.exists():
        dest = dest.with_name(f"{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    dest.mkdir(parents=True)
    for path in present:
        os.replace(path, dest / path.name)
    return dest


# -- the summary: what a finished (or stopped) attempt leaves, and what launchers read --------------


def write_summary(run_dir: Path, final: dict[str, Any]) -> None:
    path = run_dir / "summary.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(final, indent=1))
    os.replace(tmp, path)


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def is_finished(run_dir: Path, steps: int) -> bool:
    """The run reached its last step: its summary says finished at step == `steps`."""
    summary = read_summary(run_dir)
    return bool(summary and summary.get("finished") and summary.get("step") == steps)
