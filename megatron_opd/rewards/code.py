"""The `code` verifier: run the response's Python against the row's tests in the sandbox.

The code is the last ```python (or ```py, ```python3) fenced block of the response, or the whole
response when it has none. fields["tests"] is one of:
- a string: Python run after the code in the same module namespace (asserts, or a
  `check(candidate)` call), one test: 1.0 when it finishes without raising, else 0.0;
- a list of strings: each a test block run after the code, in order, in one process;
- a list of {"input": str, "output": str}: stdin/stdout cases, each run in its own process
  with `input` on stdin; a case passes when the program exits with status 0 and its stdout
  equals `output` up to trailing whitespace on each line and trailing blank lines.
The score is 1.0 when every test passes, else 0.0; with `partial_credit` it is the fraction
passed. A run killed by a time limit (wall clock or CPU) scores 0.0 with timed_out=True and the
limit in info["reason"]; callers count timed_out as a metric. A memory hog fails (its
allocation raises MemoryError under RLIMIT_AS) and is not a time-out.

Samples run concurrently, up to `workers` sandboxes at a time (each is one process, single
threaded: workers ~ the cores free for scoring). sandbox.py says exactly what isolation each
run gets; info["isolation"] says what it got.
"""

from __future__ import annotations

import ast
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import ClassVar

from megatron_opd.rewards.sandbox import SandboxLimits, SandboxOptions, SandboxResult, SandboxRun, run_sandboxed
from megatron_opd.rewards.types import RewardError, RewardInput, RewardResult, require_field, verifier_raised

_FENCED_PYTHON = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(response: str) -> tuple[str, str]:
    """(code, where it came from): the last ```python block, else the whole response."""
    blocks = _FENCED_PYTHON.findall(response)
    return (blocks[-1], "last fenced block") if blocks else (response, "whole response")


def same_output(got: str, expected: str) -> bool:
    """stdout equality up to trailing whitespace on each line and trailing blank lines."""
    def lines(text: str) -> list[str]:
        return [line.rstrip() for line in text.rstrip().splitlines()]
    return lines(got) == lines(expected)


@dataclass(frozen=True)
class _Plan:
    """The sandbox runs one sample needs: one in tests mode, one per case in stdio mode."""

    source: str
    runs: tuple[SandboxRun, ...]
    expected_outputs: tuple[str, ...] | None  # stdio mode


def _check_test_code(where: str, test: str) -> None:
    """A test block must be Python that can fail: one that does not compile would fail every
    response, and one that is only a literal (a JSON list of cases left encoded) would pass
    every response."""
    try:
        tree = ast.parse(test)
    except SyntaxError as error:
        raise RewardError(f"{where} does not compile: {error}") from None
    literals = (ast.Constant, ast.List, ast.Tuple, ast.Dict, ast.Set)
    if all(isinstance(node, ast.Expr) and isinstance(node.value, literals) for node in tree.body):
        raise RewardError(f"{where} is {test[:200]!r}, a literal and not test code; a list of "
                          f"stdin/stdout cases must be a list, not a JSON string")


def _plan(verifier: str, sample: RewardInput) -> _Plan:
    tests = require_field(verifier, sample, "tests", (str, list))
    code, source = extract_code(sample.response)
    where = f"{verifier} verifier: sample {sample.sample_id!r} (domain {sample.domain!r}) field 'tests'"
    if isinstance(tests, str):
        _check_test_code(where, tests)
        return _Plan(source, (SandboxRun(code, tests=(tests,)),), None)
    if not tests:
        raise RewardError(f"{where} is an empty list: a sample needs at least one test")
    if all(isinstance(test, str) for test in tests):
        for index, test in enumerate(tests):
            _check_test_code(f"{where} item {index}", test)
        return _Plan(source, (SandboxRun(code, tests=tuple(tests)),), None)
    for index, case in enumerate(tests):
        if not (isinstance(case, dict) and isinstance(case.get("input"), str)
                and isinstance(case.get("output"), str)):
            raise RewardError(f"{where} item {index} is {case!r:.200}: expected a list of strings (test "
                              f"blocks) or a list of {{'input': str, 'output': str}} (stdin/stdout cases)")
    return _Plan(source, tuple(SandboxRun(code, stdin=case["input"]) for case in tests),
                 tuple(case["output"] for case in tests))


