"""Tokenizers with a fingerprint, so that a student and its teachers can prove they share one.

The tiny domains use `CharTokenizer`: one token per character of a fixed alphabet plus the
special tokens. Its fingerprint is a hash of the exact id <-> string mapping; teachers report it
and the `TeacherPool` refuses a teacher whose fingerprint differs from the student's.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
TINY_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz+-*=:,;|>() "


@dataclass(frozen=True)
class CharTokenizer:
    alphabet: str = TINY_ALPHABET
    specials: tuple[str, ...] = (PAD, BOS, EOS)
    _index: dict = field(default=None, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self):
        if len(set(self.alphabet)) != len(self.alphabet):
            raise ValueError(f"tokenizer alphabet has repeated characters: {self.alphabet!r}")
        object.__setattr__(self, "_index", {c: i + len(self.specials) for i, c in enumerate(self.alphabet)})

    @property
    def vocab_size(self) -> int:
        return len(self.specials) + len(self.alphabet)

    @property
    def pad_id(self) -> int:
        return self.specials.index(PAD)

    @property
    def bos_id(self) -> int:
        return self.specials.index(BOS)

    @property
    def eos_id(self) -> int:
        return self.specials.index(EOS)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[c] for c in text]
        except KeyError as e:
            raise ValueError(
                f"character {e.args[0]!r} is not in the tokenizer alphabet {self.alphabet!r}"
            ) from None

    def decode(self, ids, *, stop_at_eos: bool = True) -> str:
        out = []
        n = len(self.specials)
        for i in ids:
            i = int(i)
            if i == self.eos_id and stop_at_eos:
                break
            if i >= n:
                out.append(self.alphabet[i - n])
        return "".join(out)

    def to_json(self) -> dict:
        return {"type": "char", "alphabet": self.alphabet, "specials": list(self.specials)}

    @property
    def fingerprint(self) -> str:
        """sha256 over the id -> token table: equal iff every id means the same token."""
        table = json.dumps(list(self.specials) + list(self.alphabet), ensure_ascii=True)
        return hashlib.sha256(table.encode()).hexdigest()[:16]

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path


def load_tokenizer(path: str | os.PathLike) -> CharTokenizer:
    """Load `tokenizer.json` (a file or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    spec = json.loads(path.read_text())
    if spec.get("type") != "char":
        raise ValueError(f"{path}: unknown tokenizer type {spec.get('type')!r} (supported: 'char')")
    return CharTokenizer(alphabet=spec["alphabet"], specials=tuple(spec["specials"]))
