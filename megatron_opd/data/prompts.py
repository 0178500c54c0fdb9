"""Prompts and where they come from: `Prompt`, the `PromptSource` protocol, SFT's
`Demonstration`s and `DemonstrationSource`, the data cursor.

A prompt source maps a global sample index to a prompt deterministically, so a data cursor is one
integer, a resumed run sees exactly the samples an uninterrupted run would, and every sample has a
stable id. Held-out evaluation prompts come from a separate stream and are never trained on.
A source that also supplies demonstrations (a whole conversation ending with the assistant's
turn, for the same index) is what SFT trains on. Implementations: the tiny domains
(data/domains.py) and prompt files (data/datasets.py). A source may carry `metrics`, counts of
what loading it did (rows dropped by `data.bad_rows: drop`), which stages report with every step.
This module imports no torch, so configuration checks can use it.

Batch k of a stream of batches of N items holds global indices [k N, (k + 1) N); data-parallel
replica d of D takes the d-th of D equal slices (`replica_slice`). Every stage cuts its data that
way: SFT's demonstrations per step, on-policy stages' prompts per rollout.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

from megatron_opd.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class Prompt:
    text: str  # the prompt as plain text: what verifiers read, and what a tokenizer without chat encodes
    domain: str
    sample_id: str  # stable, unique per sample ("add/17"; "add/17/3" for sample 3 of a group)
    # Chat turns ({"role", "content"}), when the source has them: the tokenizer renders these with
    # its chat template instead of `text`.
    messages: tuple[Mapping[str, str], ...] | None = field(default=None, hash=False)
    # What a verifier needs besides the text (a reference answer, tests, a rubric); free-form.
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)
    # Where the sample came from ("data/math.jsonl:17"), for error messages; not part of equality.
    origin: str = field(default="", compare=False, hash=False)


@runtime_checkable
class PromptSource(Protocol):
    """A deterministic, resumable stream of training prompts, plus held-out prompts per domain."""

    # The domains it draws from, in a fixed order: per-domain metrics and batches follow it.
    domains: list[str]

    def prompt(self, index: int) -> Prompt:
        """The training prompt at global position `index` (never a held-out prompt)."""
        ...

    def prompts(self, start: int, count: int) -> list[Prompt]: ...

    def eval_prompts(self, domain: str) -> list[Prompt]:
        """The held-out prompts of `domain`, the same on every call."""
        ...

    def reward_name(self, domain: str) -> str:
        """The name, in the rewards/ registry, of the reward that verifies `domain`'s responses."""
        ...


@dataclass(frozen=True)
class Demonstration:
    """An SFT example: the sample's prompt (id, domain, origin) and the whole conversation, ending
    with the assistant's turn; `Tokenizer.encode_conversation` renders it with the loss mask."""

    prompt: Prompt
    messages: tuple[Mapping[str, str], ...] = field(hash=False)


@runtime_checkable
class DemonstrationSource(PromptSource, Protocol):
    """A prompt source that also supplies a demonstration for each training index."""

    def demonstrations(self, start: int, count: int) -> list[Demonstration]:
        """The demonstrations of global positions [start, start + count)."""
        ...


def replica_slice(batch: int, batch_size: int, replica: int, replicas: int) -> range:
    """The global indices of batch number `batch` (of `batch_size` items) that data-parallel
    replica `replica` of `replicas` takes."""
    if batch_size % replicas:
        raise ValueError(f"a batch of {batch_size} items does not split over {replicas} data-parallel replicas")
    n = batch_size // replicas
    start = batch * batch_size + replica * n
    return range(start, start + n)


def repeat_for_group(prompts: Sequence[Prompt], group_size: int) -> list[Prompt]:
    """Each prompt `group_size` times in a row, sample k of a group with the id `<id>/<k>`, so that
    every sample has its own id (and the rollout engines their own seed); unchanged for 1."""
    if group_size < 1:
        raise ValueError(f"group size {group_size}: a prompt needs at least one sample")
    if group_size == 1:
        return list(prompts)
    return [replace(p, sample_id=f"{p.sample_id}/{k}") for p in prompts for k in range(group_size)]


def encode_prompts(prompts: Sequence[Prompt], tokenizer: Tokenizer) -> list[list[int]]:
    return [tokenizer.encode_prompt(p.messages if p.messages else p.text) for p in prompts]
