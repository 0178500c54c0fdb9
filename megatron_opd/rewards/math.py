"""The `math` verifier: is the response's final answer equivalent to fields["answer"]?

Equivalence is math-verify's (Hugging Face): both sides are parsed to SymPy (LaTeX, plain
numbers and expressions, sets, intervals, matrices) and compared numerically, symbolically and
as sets, so `\\boxed{2/4}`, `0.5` and `\\frac{1}{2}` are all the answer `1/2`.

Which part of the response is its answer: the content of its last `\\boxed{...}` (`\\fbox`
too) when it has one; otherwise math-verify's own extraction over the whole response (LaTeX in
`$...$`/`\\(...\\)` and plain expressions, the last one found). No answer scores 0.0 with
info["reason"] == "no answer found". The gold answer must parse: one that does not is a
RewardError naming the sample (a dataset bug, not a wrong response).

Time limits. math-verify bounds each parse and each comparison with `signal.alarm`
(`timeout_seconds`, whole seconds), and signals only work in the main thread. So:
- called from the main thread (the trainer's loop), the verifier runs inline;
- called from any other thread, or with `use_worker=True`, it runs in one long-lived worker
  process (`python -c`, same code) whose main thread has the signals, under a hard wall limit
  per sample (`hard_timeout_seconds`): a sample over it (a C-level computation a signal cannot
  interrupt, such as a huge integer power when `timeout_seconds=0`) has the worker killed and
  restarted. `use_worker=True` is the choice when responses may be adversarial, since inline a
  computation inside C code is interrupted only when it returns to Python.
Either way a time-out scores 0.0 with timed_out=True and the reason in info, never a silent 0.
Inline, math-verify sets and clears SIGALRM around each call: a caller that uses SIGALRM itself
must use the worker.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import selectors
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from megatron_opd.rewards.types import RewardError, RewardInput, RewardResult, require_field, score_each

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced;
    None when there is none or it is never closed (a truncated response)."""
    start = max(text.rfind(command) for command in _BOX_COMMANDS)
    while start >= 0:
        command = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
        position = start + len(command)
        while position < len(text) and text[position] == " ":
            position += 1
        if position < len(text) and text[position] == "{":
            depth = 0
            for end in range(position, len(text)):
                depth += {"{": 1, "}": -1}.get(text[end], 0)
                if depth == 0:
                    return text[position + 1:end]
            return None
        # `\boxed` not followed by a brace (e.g. `\boxed 5`, or text mentioning the command):
        # look at the one before it.
        start = max(text.rfind(c, 0, start) for c in _BOX_COMMANDS)
    return None


@dataclass(frozen=True)
class MathSettings:
    """math-verify's knobs (see its `parse` and `verify`)."""

    timeout_seconds: int = 5
    float_rounding: int = 6
    numeric_precision: int = 15
    strict: bool = True


@functools.lru_cache(maxsize=8192)
def _parse_gold(answer: str, timeout_seconds: int) -> tuple:
    from math_verify import parse

    # A bare gold answer ("0.5", "\frac{1}{2}", "[1,2)") is math: put it in $...$ so the LaTeX
    # extraction sees it; one already in $...$ or \boxed{} is parsed as written.
    text = answer if ("$" in answer or any(c in answer for c in _BOX_COMMANDS)) else f"${answer}$"
    return tuple(parse(text, parsing_timeout=timeout_seconds, raise_on_error=True))


def _matched_text(parsed: list) -> str | None:
    # math-verify returns [sympy object, the text it matched]; the text is what info shows, since
    # printing a SymPy object can itself take unbounded time.
    return next((item for item in parsed if isinstance(item, str)), None)


