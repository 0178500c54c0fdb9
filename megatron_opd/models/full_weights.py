"""A tensor-parallel model's parameters as full (TP=1) tensors and back, in memory.

`full_state_dict` is what the rollout engine's distributed weight sync sends: every TP rank
contributes its shard and each gets the full tensors, named as in the model's state_dict.
`tp_shard` is the inverse, one parameter at a time (loading Hugging Face weights under TP).
Megatron's fused SwiGLU fc1 holds [gate_r; up_r] on rank r, so its halves are split and gathered
separately ([gate; up] at TP=1).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _gather(shard: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _swiglu_fc1(name: str) -> bool:
    return name.endswith(("linear_fc1.weight", "linear_fc1.bias"))


def tp_shard(name: str, param: torch.nn.Parameter, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s part of parameter `name` of a model under TP size `size`, from its full tensor
    (a view of `full`); the inverse of full_state_dict's gather."""
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    if ".experts." in name:
        raise NotImplementedError(f"{name}: expert weights under tensor parallelism are not split")
    if _swiglu_fc1(name):  # [gate; up] -> [gate_r; up_r]
        return torch.cat([half.chunk(size, dim=0)[rank] for half in full.chunk(2, dim=0)], dim=0)
    return full.chunk(size, dim=param.partition_dim)[rank]


def full_state_dict(module: torch.nn.Module, group=None) -> dict[str, torch.Tensor]:
    """{parameter name: full tensor}; a collective over the tensor-parallel `group` when it has
    more than one rank. Pipeline and expert parallelism split parameters across other ranks:
    those layouts are refused here."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise NotImplementedError("gathering full weights needs parallel.pp=1 (each stage holds other layers)")
    if parallel_state.get_expert_model_parallel_world_size() > 1:
        raise NotImplementedError("gathering full weights needs parallel.ep=1 (each rank holds other experts)")
    split = group is not None and dist.get_world_size(group) > 1
    out = {}
    for name, param in module.named_parameters():
        tensor = param.detach()
        if split and getattr(param, "tensor_model_parallel", False):
            if ".experts." in name:
                raise NotImplementedError(f"{name}: expert weights under tensor parallelism are not gathered")
            if _swiglu_fc1(name):  # SwiGLU: [gate_r; up_r]
                tensor = torch.cat([_gather(half, 0, group) for half in tensor.chunk(2, dim=0)], dim=0)
            else:
                tensor = _gather(tensor, param.partition_dim, group)
        out[name] = tensor
    return out
