"""`ParallelLayout`: how a world of ranks splits into tensor, pipeline, expert, context and data parallelism.

Checked against the world size and against the model before any process group exists, so a
layout that cannot work fails with the numbers that do not divide, not with a hang or a shape
error deep inside megatron-core.
"""

from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """A parallel layout does not fit the world or the model; the message names the numbers."""


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes of each parallel dimension. `dp` is derived from the world size when left at 0."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    dp: int = 0
    # Megatron's sequence parallelism (activations split along the sequence within the TP group);
    # required by MoE layers under TP > 1.
    sequence_parallel: bool = False

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    def resolve(self, world_size: int) -> "ParallelLayout":
        """Check the layout against `world_size` and return it with `dp` filled in."""
        for name in ("tp", "pp", "ep", "cp"):
            if getattr(self, name) < 1:
                raise LayoutError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.dp < 0:
            raise LayoutError(f"parallel.dp must be >= 0 (0 derives it), got {self.dp}")
        mp = self.model_parallel_size
        if world_size % mp != 0:
            raise LayoutError(
                f"world size {world_size} is not divisible by tp*pp*cp = "
                f"{self.tp}*{self.pp}*{self.cp} = {mp}; change parallel.tp/pp/cp or the number of ranks"
            )
        dp = world_size // mp
        if self.dp and self.dp != dp:
            raise LayoutError(
                f"parallel.dp={self.dp} but world size {world_size} / (tp*pp*cp = {mp}) = {dp}; "
                f"set parallel.dp={dp} or 0 to derive it"
            )
        # megatron-core builds expert groups of tp*ep ranks inside each pipeline stage (its
        # expert-tensor size defaults to tp), so ep must divide the stage's dp*cp.
        if (dp * self.cp) % self.ep != 0:
            raise LayoutError(
                f"parallel.ep={self.ep} does not divide the data*context parallel size "
                f"dp*cp = {dp}*{self.cp} = {dp * self.cp} of world size {world_size}; "
                f"choose ep among the divisors of {dp * self.cp}"
            )
        return ParallelLayout(self.tp, self.pp, self.ep, self.cp, dp, self.sequence_parallel)

    def check_model(
        self,
        *,
        num_layers: int,
        num_attention_heads: int,
        num_query_groups: int,
        num_experts: int | None = None,
    ) -> None:
        """Check that the model splits evenly along every parallel dimension."""
        if num_attention_heads % self.tp:
            raise LayoutError(
                f"model.num_attention_heads={num_attention_heads} is not divisible by parallel.tp={self.tp}"
            )
        if num_query_groups % self.tp:
            raise LayoutError(
                f"model.num_query_groups={num_query_groups} is not divisible by parallel.tp={self.tp}"
            )
        if num_layers % self.pp:
            raise LayoutError(f"model.num_layers={num_layers} is not divisible by parallel.pp={self.pp}")
        if self.ep > 1 and not num_experts:
            raise LayoutError(
                f"parallel.ep={self.ep} needs a MoE model; model.num_experts is not set"
            )
        if num_experts and num_experts % self.ep:
            raise LayoutError(f"model.num_experts={num_experts} is not divisible by parallel.ep={self.ep}")
        if num_experts and self.tp > 1 and not self.sequence_parallel:
            raise LayoutError(
                f"MoE layers with parallel.tp={self.tp} need parallel.sequence_parallel=true "
                f"(megatron-core requires sequence parallelism for MoE under tensor parallelism)"
            )