def score_math(sample: RewardInput, settings: MathSettings, verifier: str = "math") -> RewardResult:
    """Score one sample inline (needs the main thread when settings.timeout_seconds > 0)."""
    from math_verify import LatexExtractionConfig, parse, verify
    from math_verify.errors import TimeoutException

    answer = str(require_field(verifier, sample, "answer", (str, int, float))).strip()
    try:
        gold = _parse_gold(answer, settings.timeout_seconds)
    except TimeoutException as error:
        raise RewardError(f"{verifier} verifier: sample {sample.sample_id!r} (domain {sample.domain!r}) "
                          f"'answer' {answer!r} took over {settings.timeout_seconds}s to parse") from error
    if not gold:
        raise RewardError(f"{verifier} verifier: sample {sample.sample_id!r} (domain {sample.domain!r}) "
                          f"'answer' {answer!r} is not an answer math-verify can parse")
    info: dict[str, Any] = {"answer": _matched_text(list(gold))}

    boxed = last_boxed(sample.response)
    info["source"] = "last boxed" if boxed is not None else "last expression"
    try:
        if boxed is not None:
            predicted = parse("\\boxed{" + boxed + "}", extraction_config=[LatexExtractionConfig()],
                              parsing_timeout=settings.timeout_seconds, raise_on_error=True)
        else:
            predicted = parse(sample.response, parsing_timeout=settings.timeout_seconds, raise_on_error=True)
    except TimeoutException:
        return RewardResult(0.0, {**info, "reason": f"parsing the response took over {settings.timeout_seconds}s"},
                            timed_out=True)
    except Exception as error:  # math-verify's own default: an unparseable response is no answer
        return RewardResult(0.0, {**info, "reason": f"unparseable answer: {type(error).__name__}: {error}"})
    if not predicted:
        return RewardResult(0.0, {**info, "parsed": boxed, "reason": "no answer found"})
    info["parsed"] = _matched_text(predicted)

    # verify() is any() over gold x predicted; comparing pair by pair keeps a time-out apart
    # from a plain mismatch (verify with raise_on_error=False would return False for both).
    timed_out, errors = False, []
    for gold_item, predicted_item in itertools.product(gold, predicted):
        try:
            if verify(gold_item, predicted_item, float_rounding=settings.float_rounding,
                      numeric_precision=settings.numeric_precision, strict=settings.strict,
                      timeout_seconds=settings.timeout_seconds, raise_on_error=True):
                return RewardResult(1.0, {**info, "reason": "equivalent"})
        except TimeoutException:
            timed_out = True
        except Exception as error:  # as math-verify itself: a comparison that fails is no match
            errors.append(f"{type(error).__name__}: {error}")
    if timed_out:
        return RewardResult(0.0, {**info, "reason": f"a comparison took over {settings.timeout_seconds}s"},
                            timed_out=True)
    reason = "not equivalent" + (f" (comparison errors: {'; '.join(errors)[:500]})" if errors else "")
    return RewardResult(0.0, {**info, "reason": reason})


