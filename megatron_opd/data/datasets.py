"""Prompt datasets from JSONL and Parquet files, mixed by weight: `FileDatasets`, a `PromptSource`
(and, for SFT, a `DemonstrationSource`).

A row (one JSON object per line, or one Parquet row) holds either `messages` (chat turns
{"role", "content"}) or `prompt` (text, a single user turn), optionally `completion` (the
assistant's reply to a `prompt`) and `domain` (one of data.datasets' domains; default: its
dataset's), and any other fields, which are the verifier's (`answer` for math and exact,
`pattern` for regex, `tests` for code) and reach it as `Prompt.metadata`. A null field is absent.
- As a prompt (on-policy stages): the turns up to the last user (or tool) turn; a trailing
  assistant turn is the row's reference reply. The prompt text verifiers read is the last user
  turn's content.
- As a demonstration (SFT): the whole conversation, ending with an assistant turn (`messages`),
  or `prompt` + `completion`; the loss covers the assistant's tokens only (the tokenizer's
  `encode_conversation` mask).

Mixing: training index i picks dataset k by a Weyl sequence, u_i = (A i + B) mod M with
A / M the golden ratio's fraction and B from data.seed: k is the weight interval u_i / M falls
in. Its position j among k's draws (how many of the indices before i picked k) has a closed form
(`floor_sum`), so index i maps to a sample in O(log M) with no state: draw j is row
perm_e[j mod n] of epoch e = j div n, a seeded permutation per epoch. Any window of N indices
holds each dataset's share N w_k / sum(w) to within O(log N) (the sequence's discrepancy), far
tighter than independent draws (sqrt N); a resumed run maps every index to the same sample.

Held-out rows (`eval_fraction` of a file's rows, seeded, or all rows of `eval_path`) are never
trained on: a training row whose prompt equals a held-out prompt of its domain is excluded too.
`eval_prompts(domain)` gives at most data.eval_size of them.

Bad rows: undecodable (not UTF-8, not JSON, not an object), a missing field (neither messages
nor prompt; a verifier field; SFT's assistant turn), a malformed one (turns, types, an unknown
domain), or over-long (with a tokenizer: a prompt that leaves no room for rollout.max_new_tokens
under model.max_seq_len, or an SFT conversation longer than model.max_seq_len). With
`data.bad_rows: error` (the default) the first one stops the job with its file and line, before
any step; with `drop` they are left out and counted by reason in `metrics` (data/dropped_rows,
data/dropped_rows/<reason>), which stages report with every step and so in summary.json.

Files are read whole on every rank when the source is built (a few GB of text at most; larger
corpora want a pre-tokenized format).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from megatron_opd.data.prompts import Demonstration, Prompt
from megatron_opd.data.tokenizer import Tokenizer, canonical_json, check_turns

if TYPE_CHECKING:
    from megatron_opd.config import DataConfig, DatasetConfig

# The fields the verifiers of these names read (rewards/math.py, match.py, code.py): a row without
# them is refused when it is loaded, not when its first response is scored.
VERIFIER_FIELDS: dict[str, tuple[str, ...]] = {
    "math": ("answer",),
    "exact": ("answer",),
    "regex": ("pattern",),
    "code": ("tests",),
}
RESERVED_FIELDS = ("messages", "prompt", "completion", "domain")


class DatasetError(ValueError):
    """A dataset file or row cannot be used; the message names the file (and line) and the fix."""


class BadRow(Exception):
    """One row's problem: `reason` (counted under data.bad_rows=drop) and the message."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """Token limits a source checks its rows against (0: unchecked), and why they are what they are."""

    tokenizer: Tokenizer | None = None
    prompt_tokens: int = 0  # a prompt's longest encoding (what rollouts and evaluation generate after)
    example_tokens: int = 0  # an SFT conversation's longest encoding
    prompt_why: str = ""
    example_why: str = ""


