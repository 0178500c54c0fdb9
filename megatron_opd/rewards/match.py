"""String verifiers: `exact` (normalised equality with fields["answer"]) and `regex`
(fields["pattern"] matched against the response)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from megatron_opd.rewards.types import RewardError, RewardInput, RewardResult, require_field, score_each

_WHITESPACE = re.compile(r"\s+")


@dataclass
class ExactMatch:
    """1.0 when the response equals fields["answer"] after normalisation, else 0.0.

    Both sides are stripped; `casefold` compares them case-insensitively (str.casefold) and
    `collapse_whitespace` turns every run of whitespace into one space. A numeric answer is
    compared as its str() ("3", "0.5").
    """

    casefold: bool = False
    collapse_whitespace: bool = False
    name: ClassVar[str] = "exact"

    def normalise(self, text: str) -> str:
        text = text.strip()
        if self.collapse_whitespace:
            text = _WHITESPACE.sub(" ", text)
        return text.casefold() if self.casefold else text

    def score(self, samples: list[RewardInput]) -> list[RewardResult]:
        return score_each(self.name, samples, self._score_one)

    def _score_one(self, sample: RewardInput) -> RewardResult:
        answer = require_field(self.name, sample, "answer", (str, int, float))
        expected, got = self.normalise(str(answer)), self.normalise(sample.response)
        equal = got == expected
        return RewardResult(score=1.0 if equal else 0.0,
                            info={"expected": expected, "reason": "equal" if equal else "different"})


@dataclass
class RegexMatch:
    """1.0 when fields["pattern"] (a Python regular expression) matches the response, else 0.0.

    `mode="fullmatch"` (the default) needs the whole response to match, `mode="search"` any
    part of it; `strip` removes surrounding whitespace from the response first (a sampled
    response often ends in a newline). A pattern that does not compile is a RewardError naming
    the sample.
    """

    mode: Literal["fullmatch", "search"] = "fullmatch"
    strip: bool = True
    name: ClassVar[str] = "regex"
    _compiled: dict[str, re.Pattern] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.mode not in ("fullmatch", "search"):
            raise ValueError(f"regex verifier: mode must be 'fullmatch' or 'search', not {self.mode!r}")

    def score(self, samples: list[RewardInput]) -> list[RewardResult]:
        return score_each(self.name, samples, self._score_one)

    def _pattern(self, sample: RewardInput) -> re.Pattern:
        source = require_field(self.name, sample, "pattern", str)
        if source not in self._compiled:
            try:
                self._compiled[source] = re.compile(source)
            except re.error as error:
                raise RewardError(f"{self.name} verifier: sample {sample.sample_id!r} (domain "
                                  f"{sample.domain!r}) has a 'pattern' that does not compile: {error}") from error
        return self._compiled[source]

    def _score_one(self, sample: RewardInput) -> RewardResult:
        pattern = self._pattern(sample)
        text = sample.response.strip() if self.strip else sample.response
        match = pattern.fullmatch(text) if self.mode == "fullmatch" else pattern.search(text)
        if match is None:
            return RewardResult(score=0.0, info={"reason": f"no {self.mode}"})
        return RewardResult(score=1.0, info={"reason": f"{self.mode} at {match.span()}", "parsed": match.group(0)})
