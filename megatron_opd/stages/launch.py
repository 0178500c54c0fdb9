"""Start a stage on this process's ranks: under torchrun/SLURM as launched, or spawn `run.nproc` local ranks.

`megatron-opd train CONFIG [overrides]` lands here. The config is checked (`JobConfig.check`,
against the world it will run on) before any rank starts, and again on every rank before it
builds anything; then every rank builds the runtime, the trainer and the stage (found through
the stage registry, config/stages.py), runs the shared loop, and rank 0 prints a summary and
writes `summary.json` (and, for a finished run with `train.export_hf`, releases the final
checkpoint as a Hugging Face directory: stages/release.py). The command exits 0 when the run reached train.steps, and
EXIT_STOPPED_EARLY (75) when a stop signal ended it earlier with a checkpoint (a rerun resumes
it). Spawning the ranks itself, it forwards SIGTERM/SIGINT/SIGUSR1 to them (runtime/spawn.py,
forward_stop_signals).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from megatron_opd.config import ConfigError, JobConfig, build, load_config, stage_spec, to_dict
from megatron_opd.data.tokenizer import Tokenizer, run_tokenizer
from megatron_opd.runtime.spawn import forward_stop_signals, spawn_world
from megatron_opd.stages.run_dir import plan_start, write_summary


def make_stage(cfg: JobConfig, trainer, tokenizer):
    """The stage named by `cfg.stage`, from the registry's "module:Class"."""
    module, _, name = stage_spec(cfg.stage).target.partition(":")
    return getattr(importlib.import_module(module), name)(cfg, trainer, tokenizer)


def _launched() -> bool:
    """Whether torchrun or SLURM started this process as one rank of a world."""
    return "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def world_size(cfg: JobConfig) -> int:
    """The ranks `cfg` runs on: the launcher's world, else `run.nproc` ranks spawned here."""
    if _launched():
        # Imported here: a config error is reported before torch is imported (a fast `error:`).
        from megatron_opd.runtime.distributed import process_env

        return process_env().world_size
    return cfg.run.nproc


def job_tokenizer(cfg: JobConfig) -> Tokenizer:
    """The job's tokenizer (the run's own, else data.tokenizer, else its init_from model's, else the
    character tokenizer), checked against `model.vocab_size` (a rank-free check that needs it)."""
    tokenizer = run_tokenizer(cfg.run_dir, cfg.train.init_from, cfg.data.tokenizer)
    if cfg.model.vocab_size != tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} but the tokenizer has {tokenizer.vocab_size} tokens; "
            f"set model.vocab_size={tokenizer.vocab_size}"
        )
    return tokenizer


def check_job_data(cfg: JobConfig, tokenizer: Tokenizer) -> None:
    """Read data.datasets' files once as the stage will (SFT: whole conversations), so that a bad
    row stops the command with its file and line before any rank starts (ConfigError)."""
    if not cfg.data.datasets:
        return
    from megatron_opd.data.datasets import DatasetError
    from megatron_opd.data.sources import job_prompt_source

    try:
        job_prompt_source(cfg, tokenizer, demonstrations=cfg.stage == "sft")
    except DatasetError as e:
        raise ConfigError(str(e)) from None


def run_stage(cfg: JobConfig) -> dict[str, Any]:
    """Run `cfg` on this rank (collective); returns the final metrics (on every rank)."""
    from megatron_opd.runtime.distributed import init_runtime, process_env, shutdown
    from megatron_opd.runtime.resiliency import hold_stop_signals
    from megatron_opd.stages.trainer import Trainer

    hold_stop_signals()  # a stop during set-up is acted on after the first step, not fatal
    # Every rank checks again: a launcher (megatron-opd run, a test) may start it with a derived config.
    cfg.check(process_env().world_size)
    tokenizer = job_tokenizer(cfg)
    layout = init_runtime(cfg.parallel, cfg.run.seed)
    try:
        trainer = Trainer(cfg, layout, tokenizer)
        stage = make_stage(cfg, trainer, tokenizer)
        try:
            final = trainer.fit(stage)
        finally:
            stage.close()
        if trainer.is_logger:
            write_summary(cfg.run_dir, final)
            _print_summary(cfg, final)
        trainer.close()
    finally:
        shutdown()
    if cfg.train.export_hf and final.get("finished") and trainer.is_logger:
        from megatron_opd.stages.release import export_release

        export_release(cfg)  # after the final save, outside the job's process group
    return final


def _print_summary(cfg: JobConfig, final: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    state = "finished" if final.get("finished") else f"stopped at step {final.get('step')} of {final.get('steps')}"
    table = Table(title=f"{cfg.stage} run '{cfg.run.name}' {state}: {cfg.run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in sorted(final.items()):
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    Console().print(table)


def _rank_entry(cfg_tree: dict) -> dict[str, Any]:
    return run_stage(build(JobConfig, cfg_tree))


def launch(cfg: JobConfig) -> dict[str, Any]:
    """Run under an existing launcher (torchrun/SLURM env present), else spawn `run.nproc` ranks."""
    if _launched() or cfg.run.nproc == 1:
        return run_stage(cfg)
    with forward_stop_signals():
        return spawn_world(_rank_entry, cfg.run.nproc, (to_dict(cfg),), timeout_s=24 * 3600)[0]


# A run stopped by a preemption signal saved a checkpoint and wants to be run again (EX_TEMPFAIL).
EXIT_STOPPED_EARLY = 75


def train_command(args) -> int:
    cfg = load_config(args.config, args.overrides)
    # Before any rank starts (a ConfigError: the CLI prints it as one line and exits 2).
    cfg.check(world_size(cfg))
    tokenizer = job_tokenizer(cfg)
    check_job_data(cfg, tokenizer)  # a bad dataset row, too
    plan_start(cfg, tokenizer.fingerprint, act=False)  # a refused resume, too, before any rank starts
    final = launch(cfg)
    return 0 if final.get("finished") else EXIT_STOPPED_EARLY
