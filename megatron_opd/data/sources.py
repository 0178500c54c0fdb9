"""Which `PromptSource` a job's `data` section describes: the one place new sources are added."""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_opd.data.domains import TinyDomains
from megatron_opd.data.prompts import PromptSource
from megatron_opd.data.rubric import JUDGE_DOMAIN, TASK_DOMAIN, GRMSource, JudgeTemplate, annotation_baselines, load_annotations

if TYPE_CHECKING:
    from megatron_opd.config import DataConfig


def prompt_source(data: "DataConfig") -> PromptSource:
    """The tiny domains named by `data.domains`, or the GRM's (rubric, judge: data/rubric.py)
    (prompt files come next, issue 15)."""
    if set(data.domains) & {TASK_DOMAIN, JUDGE_DOMAIN}:
        return grm_source(data)
    return TinyDomains(data.domains, data.seed, data.eval_size)


def grm_source(data: "DataConfig") -> GRMSource:
    """The GRM's source: its annotation file loaded and checked (when "judge" is a domain), the
    judge prompts carrying the set's constant-verdict baselines."""
    annotations = load_annotations(data.annotations, key="data.annotations") if JUDGE_DOMAIN in data.domains else None
    baseline = annotation_baselines(annotations.items).to_json() if annotations is not None else None
    return GRMSource(data.domains, seed=data.seed, eval_size=data.eval_size, annotations=annotations,
                     template=JudgeTemplate(data.judge_template), baseline=baseline)  # fmt: skip
