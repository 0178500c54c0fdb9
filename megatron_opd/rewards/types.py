"""The two records every verifier speaks (one sample in, one score out) and its error.

A verifier is an object with a `name` and `score(samples: list[RewardInput]) -> list[RewardResult]`,
evaluated per batch. A bad sample (a missing or malformed verifier field) and a verifier that
raises both become a `RewardError` naming the verifier, the domain and the sample id, so a step
stops with an error that says which row to look at instead of scoring it zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class RewardInput:
    """One sampled response and the dataset row's verifier fields (`answer`, `tests`, `pattern`)."""

    prompt: str
    response: str
    sample_id: str
    domain: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RewardResult:
    """The score of one response, what the verifier saw (`info`: parsed answer, reason, ...)
    and whether it ran out of time (scored 0.0; callers count these as a metric)."""

    score: float
    info: dict[str, Any] = field(default_factory=dict)
    timed_out: bool = False


class RewardError(ValueError):
    """A sample a verifier cannot score: bad verifier fields, or the verifier itself raised."""


def require_field(verifier: str, sample: RewardInput, name: str, types: type | tuple[type, ...]) -> Any:
    """The verifier field `name` of `sample`, or a RewardError naming the field, sample and verifier."""
    if name not in sample.fields:
        raise RewardError(f"{verifier} verifier: sample {sample.sample_id!r} (domain {sample.domain!r}) "
                          f"has no {name!r} field; its fields are {sorted(sample.fields)}")
    value = sample.fields[name]
    if not isinstance(value, types):
        expected = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise RewardError(f"{verifier} verifier: sample {sample.sample_id!r} (domain {sample.domain!r}) "
                          f"field {name!r} is a {type(value).__name__}, expected {expected}")
    return value


def score_each(verifier: str, samples: list[RewardInput],
               score_one: Callable[[RewardInput], RewardResult]) -> list[RewardResult]:
    """`score_one` over the batch; anything it raises comes back as a RewardError naming the
    verifier, the domain and the sample id (a RewardError it raises passes through as it is)."""
    results = []
    for sample in samples:
        try:
            results.append(score_one(sample))
        except RewardError:
            raise
        except Exception as error:
            raise verifier_raised(verifier, sample, f"{type(error).__name__}: {error}") from error
    return results


def verifier_raised(verifier: str, sample: RewardInput, what: str) -> RewardError:
    """The error for a verifier that failed on `sample` (what: the exception, as text)."""
    return RewardError(f"{verifier} verifier raised on sample {sample.sample_id!r} "
                       f"(domain {sample.domain!r}): {what}")
