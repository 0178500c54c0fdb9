"""The `megatron-opd` command: run the pipeline, train a stage, serve a teacher, benchmarks.

Every subcommand's arguments are declared here, in one place; the code that runs it is imported
only when it runs (`module:function`, called with the parsed arguments), and only the chosen
subcommand's arguments are built, so `--help` is fast, a CPU machine never imports GPU-only
code, and `submit` on a login node imports neither torch nor megatron.

A config error (`ConfigError`: a bad key or value, a YAML syntax error, a failed
`JobConfig.check()`) is printed as one line, `error: ...`, and the command exits 2 without a
traceback; `train`, `run` and `submit` check the whole config before anything starts.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from typing import Callable

from megatron_opd.config import ConfigError
from megatron_opd.config.stages import implemented as implemented_stages

# Exit status of a command refused for its config (argparse's status for bad arguments).
EXIT_CONFIG_ERROR = 2


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (configs/tiny/*.yaml, configs/cluster/*.yaml)")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=50 parallel.tp=2"
    )


def _serve_args(p: argparse.ArgumentParser) -> None:
    from megatron_opd.serving.cli import add_arguments

    add_arguments(p)


def _submit_args(p: argparse.ArgumentParser) -> None:
    from launchers.slurm import add_arguments

    add_arguments(p)


def _bench_args(p: argparse.ArgumentParser) -> None:
    # Each benchmark declares its own flags; they are parsed by the benchmark itself.
    p.add_argument(
        "which",
        choices=["loss", "teachers", "rollout", "steps", "placement"],
        help="loss: reverse-KL kernels; teachers: wire formats; rollout: embedded KV cache vs none; "
        "steps: SFT vs GRPO vs OPD step (train tokens/s, rollout and scoring time); "
        "placement: an OPD step with served vs in-job teachers",
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own flags (see: bench WHICH --help)")


def _passthrough_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs=argparse.REMAINDER, help="the tool's own flags (see: TOOL --help)")


_CHECKPOINT_TOOLS = {
    "convert": "Hugging Face <-> megatron dist checkpoint",
    "export": "any trained model to Hugging Face format (SGLang, transformers)",
    "reshard": "a megatron checkpoint to another TP/PP/EP layout",
    "merge": "weight-merging baselines (uniform average, task arithmetic, TIES)",
}

# Older names that still work.
_ALIASES = {"serve": ["serve-teacher"]}

# name -> (help, add_arguments, "module:function")
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], str]] = {
    "run": (
        "run a whole distillation job on this machine: train missing experts, start their teacher "
        "servers, distil them into the student with OPD, report per domain",
        _config_args,
        "launchers.local:run_command",
    ),
    "submit": (
        "check a config's cluster: section, render the SLURM sbatch script and submit it "
        "(--dry-run prints it; nothing is submitted when a check fails)",
        _submit_args,
        "launchers.slurm:submit_command",
    ),
    "train": (
        f"train one stage (stage: {' | '.join(implemented_stages())}) from a config",
        _config_args,
        "megatron_opd.stages.launch:train_command",
    ),
    "serve": (
        "serve a megatron model as an SGLang-compatible teacher / rollout server (alias: serve-teacher)",
        _serve_args,
        "megatron_opd.serving.cli:serve_command",
    ),
    **{
        tool: (
            f"checkpoint tools: {text} (python -m checkpoints_tools.{tool}; see docs/checkpoints.md)",
            _passthrough_args,
            "",  # dispatched in main() before parsing
        )
        for tool, text in _CHECKPOINT_TOOLS.items()
    },
    "bench": (
        "benchmarks that print a table: loss (reverse-KL kernels), teachers (signal wire formats), "
        "rollout (embedded rollout tokens/s with and without the KV cache), steps (SFT, GRPO and OPD "
        "step tokens/s with their rollout and scoring time)",
        _bench_args,
        "megatron_opd.cli:bench_command",
    ),
}


def bench_command(args) -> int:
    module = {
        "loss": "megatron_opd.losses.bench",
        "teachers": "megatron_opd.teachers.bench",
        "rollout": "megatron_opd.rollout.bench",
        "steps": "megatron_opd.stages.bench",
        "placement": "megatron_opd.stages.placement_bench",
    }[args.which]
    return int(importlib.import_module(module).main(args.args) or 0)


def _quiet_known_warnings() -> None:
    # Import-time notices from optional GPU stacks that are absent by design on CPU.
    for pattern in (
        "The pynvml package is deprecated",
        "Apex is not installed",
        "Transformer Engine is not installed",
        "full scope is deprecated",
    ):
        warnings.filterwarnings("ignore", message=f".*{pattern}.*")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s arguments are declared (None: every subcommand's)."""
    parser = argparse.ArgumentParser(
        prog="megatron-opd",
        description="Multi-teacher on-policy distillation and expert post-training on megatron-core.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, target) in _COMMANDS.items():
        aliases = _ALIASES.get(name, [])
        p = sub.add_parser(name, help=help_text, description=help_text, aliases=aliases)
        if command is None or command == name or command in aliases:
            add_arguments(p)
        p.set_defaults(_target=target)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_known_warnings()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in _CHECKPOINT_TOOLS:  # the tool parses its own flags, --help included
        return int(importlib.import_module(f"checkpoints_tools.{argv[0]}").main(argv[1:]) or 0)
    # The first word that names a subcommand (options before it are the top level's own).
    command = next((a for a in argv if not a.startswith("-")), "")
    known = set(_COMMANDS) | {a for names in _ALIASES.values() for a in names}
    args = build_parser(command if command in known else "").parse_args(argv)
    module, _, function = args._target.partition(":")
    try:
        return int(getattr(importlib.import_module(module), function)(args) or 0)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR


if __name__ == "__main__":
    sys.exit(main())