def _killed_reason(result: SandboxResult, limits: SandboxLimits) -> str:
    limit = f"{limits.wall_seconds}s wall clock" if result.killed == "wall clock" else f"{limits.cpu_seconds}s of CPU"
    return f"killed at the {limit} limit"


def _case_failure(result: SandboxResult, expected: str, limits: SandboxLimits) -> str | None:
    """Why a stdio case failed, or None when it passed."""
    if result.timed_out:
        return _killed_reason(result, limits)
    if result.exit_code != 0:
        return f"exit status {result.exit_code}: {result.stderr[-500:].strip()}"
    if not same_output(result.stdout, expected):
        return f"wrong output: expected {expected[:200]!r}, got {result.stdout[:200]!r}"
    return None


@dataclass
class CodeVerifier:
    """Scores Python responses by running them against fields["tests"] in the sandbox."""

    limits: SandboxLimits = field(default_factory=SandboxLimits)
    options: SandboxOptions = field(default_factory=SandboxOptions)
    workers: int = 4
    partial_credit: bool = False
    name: ClassVar[str] = "code"

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"code verifier: workers must be >= 1, not {self.workers}")

    def score(self, samples: list[RewardInput]) -> list[RewardResult]:
        plans = [_plan(self.name, sample) for sample in samples]  # every bad row before any run
        jobs = [(index, run) for index, plan in enumerate(plans) for run in plan.runs]
        with ThreadPoolExecutor(max_workers=min(self.workers, max(1, len(jobs)))) as pool:
            futures = [pool.submit(run_sandboxed, run, self.limits, self.options) for _, run in jobs]
        outcomes: list[list[SandboxResult]] = [[] for _ in samples]
        for (index, _), future in zip(jobs, futures):
            try:
                outcomes[index].append(future.result())
            except Exception as error:
                raise verifier_raised(self.name, samples[index], f"{type(error).__name__}: {error}") from error
        return [self._result(sample, plan, results) for sample, plan, results in zip(samples, plans, outcomes)]

    def _result(self, sample: RewardInput, plan: _Plan, results: list[SandboxResult]) -> RewardResult:
        for result in results:
            if not result.timed_out and not result.isolation:
                # No isolation line: the harness itself failed before the code ran.
                raise verifier_raised(self.name, sample, f"the sandbox failed to start (exit status "
                                                         f"{result.exit_code}): {result.stderr[-1000:]}")
        info = {"source": plan.source, "isolation": results[0].isolation}
        timed_out = any(result.timed_out for result in results)
        if plan.expected_outputs is None:
            [result] = results
            if result.timed_out:
                passed, total, reason = 0, len(plan.runs[0].tests), _killed_reason(result, self.limits)
            elif result.passed is None:
                passed, total = 0, len(plan.runs[0].tests)
                reason = (f"no test result: the code ended the process (exit status {result.exit_code}) "
                          f"before the tests finished: {result.stderr[-500:].strip()}")
            else:
                passed, total = result.passed, result.total
                reason = result.failure or "all tests passed"
        else:
            failures = [_case_failure(result, expected, self.limits)
                        for result, expected in zip(results, plan.expected_outputs)]
            passed, total = failures.count(None), len(failures)
            first = next(((i, why) for i, why in enumerate(failures) if why is not None), None)
            reason = f"case {first[0]}: {first[1]}" if first else "all cases passed"
        if passed == total:
            score = 1.0
        else:
            score = passed / total if self.partial_credit else 0.0
        info.update(passed=passed, total=total, reason=reason)
        return RewardResult(score=score, info=info, timed_out=timed_out)
