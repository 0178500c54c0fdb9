"""Which `PromptSource` a job's `data` section describes: the one place new sources are added."""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_opd.data.domains import TinyDomains
from megatron_opd.data.prompts import PromptSource
from megatron_opd.data.samples import RecordedResponses

if TYPE_CHECKING:
    from megatron_opd.config import DataConfig


def prompt_source(data: "DataConfig") -> PromptSource:
    """The tiny domains named by `data.domains` (prompt files come next, issue 15), with the
    recorded responses of `data.samples` when it is set (data/samples.py)."""
    source: PromptSource = TinyDomains(data.domains, data.seed, data.eval_size)
    if data.samples:
        source = RecordedResponses(source, data.samples)
    return source
