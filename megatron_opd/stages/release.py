"""The release at the end of a stage: `train.export_hf` as a Hugging Face directory.

When a run has reached train.steps (not when a stop signal ended it early), rank 0 exports the
run's final checkpoint with models/hf/export.py `megatron_to_hf`: config.json (the original one
of a model that came from Hugging Face, kept in <run_dir>/hf/, while `model:` still describes
its architecture), safetensors shards with their index, the tokenizer files and chat template
(<run_dir>/hf/, else the run's own tokenizer files), and manifest.json. The export is written
beside the target and swapped in when complete (models/hf/output.py), so a failed export leaves
an earlier release as it was.

It runs in a process of its own (`python -m megatron_opd.stages.release RUN_DIR OUT`) after the
job's process group is shut down: the conversion builds the model on the meta device in a world
of one (its own TP=PP=EP=1 parallel state), which cannot exist beside the job's, and a fresh
process starts without the launcher's rank environment. A rerun of a finished run exports again
(an earlier release is replaced; any other non-empty directory is refused: config/job.py
check_export_hf before the run, the export itself after it).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from megatron_opd.config import JobConfig


def export_release(cfg: JobConfig) -> None:
    """Export `cfg.run_dir`'s newest checkpoint to `cfg.train.export_hf` (raises on failure)."""
    from megatron_opd.serving.launch import subprocess_env

    out = cfg.train.export_hf
    cmd = [sys.executable, "-m", "megatron_opd.stages.release", str(cfg.run_dir), out]
    t0 = time.monotonic()
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeError(
            f"train.export_hf={out}: the export of {cfg.run_dir} failed (exit {done.returncode}): "
            f"{detail[-1] if detail else 'no output'}; the run's checkpoint is complete: rerun the job "
            f"to export again, or run python -m checkpoints_tools.export --input {cfg.run_dir} --output {out} --overwrite"
        )
    print(f"released {cfg.run_dir} as a Hugging Face model in {out} ({time.monotonic() - t0:.0f}s)", flush=True)


def main(argv: list[str]) -> int:
    from megatron_opd.models.hf.errors import CheckpointError
    from megatron_opd.models.hf.export import megatron_to_hf

    if len(argv) != 2:
        print("usage: python -m megatron_opd.stages.release RUN_DIR OUTPUT_DIR", file=sys.stderr)
        return 2
    # Replace an earlier release (it has the manifest an export writes), never anything else.
    earlier_release = (Path(argv[1]) / "manifest.json").is_file()
    try:
        megatron_to_hf(argv[0], argv[1], overwrite=earlier_release)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
