"""What a finished test run left behind, read back: metrics by step and the final weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def step_records(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl by step; a resumed run re-logs redone steps, and the last one counts."""
    out: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.setdefault(r["step"], {}).update(r)
    return out


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model tensors (no optimizer state) of the run's newest complete checkpoint."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from megatron_opd.runtime.checkpoint import latest_complete

    out = run_dir / "final.pt"
    dcp_to_torch_save(str(latest_complete(run_dir / "checkpoints")), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if torch.is_tensor(v) and not k.startswith("optimizer")}
