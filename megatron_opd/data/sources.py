"""Which `PromptSource` a job's `data` section describes: the one place new sources are added.

    prompt_source(cfg.data)                         the tiny domains, the files of data.datasets, or
                                                    the GRM's rubric task and annotations
    job_prompt_source(cfg, tokenizer, demonstrations=True)   the same, with the job's token limits
                                                    checked on every row (SFT: whole conversations)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_opd.data.datasets import FileDatasets, Limits
from megatron_opd.data.domains import TinyDomains
from megatron_opd.data.prompts import PromptSource
from megatron_opd.data.rubric import JUDGE_DOMAIN, TASK_DOMAIN, GRMSource, JudgeTemplate, annotation_baselines, load_annotations
from megatron_opd.data.samples import RecordedResponses
from megatron_opd.data.tokenizer import Tokenizer

if TYPE_CHECKING:
    from megatron_opd.config import DataConfig, JobConfig


def prompt_source(data: "DataConfig", limits: Limits = Limits(), *, demonstrations: bool = False) -> PromptSource:
    """The files of `data.datasets` when it names any (rows checked against `limits`; with
    `demonstrations`, each must carry an assistant reply), else the GRM's domains (rubric, judge:
    data/rubric.py) when `data.domains` names them, else the tiny domains of `data.domains`."""
    if data.datasets:
        return FileDatasets(data, limits, demonstrations=demonstrations)
    if set(data.domains) & {TASK_DOMAIN, JUDGE_DOMAIN}:
        return grm_source(data)
    source: PromptSource = TinyDomains(data.domains, data.seed, data.eval_size)
    if data.samples:  # the tiny prompts answered by recorded responses (data/samples.py)
        source = RecordedResponses(source, data.samples)
    return source


def grm_source(data: "DataConfig") -> GRMSource:
    """The GRM's source: its annotation file loaded and checked (when "judge" is a domain), the
    judge prompts carrying the set's constant-verdict baselines."""
    annotations = load_annotations(data.annotations, key="data.annotations") if JUDGE_DOMAIN in data.domains else None
    baseline = annotation_baselines(annotations.items).to_json() if annotations is not None else None
    return GRMSource(data.domains, seed=data.seed, eval_size=data.eval_size, annotations=annotations,
                     template=JudgeTemplate(data.judge_template), baseline=baseline)  # fmt: skip


def job_limits(cfg: "JobConfig", tokenizer: Tokenizer) -> Limits:
    """A job's token limits: a prompt leaves room for rollout.max_new_tokens (rollouts and
    evaluation generate that much) under model.max_seq_len; an SFT conversation fits it."""
    L, R = cfg.model.max_seq_len, cfg.rollout.max_new_tokens
    return Limits(
        tokenizer,
        prompt_tokens=max(L - R, 1),
        example_tokens=L,
        prompt_why=f"model.max_seq_len={L} - rollout.max_new_tokens={R}",
        example_why=f"model.max_seq_len={L}",
    )


def job_prompt_source(cfg: "JobConfig", tokenizer: Tokenizer, *, demonstrations: bool = False) -> PromptSource:
    """The job's prompt source with its token limits (`job_limits`) checked on every file row."""
    return prompt_source(cfg.data, job_limits(cfg, tokenizer), demonstrations=demonstrations)


def source_metrics(source: PromptSource) -> dict[str, float]:
    """What loading the source did (rows dropped by data.bad_rows=drop), for every step's metrics."""
    return dict(getattr(source, "metrics", None) or {})
