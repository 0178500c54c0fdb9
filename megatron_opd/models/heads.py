"""Teacher output-layer shards: the piece that turns a teacher's hidden states into exact logits.

A `hidden` teacher sends its final (post-norm) hidden states; the trainer multiplies them by the
teacher's own output layer, split over the student's tensor-parallel ranks exactly like the
student's vocab-parallel output layer, so student and teacher logits of one vocabulary shard
sit on the same rank. Only this rank's rows are read from the teacher's dist checkpoint when the
padded vocabularies agree; otherwise the full matrix is read once and re-cut. A teacher given as
a Hugging Face directory has its rows read straight from the memory-mapped safetensors
(lm_head.weight, or the embedding of a tied model).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megatron_opd.models.config import ModelConfig


def output_layer_key(cfg: ModelConfig) -> str:
    return "embedding.word_embeddings.weight" if cfg.tie_embeddings else "output_layer.weight"


def load_output_layer_shard(
    checkpoint: str | Path,
    teacher: ModelConfig,
    *,
    student_padded_vocab: int,
    tp_rank: int,
    tp_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rows [r * V/tp, (r+1) * V/tp) of the teacher's output layer in the student's padded vocab.

    `checkpoint`: a dist checkpoint (step_* directory), or a Hugging Face model directory
    (ModelDir.latest_checkpoint() gives either). Rows past the teacher's real vocabulary are zero
    (they are padding, excluded by every loss). Collective for a dist checkpoint when
    torch.distributed is initialised: every rank calls it.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_opd.models.hf.config_json import is_hf_model_dir

    key = output_layer_key(teacher)
    teacher_padded = teacher.padded_vocab_size(1)
    shard_rows = student_padded_vocab // tp_size
    d = teacher.hidden_size
    if student_padded_vocab % tp_size:
        raise ValueError(f"student padded vocabulary {student_padded_vocab} is not divisible by tp={tp_size}")
    if is_hf_model_dir(checkpoint):
        return _hf_output_layer_shard(Path(checkpoint), teacher, shard_rows, tp_rank, dtype)
    # Ranks that read the same rows must say which one is the main replica (replica_id 0); TP is
    # megatron's innermost dimension, so rank // tp numbers the readers of one vocabulary shard.
    rank = dist.get_rank() if dist.is_initialized() else 0
    if teacher_padded == student_padded_vocab:
        local = torch.empty(shard_rows, d, dtype=torch.float32)
        sharded = ShardedTensor.from_rank_offsets(key, local, (0, tp_rank, tp_size), replica_id=rank // tp_size)
        return dist_checkpointing.load({"w": sharded}, str(checkpoint))["w"].to(dtype)
    # The checkpoint's own padding differs from the student's: read the full matrix. Its size is
    # only known from the checkpoint metadata (the teacher was saved with its own TP padding).
    from megatron.core.dist_checkpointing.serialization import load_tensors_metadata

    shape = tuple(load_tensors_metadata(str(checkpoint))[key].global_shape)
    if shape[1] != d:
        raise ValueError(f"{checkpoint}: {key} has hidden size {shape[1]}, teacher model.yaml says {d}")
    full = dist_checkpointing.load(
        {"w": ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=torch.float32), replica_id=rank)},
        str(checkpoint),
    )["w"]
    out = torch.zeros(shard_rows, d, dtype=dtype)
    start = tp_rank * shard_rows
    rows = max(0, min(teacher.vocab_size, start + shard_rows) - start)
    out[:rows] = full[start : start + rows].to(dtype)
    return out


def _hf_output_layer_shard(directory: Path, teacher: ModelConfig, shard_rows: int, tp_rank: int, dtype) -> torch.Tensor:
    from megatron_opd.models.hf.load import open_hf_model, output_layer_rows

    hf = open_hf_model(directory)
    if hf.cfg.hidden_size != teacher.hidden_size or hf.cfg.vocab_size != teacher.vocab_size:
        raise ValueError(
            f"{directory}: config.json has hidden_size {hf.cfg.hidden_size} and vocab_size {hf.cfg.vocab_size}, "
            f"the teacher's model config {teacher.hidden_size} and {teacher.vocab_size}"
        )
    start = tp_rank * shard_rows
    rows = output_layer_rows(hf, start, min(start + shard_rows, teacher.vocab_size))
    out = torch.zeros(shard_rows, teacher.hidden_size, dtype=dtype)
    out[: rows.shape[0]] = rows.to(dtype)
    return out
