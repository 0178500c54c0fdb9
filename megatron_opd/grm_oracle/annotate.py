"""The annotation maker: B (query, response) pairs labelled by the oracle with annotator noise,
written once as the annotation file (its sha256 goes into the run's summary).

A noisy annotator flips each per-criterion verdict with probability `noise` and computes the
overall score from its own (noisy) verdicts; with probability `noise` the score digit is then off
by one as well (clipped to 0..MAX_SCORE).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

from megatron_opd.data.rubric import MAX_SCORE, Annotation, write_annotations
from megatron_opd.grm_oracle import oracle


def annotate(items: Sequence[tuple[str, str, str, str]], *, noise: float, seed: int) -> list[Annotation]:
    """Annotations of (id, query, rubric, response) items, deterministic in `seed`."""
    if not 0.0 <= noise < 0.5:
        raise ValueError(f"grm.annotator_noise={noise} must be in [0, 0.5)")
    rng = random.Random(seed)
    out = []
    for id_, query, rubric, response in items:
        true = oracle.verdicts(query, rubric, response)
        marks = tuple(1 - v if rng.random() < noise else v for v in true)
        digit = oracle.score_digit(oracle.weighted(rubric, marks))
        if rng.random() < noise:
            digit = min(MAX_SCORE, max(0, digit + rng.choice((-1, 1))))
        out.append(Annotation(id_, query, rubric, response, marks, digit))
    return out


def make_annotation_file(path: str | Path, items: Sequence[tuple[str, str, str, str]], *, noise: float, seed: int) -> str:
    """Label `items` and write the file once; returns its sha256."""
    if not items:
        raise ValueError("grm.annotations_size=0: the judge needs at least one annotation (B >= 1)")
    return write_annotations(path, annotate(items, noise=noise, seed=seed))
