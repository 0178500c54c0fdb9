"""Load a converted or resharded checkpoint the way training does and run it: the proof that it works.

`load_and_forward` runs on every rank of a world (spawn_world locally, torchrun on a cluster):
it initialises the runtime for a layout, builds the model from model.yaml, loads the checkpoint
with runtime.checkpoint.load_checkpoint and returns the full-vocabulary logits of a forward
pass (gathered over TP) on rank 0. PP > 1 loads only (no forward): it proves the layout loads.
"""

from __future__ import annotations

from pathlib import Path


def load_and_forward(path: str, layout: dict, tokens: list[list[int]], seed: int = 0):
    """Worker: returns (logits [b, s, vocab_size] float32 on rank 0 else None, the layout it ran)."""
    import torch

    from megatron_opd.models.gpt import build_gpt_model
    from megatron_opd.models.hf.megatron_io import open_megatron
    from megatron_opd.runtime.checkpoint import load_checkpoint
    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.runtime.layout import ParallelLayout

    resolved = init_runtime(ParallelLayout(**layout), seed)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model = open_megatron(path)
    net = build_gpt_model(model.cfg, resolved)
    load_checkpoint(model.step_dir, [net], load_rng=False)
    if resolved.pp > 1:
        return None, resolved
    net.eval()
    device = next(net.parameters()).device
    ids = torch.tensor(tokens, dtype=torch.long, device=device)
    positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
    with torch.no_grad():
        logits = net(ids, positions, None)
        logits = gather_from_tensor_model_parallel_region(logits)[..., : model.cfg.vocab_size]
    rank = parallel_state.get_tensor_model_parallel_rank() + parallel_state.get_data_parallel_rank()
    return (logits.float().cpu() if rank == 0 else None), resolved


def verify_in_world(path: str | Path, layout: dict, tokens: list[list[int]], world_size: int):
    """Spawn a local world and return rank 0's logits (see load_and_forward)."""
    from megatron_opd.runtime.spawn import spawn_world

    results = spawn_world(load_and_forward, world_size, (str(path), layout, tokens), timeout_s=600)
    return results[0][0]
