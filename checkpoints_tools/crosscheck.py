"""Cross-check our conversion against NVIDIA Megatron-Bridge, where it is installed (GPU cluster images).

    python -m checkpoints_tools.crosscheck --hf HF_DIR --megatron MODEL_DIR

Megatron-Bridge is the maintained HF <-> megatron converter, but it needs Python >= 3.12 and
Transformer Engine, so our own tables are what runs and is tested everywhere. Where Bridge is
present this builds the model from HF_DIR with Bridge (TP=1, its own weight loading) and compares
every tensor of that model, addressed through the model's own `sharded_state_dict()`, with the
checkpoint our `convert` wrote in MODEL_DIR (convert it on the same machine, so that the Transformer
Engine key naming matches). Run under torchrun with one process per GPU, or plainly on one GPU.

Vocabulary rows are compared up to the HF vocab size (the paddings may differ). Exit status 0
when every tensor is identical, 1 otherwise (the differing tensors are printed), 2 on errors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def compare_model_with_checkpoint(model, step_dir: Path, vocab_size: int) -> dict[str, float]:
    """Max abs difference per checkpoint key between a megatron model (TP=PP=EP=1) and a checkpoint."""
    import torch

    from megatron_opd.models.hf.megatron_io import Region, read_regions, stored_tensors, tensor_shards

    stored = stored_tensors(step_dir)
    diffs: dict[str, float] = {}
    for name, obj in model.sharded_state_dict().items():
        for sh in tensor_shards(obj) or []:
            if sh.key not in stored:
                diffs[sh.key] = float("inf")
                continue
            data = sh.data.detach().float().cpu()
            shape = list(data.shape)
            if "word_embeddings" in sh.key or sh.key.startswith("output_layer"):
                shape[0] = min(shape[0], vocab_size - sh.global_offset[sh.prepend_axis_num])
                data = data[: shape[0]]
            dest = torch.empty(shape, dtype=stored[sh.key].dtype)
            read_regions(
                step_dir,
                [
                    Region(
                        sh.key, tuple(sh.global_offset), dest.view((1,) * sh.prepend_axis_num + tuple(shape))
                    )
                ],
            )
            diff = (dest.float() - data).abs().max().item() if data.numel() else 0.0
            diffs[sh.key] = max(diffs.get(sh.key, 0.0), diff)
    return diffs


def bridge_model(hf_dir: Path):
    """The TP=1 megatron model Megatron-Bridge builds and loads from an HF directory."""
    try:
        from megatron.bridge import AutoBridge
    except Exception as e:  # noqa: BLE001 - Bridge raises whatever TE raises when broken
        from megatron_opd.models.hf.errors import CheckpointError

        raise CheckpointError(
            f"Megatron-Bridge is not importable here ({type(e).__name__}: {e}); it needs Python >= 3.12 and "
            f"Transformer Engine (GPU images)"
        ) from None
    bridge = AutoBridge.from_hf_pretrained(str(hf_dir))
    provider = bridge.to_megatron_provider(load_weights=True)
    provider.tensor_model_parallel_size = provider.pipeline_model_parallel_size = 1
    if hasattr(provider, "finalize"):
        provider.finalize()
    chunks = provider.provide_distributed_model(wrap_with_ddp=False)
    return chunks[0] if isinstance(chunks, (list, tuple)) else chunks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m checkpoints_tools.crosscheck",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--hf", required=True, help="the Hugging Face directory that was converted")
    p.add_argument(
        "--megatron", required=True, help="our conversion of it (model directory or step_* directory)"
    )
    args = p.parse_args(argv)
    from megatron_opd.models.hf.errors import CheckpointError
    from megatron_opd.models.hf.megatron_io import open_megatron
    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.runtime.layout import ParallelLayout

    try:
        ours = open_megatron(args.megatron)
        init_runtime(ParallelLayout(), seed=0)
        diffs = compare_model_with_checkpoint(bridge_model(Path(args.hf)), ours.step_dir, ours.cfg.vocab_size)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bad = {k: v for k, v in diffs.items() if v != 0.0}
    for k, v in sorted(bad.items()):
        print(f"differs: {k} max abs diff {v}")
    print(f"{len(diffs) - len(bad)}/{len(diffs)} tensors identical to Megatron-Bridge's")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
