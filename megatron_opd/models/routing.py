"""Keep routing: the MoE experts chosen while sampling, recorded and replayed in training forwards.

Through megatron-core's own mechanism (`TransformerConfig.moe_enable_routing_replay`,
megatron/core/transformer/moe/router_replay.py): with it every `TopKRouter` owns a
`RouterReplay`, and `topk_routing_with_score_function` asks it for the top-k experts: RECORD
computes them and keeps the indices of the last forward, REPLAY_FORWARD takes the indices it was
given and gathers the router's scores at them (so the gating weights still carry gradients),
REPLAY_BACKWARD pops them again for activation recomputation, no action routes as usual.

We address each router's `RouterReplay` directly instead of megatron's static
`RouterReplay.global_router_replay_instances` list, which holds the routers of every model a
process ever built (a reference copy, the server's staging copies) in construction order.

The one layout of routed experts, per batch row and token position (`Trajectories.routed_experts`):
[B, T, moe_layers, topk] int32, the expert ids (global ids, whatever the expert-parallel layout)
that each MoE layer of the model chose for the token at each position, MoE layers in model order
(`ModelConfig.moe_layers`), -1 where nothing was recorded (the last token of a row, which the
sampler never fed through the model, and the padding).

How it meets the parallel layouts:
- expert parallelism: routing happens on each rank's own tokens before the all-to-all dispatch,
  and the ids are global, so recording and replaying need nothing per EP rank;
- pipeline parallelism: a stage holds some of the layers; `routers(model)` pairs each router with
  its global MoE-layer index (from its `layer_number`), so every stage takes its own columns of the
  same [b, s, moe_layers, topk] tensor;
- sequence parallelism: a router sees its TP rank's contiguous chunk of the sequence (megatron
  scatters [s, b, h] along s), so the replayed rows are that chunk's;
- context parallelism: refused (`rollout.keep_routing` with parallel.cp > 1), its load-balanced
  sequence split is not reproduced here.
Rows are flattened sequence-major, as megatron's router flattens its [s, b, E] logits.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


class RoutingReplayError(RuntimeError):
    """Routed experts that cannot be replayed on this model (no replay, wrong shape)."""


def _moe_pattern(config) -> list[int]:
    """1 per MoE layer, 0 per dense layer, from megatron's `moe_layer_freq` (as its layer specs read it)."""
    if not getattr(config, "num_moe_experts", None):
        return [0] * config.num_layers
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(config.num_layers)]
    return list(freq)


def routers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(global MoE-layer index, TopKRouter) of every MoE layer in this model chunk, in layer order."""
    from megatron.core.transformer.moe.router import TopKRouter

    found = [m for m in model.modules() if isinstance(m, TopKRouter)]
    if not found:
        return []
    pattern = _moe_pattern(found[0].config)
    moe_index = {layer: i for i, layer in enumerate(j for j, is_moe in enumerate(pattern) if is_moe)}
    return sorted((moe_index[r.layer_number - 1], r) for r in found)


def replay_enabled(model: torch.nn.Module) -> bool:
    """Whether the model was built with routing replay (`build_gpt_model(..., routing_replay=True)`)."""
    found = routers(model)
    return bool(found) and all(r.router_replay is not None for _, r in found)


def _replays(model: torch.nn.Module, what: str) -> list[tuple[int, object]]:
    found = routers(model)
    if not found:
        raise RoutingReplayError(f"{what}: the model has no MoE layers (model.num_experts=0); keep routing applies to MoE models only")
    if any(r.router_replay is None for _, r in found):
        raise RoutingReplayError(
            f"{what}: the model was built without routing replay; build it with "
            "build_gpt_model(..., routing_replay=True) (rollout.keep_routing=true does so for the student)"
        )
    return [(i, r.router_replay) for i, r in found]


class RoutingRecorder:
    """RECORD on every router of a model; `take()` returns what the last forward chose."""

    def __init__(self, model: torch.nn.Module):
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        self.replays = _replays(model, "recording routed experts")
        self.layers = [i for i, _ in self.replays]
        for _, replay in self.replays:
            replay.clear_indices()
            replay.set_router_replay_action(RouterReplayAction.RECORD)

    def take(self, seq: int, batch: int) -> torch.Tensor:
        """[batch, seq, layers of this chunk, topk] int32 of the last forward, whose input was
        [batch, seq] tokens (the router saw them sequence-major); clears the records."""
        out = []
        for _, replay in self.replays:
            idx = replay.get_recorded_indices()
            if idx is None or idx.shape[0] != seq * batch:
                got = None if idx is None else tuple(idx.shape)
                raise RoutingReplayError(f"recorded routing has shape {got} for a forward of {batch} x {seq} tokens")
            out.append(idx.reshape(seq, batch, -1).transpose(0, 1))
            replay.clear_indices()
        return torch.stack(out, 2).to("cpu", torch.int32)

    def close(self) -> None:
        for _, replay in self.replays:
            replay.clear_indices()
            replay.clear_router_replay_action()


@contextmanager
def recording(model: torch.nn.Module, enabled: bool = True) -> Iterator[RoutingRecorder | None]:
    """`RoutingRecorder` for the duration of the block (None when not `enabled`)."""
    if not enabled:
        yield None
        return
    recorder = RoutingRecorder(model)
    try:
        yield recorder
    finally:
        recorder.close()


def fill_unrecorded(routed: torch.Tensor) -> torch.Tensor:
    """`routed` [..., topk] with every -1 row (a position nothing was recorded for) replaced by the
    experts 0..topk-1: such positions feed no loss (the last token of a row, padding), and top-k
    routing needs some distinct experts for every token."""
    k = routed.shape[-1]
    missing = (routed < 0).any(-1, keepdim=True)
    return torch.where(missing, torch.arange(k, dtype=routed.dtype, device=routed.device), routed)


def _sequence_chunk(seq: int) -> slice:
    """This TP rank's part of the sequence under sequence parallelism (all of it otherwise)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return slice(0, seq)
    rank = parallel_state.get_tensor_model_parallel_rank()
    return slice(rank * seq // tp, (rank + 1) * seq // tp)


@contextmanager
def replaying(model: torch.nn.Module, routed: torch.Tensor | None) -> Iterator[None]:
    """Replay `routed` [b, s, moe_layers, topk] (the tokens' recorded experts; -1: none) in every
    forward of `model` inside the block: each router takes its layer's experts for the [b, s]
    tokens of the forward instead of choosing. `routed` None: route as usual."""
    if routed is None:
        yield
        return
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    if not routers(model):  # a pipeline stage of dense layers only: nothing routes here
        yield
        return
    replays = _replays(model, "replaying routed experts")
    b, s, layers, _ = routed.shape
    if max(i for i, _ in replays) >= layers:
        raise RoutingReplayError(
            f"routed experts cover {layers} MoE layers; this model has MoE layer {max(i for i, _ in replays)}"
        )
    sequence_parallel = bool(getattr(routers(model)[0][1].config, "sequence_parallel", False))
    rows = _sequence_chunk(s) if sequence_parallel else slice(0, s)
    filled = fill_unrecorded(routed).long()
    try:
        for i, replay in replays:
            target = filled[:, rows, i].transpose(0, 1).reshape(-1, filled.shape[-1]).contiguous()
            replay.clear_indices()
            replay.set_target_indices(target)
            replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        yield
    finally:
        for _, replay in replays:
            replay.clear_indices()
            replay.clear_router_replay_action()


__all__ = ["RoutingRecorder", "RoutingReplayError", "recording", "replaying", "routers", "replay_enabled", "fill_unrecorded"]
