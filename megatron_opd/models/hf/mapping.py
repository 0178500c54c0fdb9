"""How megatron and Hugging Face tensors correspond: rules (data) and row layouts (a small shared set).

A `Rule` pairs a megatron parameter name with one or more Hugging Face names (`{L}` is a layer
index, `{E}` an expert index) and names a layout. Megatron names are those of the model's own
`state_dict()` at TP=PP=EP=1 with the local spec, e.g.
`decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight`; where that tensor lives in a
dist checkpoint (its key, its index on stacked layer or expert axes) is megatron_io's business.

Every correspondence these architectures need is a re-arrangement of rows (dim 0):

    copy   one HF tensor, the same rows
    cat    [hf_0; hf_1; ...]                  SwiGLU fc1 = [gate; up]
    qkv    per query group g: q heads of g, k_g, v_g   (megatron's fused QKV, weight or bias)
    vocab  the HF rows, then zero rows up to megatron's padded vocabulary

so a layout is a list of `Block`s: megatron's rows in order, each a row range of one HF tensor
(or zeros). The same list drives both directions, which is why the round trip is bit-exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

from megatron_opd.models.config import ModelConfig
from megatron_opd.models.hf.errors import CheckpointError, UnsupportedConfig, name_list

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Rule:
    megatron: str
    hf: tuple[str, ...]
    layout: str = "copy"


def rule(megatron: str, *hf: str, layout: str = "copy") -> Rule:
    return Rule(megatron, tuple(hf), layout)


@dataclass(frozen=True)
class Block:
    """Rows [start, stop) of HF tensor number `src`; src None: that many zero rows (padding)."""

    src: int | None
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Binding:
    """One megatron tensor and the HF tensors it is made of."""

    megatron_name: str
    megatron_shape: Shape
    hf_names: tuple[str, ...]
    hf_shapes: tuple[Shape, ...]
    blocks: tuple[Block, ...]

    def row_blocks(self) -> Iterator[tuple[int, Block]]:
        """(first megatron row, block) of every block that holds HF rows; padding is skipped."""
        row = 0
        for block in self.blocks:
            if block.src is not None:
                yield row, block
            row += block.rows

    @property
    def uniform(self) -> bool:
        """Every block is real and the same size: the pieces form a regular grid megatron can save as is."""
        return all(b.src is not None for b in self.blocks) and len({b.rows for b in self.blocks}) == 1


# ---------------------------------------------------------------------------------------------
# Layouts: (megatron shape, number of HF tensors, model config) -> (HF shapes, blocks)

Layout = Callable[[Shape, int, ModelConfig], tuple[list[Shape], list[Block]]]


def _copy(shape: Shape, n: int, cfg: ModelConfig):
    return [shape], [Block(0, 0, shape[0])]


def _cat(shape: Shape, n: int, cfg: ModelConfig):
    if shape[0] % n:
        raise CheckpointError(f"internal: cannot split {shape[0]} rows into {n} equal parts")
    rows = shape[0] // n
    return [(rows, *shape[1:])] * n, [Block(i, 0, rows) for i in range(n)]


def _qkv(shape: Shape, n: int, cfg: ModelConfig):
    heads, groups, d = cfg.num_attention_heads, cfg.query_groups, cfg.head_dim
    if shape[0] != (heads + 2 * groups) * d:
        raise CheckpointError(
            f"internal: fused QKV has {shape[0]} rows, expected (heads {heads} + 2 * groups {groups}) * head_dim {d}"
        )
    per_group = heads // groups
    blocks = []
    for g in range(groups):
        blocks += [Block(0, (g * per_group + j) * d, (g * per_group + j + 1) * d) for j in range(per_group)]
        blocks += [Block(1, g * d, (g + 1) * d), Block(2, g * d, (g + 1) * d)]
    rest = shape[1:]
    return [(heads * d, *rest), (groups * d, *rest), (groups * d, *rest)], blocks


def _vocab(shape: Shape, n: int, cfg: ModelConfig):
    if shape[0] < cfg.vocab_size:
        raise CheckpointError(f"internal: {shape[0]} vocabulary rows < vocab_size {cfg.vocab_size}")
    blocks = [Block(0, 0, cfg.vocab_size)]
    if shape[0] > cfg.vocab_size:
        blocks.append(Block(None, 0, shape[0] - cfg.vocab_size))
    return [(cfg.vocab_size, *shape[1:])], blocks


LAYOUTS: dict[str, Layout] = {"copy": _copy, "cat": _cat, "qkv": _qkv, "vocab": _vocab}
_ARITY = {"copy": 1, "qkv": 3, "vocab": 1}


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{E\}", r"(?P<E>\d+)"))


def check_rules(arch_name: str, rules: tuple[Rule, ...]) -> None:
    """Table sanity: known layouts, the right number of HF names, placeholders on both sides."""
    for r in rules:
        if r.layout not in LAYOUTS:
            raise CheckpointError(f"table {arch_name}: unknown layout {r.layout!r} for {r.megatron}")
        if _ARITY.get(r.layout, len(r.hf)) != len(r.hf) or not r.hf:
            raise CheckpointError(
                f"table {arch_name}: layout {r.layout} takes other than {len(r.hf)} HF names"
            )
        for h in r.hf:
            for ph in ("{L}", "{E}"):
                if (ph in h) != (ph in r.megatron):
                    raise CheckpointError(
                        f"table {arch_name}: {ph} appears on one side only in {r.megatron} <-> {h}"
                    )


def bind(
    arch_name: str, rules: tuple[Rule, ...], megatron_shapes: dict[str, Shape], cfg: ModelConfig
) -> list[Binding]:
    """Match every megatron tensor to exactly one rule; error naming the tensors that have none."""
    compiled = [(_pattern(r.megatron), r) for r in rules]
    bindings, unmatched = [], []
    for name, shape in megatron_shapes.items():
        hits = [(m, r) for rx, r in compiled if (m := rx.fullmatch(name))]
        if not hits:
            unmatched.append(name)
            continue
        if len(hits) > 1:
            raise CheckpointError(f"table {arch_name}: {name} matches {len(hits)} rules")
        match, r = hits[0]
        hf_names = tuple(h.format(**match.groupdict()) for h in r.hf)
        hf_shapes, blocks = LAYOUTS[r.layout](tuple(shape), len(hf_names), cfg)
        bindings.append(Binding(name, tuple(shape), hf_names, tuple(map(tuple, hf_shapes)), tuple(blocks)))
    if unmatched:
        raise UnsupportedConfig(
            f"architecture {arch_name} has no Hugging Face counterpart for megatron tensors "
            f"{name_list(unmatched)}: the model uses a feature {arch_name} does not have "
            f"(choose another --arch, or change the model config)"
        )
    return bindings
