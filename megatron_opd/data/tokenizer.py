"""Tokenizers: the `Tokenizer` protocol the rest of the code is written against, and its implementations.

A tokenizer maps text to ids and back, renders a prompt the way the model was trained to see it
(`encode_prompt`: chat messages through a chat template with the generation prompt; plain text for
models without one), names the ids that end a response (`stop_ids`), and has a fingerprint, so
that a student and its teachers can prove they share one (the `TeacherPool` refuses a teacher
whose fingerprint differs from the student's).

Implementations:
- `CharTokenizer` (the tiny domains): one token per character of a fixed alphabet plus the
  special tokens; its fingerprint hashes the exact id <-> string table; a prompt is BOS + text.
- Hugging Face tokenizers with chat templates come next (issue 15); `load_tokenizer` is where a
  model directory's files decide which implementation loads them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Protocol, Sequence, runtime_checkable

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
TINY_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz+-*=:,;|>() "

# A prompt as a stage hands it to a tokenizer: plain text, or chat turns {"role", "content"}.
PromptInput = str | Sequence[Mapping[str, str]]


@runtime_checkable
class Tokenizer(Protocol):
    """What stages, rollout engines, teachers and servers may ask of a tokenizer."""

    @property
    def vocab_size(self) -> int: ...  # ids lie in [0, vocab_size) (megatron pads the model's beyond it)

    @property
    def pad_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...  # None for tokenizers without one (many chat models)

    @property
    def stop_ids(self) -> tuple[int, ...]: ...  # ids that end a response: EOS, and end-of-turn tokens

    @property
    def fingerprint(self) -> str: ...  # equal iff every id means the same token (and template)

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int], *, stop_at_eos: bool = True) -> str:
        """The text of `ids` without special tokens; with `stop_at_eos`, up to the first stop id."""
        ...

    def encode_prompt(self, prompt: PromptInput) -> list[int]:
        """The ids a response is generated after: chat turns rendered with the generation prompt,
        or plain text as the model was trained to see it."""
        ...

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the files `load_tokenizer(directory)` reads back; returns the main file."""
        ...


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

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return (self.eos_id,)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[c] for c in text]
        except KeyError as e:
            raise ValueError(
                f"character {e.args[0]!r} is not in the tokenizer alphabet {self.alphabet!r}"
            ) from None

    def decode(self, ids: Iterable[int], *, stop_at_eos: bool = True) -> str:
        out = []
        n = len(self.specials)
        for i in ids:
            i = int(i)
            if i == self.eos_id and stop_at_eos:
                break
            if i >= n:
                out.append(self.alphabet[i - n])
        return "".join(out)

    def encode_prompt(self, prompt: PromptInput) -> list[int]:
        """BOS + the text. There is no chat template: chat input must be a single user turn."""
        if not isinstance(prompt, str):
            turns = list(prompt)
            if len(turns) != 1 or turns[0].get("role") != "user":
                raise ValueError(
                    f"the character tokenizer has no chat template: it encodes one user turn, got "
                    f"{[t.get('role') for t in turns]}; give the prompt as text"
                )
            prompt = turns[0]["content"]
        return [self.bos_id, *self.encode(prompt)]

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


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer a model directory holds (or the `tokenizer.json` file itself), by what is there.

    - `tokenizer.json` of type "char": the `CharTokenizer` written by `write_model_dir`;
    - Hugging Face tokenizer files (`tokenizer_config.json`, or a `tokenizer.json` in the
      `tokenizers` library's format), in the directory or its `hf/`: refused until that
      implementation lands, with the message saying so.
    """
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if file.is_file():
        spec = json.loads(file.read_text())
        if spec.get("type") == "char":
            return CharTokenizer(alphabet=spec["alphabet"], specials=tuple(spec["specials"]))
        if "model" in spec and "type" not in spec:
            raise ValueError(_HF_NOT_YET.format(path=file))
        raise ValueError(f"{file}: unknown tokenizer type {spec.get('type')!r} (supported: 'char')")
    directory = path if path.is_dir() else path.parent
    for d in (directory, directory / "hf"):
        if (d / "tokenizer_config.json").is_file():
            raise ValueError(_HF_NOT_YET.format(path=d / "tokenizer_config.json"))
    raise FileNotFoundError(
        f"{path} holds no tokenizer: expected tokenizer.json (the character tokenizer a model "
        f"directory of megatron-opd carries)"
    )


_HF_NOT_YET = (
    "{path} is a Hugging Face tokenizer, which megatron-opd cannot load yet; models trained here use "
    "the character tokenizer (tokenizer.json with type 'char')"
)


def run_tokenizer(run_dir: str | os.PathLike, init_from: str | os.PathLike = "") -> Tokenizer:
    """The tokenizer a run trains with: the one its directory already holds (a resumed run keeps
    its own), else that of the model it starts from (`train.init_from`: a model directory, or its
    `checkpoints/` or one `checkpoints/step_N` in it), else the tiny domains' character tokenizer
    (a model trained from scratch here). Torch-free: checked before launch."""
    candidates = [Path(run_dir)]
    if init_from:
        path = Path(init_from)
        if path.name.startswith("step_") and path.parent.name == "checkpoints":
            path = path.parent
        candidates.append(path.parent if path.name == "checkpoints" else path)
    for directory in candidates:
        if (directory / "tokenizer.json").is_file() or (directory / "hf" / "tokenizer_config.json").is_file():
            return load_tokenizer(directory)
    return CharTokenizer()