@dataclass(frozen=True)
class Row:
    where: str  # "path:line" (JSONL) or "path:row N" (Parquet, from 1)
    domain: str
    prompt_turns: tuple[Mapping[str, str], ...]
    demonstration: tuple[Mapping[str, str], ...] | None  # the conversation ending with the assistant's turn
    fields: Mapping[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return next(t["content"] for t in reversed(self.prompt_turns) if t["role"] == "user")

    @property
    def key(self) -> str:
        """The prompt's identity (held-out rows are compared by it)."""
        return canonical_json([dict(t) for t in self.prompt_turns])


# ---------------------------------------------------------------------------------------------
# Reading files


def read_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, the parsed row or a BadRow) for every row of a .jsonl or .parquet file."""
    path = Path(path)
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow raises many kinds; a file it cannot read is one error
            raise DatasetError(f"{path}: cannot read it as Parquet ({type(e).__name__}: {e})") from None
        for i, row in enumerate(rows):
            yield f"{path}:row {i + 1}", row
        return
    if path.suffix != ".jsonl":
        raise DatasetError(f"{path}: a dataset file ends in .jsonl or .parquet")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DatasetError(f"{path}: cannot open it ({e.strerror})") from None
    with f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}:{n}"
            if not raw.strip():
                continue  # a blank line holds no row
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, BadRow("undecodable", f"{where}: the line is not UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r})")
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as e:
                yield where, BadRow("undecodable", f"{where}: the line is not valid JSON ({e.msg} at column {e.colno})")


def parse_row(where: str, obj: Any, dataset: "DatasetConfig", verifier_of: Mapping[str, str], need_demonstration: bool) -> Row:
    """A checked `Row`, or a BadRow naming the field."""
    if not isinstance(obj, dict):
        raise BadRow("undecodable", f"{where}: the row is a JSON {type(obj).__name__}, not an object")
    obj = {k: v for k, v in obj.items() if v is not None}
    domain = obj.get("domain", dataset.domain)
    if not isinstance(domain, str) or domain not in verifier_of:
        raise BadRow(
            "bad_field", f"{where}: field 'domain' is {domain!r}, not one of data.datasets' domains {sorted(verifier_of)}"
        )
    if ("messages" in obj) == ("prompt" in obj):
        which = "both 'messages' and 'prompt'" if "messages" in obj else "neither 'messages' nor 'prompt'"
        raise BadRow("missing_field" if "messages" not in obj else "bad_field", f"{where}: the row has {which}; give one of them")
    if "messages" in obj:
        try:
            turns = tuple(dict(t) for t in check_turns(obj["messages"]))
        except (ValueError, TypeError) as e:
            raise BadRow("bad_field", f"{where}: field 'messages': {e}") from None
        if "completion" in obj:
            raise BadRow("bad_field", f"{where}: 'completion' goes with 'prompt'; a conversation's reply is its last assistant turn")
        last = max((i for i, t in enumerate(turns) if t["role"] != "assistant"), default=-1)
        if last < 0 or not any(t["role"] == "user" for t in turns[: last + 1]):
            raise BadRow("bad_field", f"{where}: field 'messages' has no user turn")
        prompt_turns = turns[: last + 1]
        demonstration = turns if turns[-1]["role"] == "assistant" else None
    else:
        prompt, completion = obj["prompt"], obj.get("completion")
        if not isinstance(prompt, str) or not prompt:
            raise BadRow("bad_field", f"{where}: field 'prompt' must be non-empty text, got {type(prompt).__name__} {prompt!r:.40}")
        if completion is not None and not isinstance(completion, str):
            raise BadRow("bad_field", f"{where}: field 'completion' must be text, got {type(completion).__name__}")
        prompt_turns = ({"role": "user", "content": prompt},)
        demonstration = prompt_turns + ({"role": "assistant", "content": completion},) if completion is not None else None
    if need_demonstration and demonstration is None:
        raise BadRow(
            "missing_field",
            f"{where}: SFT needs the assistant's reply: 'messages' ending with an assistant turn, or 'prompt' with 'completion'",
        )
    fields = {k: v for k, v in obj.items() if k not in RESERVED_FIELDS}
    verifier = verifier_of[domain]
    for name in VERIFIER_FIELDS.get(verifier, ()):
        if name not in fields:
            raise BadRow(
                "missing_field", f"{where}: no {name!r} field, which the {verifier} verifier of domain {domain!r} reads"
            )
    return Row(where, domain, prompt_turns, demonstration, fields)


def check_length(row: Row, limits: Limits, as_example: bool) -> None:
    """BadRow("over_long") when the row's prompt (or, `as_example`, its whole conversation) does
    not fit; BadRow("untokenizable") when the tokenizer cannot render it."""
    tok = limits.tokenizer
    if tok is None:
        return
    limit, why = (limits.example_tokens, limits.example_why) if as_example else (limits.prompt_tokens, limits.prompt_why)
    if limit <= 0:
        return
    try:
        n = len(tok.encode_conversation(row.demonstration)[0]) if as_example else len(tok.encode_prompt(row.prompt_turns))
    except (ValueError, KeyError, TypeError) as e:
        raise BadRow("untokenizable", f"{row.where}: the tokenizer cannot render the row ({e})") from None
    if n > limit:
        what = "conversation" if as_example else "prompt"
        raise BadRow("over_long", f"{row.where}: the {what} is {n} tokens, over the {limit} it may have ({why})")


# ---------------------------------------------------------------------------------------------
# Mixing by weight, deterministic by index


def floor_sum(n: int, m: int, a: int, b: int) -> int:
    """sum_{i=0}^{n-1} floor((a i + b) / m) for n, m >= 1 and a, b >= 0, in O(log m) steps
    (the Euclid-like reduction of AtCoder Library's floor_sum)."""
    total = 0
    while True:
        if a >= m:
            total += (n - 1) * n // 2 * (a // m)
            a %= m
        if b >= m:
            total += n * (b // m)
            b %= m
        y = a * n + b
        if y < m:
            return total
        n, b = divmod(y, m)
        m, a = a, m


_M = (1 << 61) - 1
_A = (math.isqrt(5 * _M * _M) - _M) // 2  # floor(M (sqrt 5 - 1) / 2): the golden ratio's fraction


class WeightedMix:
    """Index -> (dataset, its draw number), by the Weyl sequence of the module docstring."""

    def __init__(self, weights: Sequence[float], seed: int):
        if not weights or any(not w > 0 for w in weights):
            raise ValueError(f"mixing weights must be > 0, got {list(weights)}")
        total = sum(Fraction(w) for w in weights)
        cum, self.bounds = Fraction(0), [0]
        for w in weights:
            cum += Fraction(w)
            share = cum / total
            self.bounds.append(_M * share.numerator // share.denominator)
        digest = hashlib.sha256(f"mix/{seed}".encode()).digest()
        self.offset = int.from_bytes(digest[:8], "little") % _M

    def dataset_at(self, index: int) -> int:
        return bisect_right(self.bounds, (_A * index + self.offset) % _M) - 1

    def _below(self, n: int, t: int) -> int:
        """#{i < n : (A i + B) mod M < t} (floor(x/M) - floor((x-t)/M) is 1 exactly then)."""
        if n <= 0 or t <= 0:
            return 0
        if t >= _M:
            return n
        b = self.offset
        return floor_sum(n, _M, _A, b) - floor_sum(n, _M, _A, b - t + _M) + n

    def draws_before(self, index: int, k: int) -> int:
        """How many of the indices [0, index) pick dataset k."""
        return self._below(index, self.bounds[k + 1]) - self._below(index, self.bounds[k])


def _seeded(*parts: Any) -> random.Random:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


# ---------------------------------------------------------------------------------------------
# The source


class FileDatasets:
    """The `PromptSource` of `data.datasets` (module docstring). `demonstrations=True`: every
    training row must carry an assistant reply (SFT), and rows are checked as whole
    conversations against `limits.example_tokens`."""

    def __init__(self, data: "DataConfig", limits: Limits = Limits(), *, demonstrations: bool = False):
        if not data.datasets:
            raise DatasetError("data.datasets is empty; name at least one .jsonl or .parquet file")
        self.config = data
        self.limits = limits
        self.with_demonstrations = demonstrations
        self.domains = data.source_domains
        self.verifier_of = data.verifier_of()
        self.dropped: Counter[str] = Counter()
        held_out: list[list[Row]] = []
        candidates: list[list[Row]] = []
        for k, d in enumerate(data.datasets):
            rows = self._load(d.path, d, as_examples=demonstrations)
            if d.eval_path:
                held_out.append(self._load(d.eval_path, d, as_examples=False))
            elif d.eval_fraction > 0:
                n_eval = round(d.eval_fraction * len(rows))
                chosen = set(_seeded("eval", data.seed, k).sample(range(len(rows)), n_eval))
                evals = [r for i, r in enumerate(rows) if i in chosen]
                if demonstrations:  # checked as conversations so far; evaluation generates after their prompts
                    evals = [r for r in evals if self._checked(r, as_example=False)]
                held_out.append(evals)
                rows = [r for i, r in enumerate(rows) if i not in chosen]
            else:
                held_out.append([])
            candidates.append(rows)
        keys = {(r.domain, r.key) for rows in held_out for r in rows}
        self.train_rows: list[list[Row]] = []
        self.excluded_as_held_out = 0
        for d, rows in zip(data.datasets, candidates):
            kept = [r for r in rows if (r.domain, r.key) not in keys]
            self.excluded_as_held_out += len(rows) - len(kept)
            if not kept:
                raise DatasetError(
                    f"{d.path} has no training rows left (of {len(rows)} valid, the rest held out or dropped); "
                    f"check the file, its eval_fraction, and data.bad_rows"
                )
            self.train_rows.append(kept)
        # every held-out row by domain; evaluation takes the first data.eval_size of each
        self.held_out_rows = {dom: [r for rows in held_out for r in rows if r.domain == dom] for dom in self.domains}
        self._held_out = {dom: rows[: data.eval_size] for dom, rows in self.held_out_rows.items()}
        self.mix = WeightedMix([d.weight for d in data.datasets], data.seed)
        self._perms: dict[tuple[int, int], list[int]] = {}

    # -- loading ----------------------------------------------------------------------------------

    def _load(self, path: str, dataset: "DatasetConfig", *, as_examples: bool) -> list[Row]:
        rows = []
        for where, obj in read_records(path):
            try:
                if isinstance(obj, BadRow):
                    raise obj
                row = parse_row(where, obj, dataset, self.verifier_of, as_examples)
                check_length(row, self.limits, as_example=as_examples)
            except BadRow as bad:
                self._bad(bad)
                continue
            rows.append(row)
        return rows

    def _checked(self, row: Row, *, as_example: bool) -> bool:
        try:
            check_length(row, self.limits, as_example=as_example)
        except BadRow as bad:
            self._bad(bad)
            return False
        return True

    def _bad(self, bad: BadRow) -> None:
        if self.config.bad_rows != "drop":
            raise DatasetError(f"{bad}; fix the row, or set data.bad_rows=drop to leave such rows out (their count is reported)")
        self.dropped[bad.reason] += 1

    @property
    def metrics(self) -> dict[str, float]:
        """What loading dropped (data.bad_rows=drop), by reason: reported with every step."""
        out = {"data/dropped_rows": float(sum(self.dropped.values()))}
        out.update({f"data/dropped_rows/{reason}": float(n) for reason, n in sorted(self.dropped.items())})
        return out

    # -- the PromptSource ---------------------------------------------------------------------------

    def row_at(self, index: int) -> Row:
        """The training row at global position `index`."""
        if index < 0:
            raise IndexError(f"sample index {index} is negative")
        k = self.mix.dataset_at(index)
        rows = self.train_rows[k]
        epoch, r = divmod(self.mix.draws_before(index, k), len(rows))
        return rows[self._permutation(k, epoch, len(rows))[r]]

    def _permutation(self, k: int, epoch: int, n: int) -> list[int]:
        key = (k, epoch)
        if key not in self._perms:
            if len(self._perms) > 2 * len(self.train_rows):
                self._perms.clear()  # indices advance in order: only the current epochs are reused
            order = list(range(n))
            _seeded("epoch", self.config.seed, k, epoch).shuffle(order)
            self._perms[key] = order
        return self._perms[key]

    def _prompt(self, row: Row, sample_id: str) -> Prompt:
        return Prompt(row.text, row.domain, sample_id, row.prompt_turns, dict(row.fields), origin=row.where)

    def prompt(self, index: int) -> Prompt:
        row = self.row_at(index)
        return self._prompt(row, f"{row.domain}/{index}")

    def prompts(self, start: int, count: int) -> list[Prompt]:
        return [self.prompt(i) for i in range(start, start + count)]

    def demonstrations(self, start: int, count: int) -> list[Demonstration]:
        if not self.with_demonstrations:
            raise RuntimeError("this source was built for prompts; build it with demonstrations=True for SFT")
        out = []
        for i in range(start, start + count):
            row = self.row_at(i)
            out.append(Demonstration(self._prompt(row, f"{row.domain}/{i}"), row.demonstration))
        return out

    def eval_prompts(self, domain: str) -> list[Prompt]:
        return [self._prompt(r, f"{domain}/eval{i}") for i, r in enumerate(self._held_out[domain])]

    def reward_name(self, domain: str) -> str:
        """The domain's verifier ("" when its datasets name none: never verified)."""
        return self.verifier_of[domain]
