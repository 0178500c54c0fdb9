"""The rubric criteria and their hidden weights; the truth is the weighted fraction satisfied.

    code  criterion (on the response r, the query's letter set L)          weight
    1     only letters of L (and not empty)                                  3
    2     no letter twice in a row                                           1
    3     strictly ascending                                                 2
    4     starts with L's first letter                                       1
    5     exactly four letters                                               2
    6     at least three distinct letters                                    1

An empty response meets none of them.
"""

from __future__ import annotations

from typing import Callable

from megatron_opd.data.rubric import MAX_SCORE

CRITERIA: dict[str, Callable[[str, str], bool]] = {
    "1": lambda r, q: all(c in q for c in r),
    "2": lambda r, q: all(a != b for a, b in zip(r, r[1:])),
    "3": lambda r, q: all(a < b for a, b in zip(r, r[1:])),
    "4": lambda r, q: r[0] == q[0],
    "5": lambda r, q: len(r) == 4,
    "6": lambda r, q: len(set(r)) >= 3,
}
WEIGHTS: dict[str, int] = {"1": 3, "2": 1, "3": 2, "4": 1, "5": 2, "6": 1}


def verdicts(query: str, rubric: str, response: str) -> tuple[int, ...]:
    """The true 0/1 of each code of `rubric`, in its order."""
    return tuple(int(bool(response) and CRITERIA[c](response, query)) for c in rubric)


def weighted(rubric: str, marks: tuple[int, ...]) -> float:
    """The weighted fraction of the codes marked 1."""
    return sum(WEIGHTS[c] * m for c, m in zip(rubric, marks)) / sum(WEIGHTS[c] for c in rubric)


def score(query: str, rubric: str, response: str) -> float:
    """The true quality of `response` in [0, 1]."""
    return weighted(rubric, verdicts(query, rubric, response))


def score_digit(value: float) -> int:
    """A quality in [0, 1] as the judge's score digit 0..MAX_SCORE."""
    return int(round(MAX_SCORE * value))
