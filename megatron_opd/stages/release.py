"""The release at the end of a stage: `train.export_hf` as a Hugging Face directory.

When a run has reached train.steps (not when a stop signal ended it early), rank 0 exports the
run's final checkpoint with `python -m checkpoints_tools.export` (models/hf/export.py
`megatron_to_hf`): config.json (the original one of a model that came from Hugging Face, kept in
<run_dir>/hf/), safetensors shards with their index, the tokenizer files and chat template, and
manifest.json. The export is written beside the target and swapped in when complete
(models/hf/output.py), so a failed export leaves an earlier release as it was.

It runs in a process of its own after the job's process group is shut down: the conversion
builds the model on the meta device in a world of one (its own TP=PP=EP=1 parallel state), which
cannot exist beside the job's, and it must not wait inside a collective while the other ranks
are done. A rerun of a finished run exports again (the same weights: the output is replaced).
"""

from __future__ import annotations

import subprocess
import sys
import time

from megatron_opd.config import JobConfig


def export_release(cfg: JobConfig) -> None:
    """Export `cfg.run_dir`'s newest checkpoint to `cfg.train.export_hf` (raises on failure)."""
    from megatron_opd.serving.launch import subprocess_env

    out = cfg.train.export_hf
    cmd = [sys.executable, "-m", "checkpoints_tools.export", "--input", str(cfg.run_dir), "--output", out,
           "--overwrite", "--no-progress"]  # fmt: skip
    t0 = time.monotonic()
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeError(
            f"train.export_hf={out}: the export failed (exit {done.returncode}): "
            f"{detail[-1] if detail else 'no output'}; the run's checkpoint is complete: rerun to export again, "
            f"or run {' '.join(cmd[1:])}"
        )
    print(f"released {cfg.run_dir} as a Hugging Face model in {out} ({time.monotonic() - t0:.0f}s)", flush=True)
