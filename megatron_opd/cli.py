"""The `megatron-opd` command: run the pipeline, train a stage, serve a teacher, benchmarks.

Every subcommand's arguments are declared here, in one place; the code that runs it is imported
only when it runs (`module:function`, called with the parsed arguments), so `--help` is fast
and a CPU machine never imports GPU-only code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from typing import Callable


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
    p.add_argument("which", choices=["loss", "teachers"], help="loss: reverse-KL kernels; teachers: wire formats")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own flags (see: bench WHICH --help)")


def _passthrough_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs=argparse.REMAINDER, help="the tool's own flags (see: TOOL --help)")


_CHECKPOINT_TOOLS = {
    "convert": "Hugging Face <-> megatron dist checkpoint",
    "export": "any trained model to Hugging Face format (SGLang, transformers)",
    "reshard": "a megatron checkpoint to another TP/PP/EP layout",
    "merge": "weight-merging baselines (uniform average, task arithmetic)",
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
        "train one stage (stage: sft | opd) from a config",
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
        "benchmarks that print a table: loss (reverse-KL kernels), teachers (signal wire formats)",
        _bench_args,
        "megatron_opd.cli:bench_command",
    ),
}


def bench_command(args) -> int:
    module = {"loss": "megatron_opd.losses.bench", "teachers": "megatron_opd.teachers.bench"}[args.which]
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-opd",
        description="Multi-teacher on-policy distillation and expert post-training on megatron-core.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, target) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, aliases=_ALIASES.get(name, []))
        add_arguments(p)
        p.set_defaults(_target=target)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_known_warnings()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in _CHECKPOINT_TOOLS:  # the tool parses its own flags, --help included
        return int(importlib.import_module(f"checkpoints_tools.{argv[0]}").main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    module, _, function = args._target.partition(":")
    return int(getattr(importlib.import_module(module), function)(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