@dataclass
class MathVerifier:
    """1.0 when the response's final answer is math-verify-equivalent to fields["answer"].

    Inline from the main thread, in a worker process from other threads or when `use_worker`
    (see the module docstring); `hard_timeout_seconds` bounds one sample in the worker.
    """

    timeout_seconds: int = 5
    float_rounding: int = 6
    numeric_precision: int = 15
    strict: bool = True
    use_worker: bool | None = None
    hard_timeout_seconds: float = 60.0
    name: ClassVar[str] = "math"
    _worker: _MathWorker | None = field(default=None, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def __post_init__(self):
        if int(self.timeout_seconds) != self.timeout_seconds or self.timeout_seconds < 0:
            raise ValueError(f"math verifier: timeout_seconds must be a whole number of seconds >= 0 "
                             f"(math-verify uses signal.alarm), not {self.timeout_seconds!r}")

    @property
    def settings(self) -> MathSettings:
        return MathSettings(int(self.timeout_seconds), self.float_rounding, self.numeric_precision, self.strict)

    def _in_worker(self) -> bool:
        in_main_thread = threading.current_thread() is threading.main_thread()
        if self.use_worker is None:
            # signal.alarm only works in the main thread; with no time limit there is no alarm.
            return self.timeout_seconds > 0 and not in_main_thread
        if not self.use_worker and self.timeout_seconds > 0 and not in_main_thread:
            raise RuntimeError("math verifier: use_worker=False outside the main thread, where math-verify's "
                               "time limit (signal.alarm) cannot work; leave use_worker unset (None) to use "
                               "the worker process there, or set timeout_seconds=0 for no limit")
        return self.use_worker

    def score(self, samples: list[RewardInput]) -> list[RewardResult]:
        if not self._in_worker():
            settings = self.settings
            return score_each(self.name, samples, lambda sample: score_math(sample, settings, self.name))
        with self._lock:  # one worker, one request at a time
            if self._worker is None:
                self._worker = _MathWorker(self.settings, self.hard_timeout_seconds)
            return score_each(self.name, samples, self._worker.score)

    def close(self) -> None:
        """Stop the worker process, if one was started."""
        with self._lock:
            if self._worker is not None:
                self._worker.close()
                self._worker = None


class _MathWorker:
    """A `python -c` child that scores samples in its main thread (so math-verify's signal
    time-outs work), one JSON line in and one out; killed and restarted after a hard overrun."""

    _STARTUP_SECONDS = 120.0  # importing SymPy and math-verify on a loaded 2-core machine

    def __init__(self, settings: MathSettings, hard_timeout_seconds: float):
        self.settings, self.hard_timeout_seconds = settings, hard_timeout_seconds
        self._process: subprocess.Popen | None = None
        self._stderr = None
        self._finalizer = None

    def _start(self) -> None:
        package_root = str(Path(__file__).resolve().parents[2])
        code = (f"import sys; sys.path.insert(0, {package_root!r}); "
                "from megatron_opd.rewards.math import _worker_main; _worker_main()")
        self._stderr = tempfile.TemporaryFile()
        self._process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self._stderr, close_fds=True)
        self._finalizer = weakref.finalize(self, _kill, self._process)
        self._send(asdict(self.settings))
        if self._receive(self._STARTUP_SECONDS) is None:
            raise RuntimeError(f"math verifier: the worker process did not start within "
                               f"{self._STARTUP_SECONDS:.0f}s: {self._stderr_tail()}")

    def _send(self, message: dict) -> None:
        self._process.stdin.write(json.dumps(message).encode() + b"\n")
        self._process.stdin.flush()

    def _receive(self, seconds: float) -> dict | None:
        """The next line from the worker, or None when `seconds` pass first (or it died)."""
        deadline = time.monotonic() + seconds
        with selectors.DefaultSelector() as selector:
            selector.register(self._process.stdout, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                if selector.select(left):
                    line = self._process.stdout.readline()
                    return json.loads(line) if line else None
        return None

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-2000:]

    def score(self, sample: RewardInput) -> RewardResult:
        if self._process is None or self._process.poll() is not None:
            self._start()
        try:
            self._send(asdict(sample))
        except BrokenPipeError:
            raise RuntimeError(f"math verifier: the worker process exited: {self._stderr_tail()}") from None
        reply = self._receive(self.hard_timeout_seconds)
        if reply is None:
            died = self._process.poll() is not None
            self.close()
            if died:
                raise RuntimeError(f"math verifier: the worker process died on sample {sample.sample_id!r}: "
                                   f"{self._stderr_tail()}")
            return RewardResult(0.0, {"reason": f"over the hard limit of {self.hard_timeout_seconds}s "
                                                f"(worker killed)"}, timed_out=True)
        if "error" in reply:
            raise RewardError(reply["error"])
        return RewardResult(reply["score"], reply["info"], reply["timed_out"])

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._process = None


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


def _worker_main() -> None:
    """The worker's loop: settings on the first line, then one sample per line."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr  # anything a library prints must not reach the protocol
    import math_verify  # noqa: F401  (import before saying ready: it takes seconds)

    settings = MathSettings(**json.loads(sys.stdin.readline()))
    protocol.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        sample = RewardInput(**json.loads(line))
        try:
            [result] = score_each("math", [sample], lambda s: score_math(s, settings))
        except RewardError as error:
            protocol.write(json.dumps({"error": str(error)}) + "\n")
            continue
        protocol.write(json.dumps(asdict(result)) + "\n")
