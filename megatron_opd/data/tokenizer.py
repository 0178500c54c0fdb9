"""Tokenizers: the `Tokenizer` protocol the rest of the code is written against, its two
implementations, and how two tokenizers are compared.

A tokenizer maps text to ids and back, renders a prompt the way the model was trained to see it
(`encode_prompt`: chat messages through a chat template with the generation prompt; plain text for
models without one), renders a whole conversation with a per-token mask of the assistant's tokens
(`encode_conversation`: what SFT trains on), names the ids that end a response (`stop_ids`), and
describes itself (`describe`: the vocabulary, merges, added and special tokens, normalizer,
pre-tokenizer and chat template in canonical form). Its fingerprint hashes that description, so
a student and its teachers prove they share one, and `tokenizer_difference` says what differs
when they do not (the first differing token id with both tokens, the template, ...).

Implementations:
- `CharTokenizer` (the tiny domains): one token per character of a fixed alphabet plus the
  special tokens; its fingerprint hashes the exact id <-> string table; a prompt is BOS + text.
- `HFTokenizer` (data/hf_tokenizer.py): a Hugging Face tokenizer loaded from a model directory
  with transformers (tokenizer.json, tokenizer_config.json, the chat template), local files only.
`load_tokenizer` is where a directory's files decide which implementation loads them.

Without a chat template a conversation is plain text (`plain_conversation`): user and assistant
turns alternate from a user turn, the first rendered as a prompt, each assistant turn followed by
EOS. The character tokenizer renders every conversation that way.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable, Mapping, Protocol, Sequence, runtime_checkable

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
TINY_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz+-*=:,;|>() "

# A prompt as a stage hands it to a tokenizer: plain text, or chat turns {"role", "content"}.
PromptInput = str | Sequence[Mapping[str, str]]
ROLES = ("system", "user", "assistant", "tool")


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

    def encode_conversation(self, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[int]]:
        """(ids of the whole conversation, 1 at each token the assistant's turns produce, else 0):
        what SFT trains on. The mask covers each assistant turn's content and the token that ends
        it (EOS or the end-of-turn token), not the template's text around it."""
        ...

    def describe(self) -> "TokenizerDescription":
        """Everything that decides ids and rendering, canonical: what the fingerprint hashes."""
        ...

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the files `load_tokenizer(directory)` reads back; returns the main file."""
        ...


# ---------------------------------------------------------------------------------------------
# Descriptions, fingerprints and differences


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=True, separators=(",", ":"))


# Ids per block in a `digest`: a server reports one hash per block, so a mismatch names the block.
DIGEST_BLOCK = 4096


@dataclass(frozen=True)
class TokenizerDescription:
    """A tokenizer in canonical form. Every field but `kind` and `tokens` is text or a tuple of
    texts (canonical JSON where the source is JSON), so equality is content equality."""

    kind: str  # "char" or "hf"
    tokens: tuple[str | None, ...]  # id -> token (None: an id no token has)
    added_tokens: tuple[str, ...] = ()  # each added token's JSON (id, content, special, flags)
    special_tokens: tuple[tuple[str, str], ...] = ()  # (role, token): bos, eos, pad, unk, stop
    merges: tuple[str, ...] = ()  # BPE merges in rank order, each the JSON pair ["a", "b"]
    normalizer: str = "null"
    pre_tokenizer: str = "null"
    model: str = "null"  # the model's settings besides vocabulary and merges (type, unk, byte fallback)
    post_processor: str = "null"
    decoder: str = "null"
    chat_template: str = ""  # "" when there is none; several named templates as canonical JSON

    @property
    def fingerprint(self) -> str:
        """sha256 over the description. The character tokenizer's is over its id -> token table
        alone (all it has), as its checkpoints have always recorded it."""
        if self.kind == "char":
            return _sha(json.dumps(list(self.tokens), ensure_ascii=True))
        return _sha(canonical_json({f.name: getattr(self, f.name) for f in fields(self)}))

    def to_json(self) -> dict:
        """The description as plain JSON (what our server sends at /tokenizer_description)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_json(cls, value: dict) -> "TokenizerDescription":
        """The inverse of `to_json`; ValueError when `value` is not one."""
        try:
            spec = {f.name: value[f.name] for f in fields(cls) if f.name in value}
            spec["tokens"] = tuple(spec["tokens"])
            for name in ("added_tokens", "merges"):
                spec[name] = tuple(spec.get(name, ()))
            spec["special_tokens"] = tuple(tuple(p) for p in spec.get("special_tokens", ()))
            return cls(**spec)
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a tokenizer description ({type(e).__name__}: {e})") from None

    def digest(self) -> dict:
        """A small summary a server can report (its /model_info): the fingerprint, a hash per
        block of `DIGEST_BLOCK` ids and per component; `digest_difference` compares two."""
        out = {"fingerprint": self.fingerprint, "kind": self.kind, "vocab_size": len(self.tokens)}
        out["token_blocks"] = [
            _sha(canonical_json(list(self.tokens[i : i + DIGEST_BLOCK]))) for i in range(0, len(self.tokens), DIGEST_BLOCK)
        ]
        for name in _COMPONENTS[1:]:
            out[name] = _sha(canonical_json(getattr(self, name)))
        return out


# Compared in this order; a difference message lists every component that differs.
_COMPONENTS = ("tokens", "added_tokens", "special_tokens", "merges", "normalizer", "pre_tokenizer", "model",
               "post_processor", "decoder", "chat_template")  # fmt: skip
_LABELS = {
    "added_tokens": "added tokens", "special_tokens": "special tokens", "merges": "merges",
    "normalizer": "normalizers", "pre_tokenizer": "pre-tokenizers", "model": "model settings",
    "post_processor": "post-processors", "decoder": "decoders", "chat_template": "chat templates",
}  # fmt: skip


def _token_at(tokens: Sequence[str | None], i: int) -> str:
    return repr(tokens[i]) if i < len(tokens) else "absent"


def _show_merge(merge: str) -> str:
    pair = json.loads(merge)
    return " + ".join(repr(p) for p in pair)


def _show_added(token: str) -> str:
    spec = json.loads(token)
    return f"{spec.get('content')!r} (id {spec.get('id')}{', special' if spec.get('special') else ''})"


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_difference(a: Sequence, b: Sequence) -> int | None:
    return next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), None)


def description_difference(a: TokenizerDescription, b: TokenizerDescription, names: tuple[str, str] = ("student", "teacher")) -> str:
    """What differs between two tokenizers, every differing part named ("" when they are equal):
    the first differing token id with both tokens, the first differing merge, added or special
    token, the normalizer, pre-tokenizer, model, post-processor, decoder, the chat template's
    first differing line."""
    x, y = names
    parts: list[str] = []
    if a.kind != b.kind:
        parts.append(f"the {x}'s is a {a.kind} tokenizer and the {y}'s a {b.kind} tokenizer")
    if a.tokens != b.tokens:
        i = _first_difference(a.tokens, b.tokens)
        if i is None:  # one vocabulary extends the other
            i = min(len(a.tokens), len(b.tokens))
        parts.append(f"token id {i} is {_token_at(a.tokens, i)} in the {x}'s vocabulary and {_token_at(b.tokens, i)} in the {y}'s")
        if len(a.tokens) != len(b.tokens):
            parts.append(f"the {x}'s vocabulary has {len(a.tokens)} ids and the {y}'s {len(b.tokens)}")
    for name in ("added_tokens", "merges"):
        ours, theirs = getattr(a, name), getattr(b, name)
        if ours == theirs:
            continue
        show = _show_merge if name == "merges" else _show_added
        what = "merge" if name == "merges" else "added token"
        i = _first_difference(ours, theirs)
        if i is None:
            i = min(len(ours), len(theirs))
        at = lambda seq: show(seq[i]) if i < len(seq) else "absent"  # noqa: E731
        parts.append(f"{what} {i} is {at(ours)} in the {x}'s and {at(theirs)} in the {y}'s")
    if a.special_tokens != b.special_tokens:
        ours, theirs = dict(a.special_tokens), dict(b.special_tokens)
        roles = [r for r in dict.fromkeys([*ours, *theirs]) if ours.get(r) != theirs.get(r)]
        parts.append("special tokens differ: " + ", ".join(
            f"{r} is {ours.get(r)!r} in the {x}'s and {theirs.get(r)!r} in the {y}'s" for r in roles))  # fmt: skip
    for name in ("normalizer", "pre_tokenizer", "model", "post_processor", "decoder"):
        ours, theirs = getattr(a, name), getattr(b, name)
        if ours != theirs:
            parts.append(f"the {_LABELS[name]} differ: {_short(ours)} ({x}) vs {_short(theirs)} ({y})")
    if a.chat_template != b.chat_template:
        parts.append(_template_difference(a.chat_template, b.chat_template, names))
    return "; ".join(parts)


def _template_difference(a: str, b: str, names: tuple[str, str]) -> str:
    x, y = names
    if not a or not b:
        return f"the {x if not a else y} has no chat template and the {y if not a else x} has one"
    la, lb = a.splitlines(), b.splitlines()
    i = _first_difference(la, lb)
    if i is None:
        i = min(len(la), len(lb))
    line_a = la[i] if i < len(la) else "<end>"
    line_b = lb[i] if i < len(lb) else "<end>"
    col = _first_difference(line_a, line_b) or 0
    start = max(0, col - 30)
    return (f"the chat templates differ (line {i + 1}, column {col + 1}: {_short(line_a[start:], 80)!r} in the "
            f"{x}'s, {_short(line_b[start:], 80)!r} in the {y}'s)")  # fmt: skip


def digest_difference(a: dict, b: dict, names: tuple[str, str] = ("student", "teacher")) -> str:
    """What differs between two tokenizers known only by their `digest`s: the components, and
    the first block of ids whose tokens differ ("" when the digests agree)."""
    x, y = names
    parts: list[str] = []
    if a.get("kind") != b.get("kind"):
        parts.append(f"the {x}'s is a {a.get('kind')} tokenizer and the {y}'s a {b.get('kind')} tokenizer")
    blocks_a, blocks_b = a.get("token_blocks") or [], b.get("token_blocks") or []
    i = _first_difference(blocks_a, blocks_b)
    if i is not None:
        parts.append(f"the tokens of ids [{i * DIGEST_BLOCK}, {(i + 1) * DIGEST_BLOCK}) differ")
    if a.get("vocab_size") != b.get("vocab_size"):
        parts.append(f"the {x}'s vocabulary has {a.get('vocab_size')} ids and the {y}'s {b.get('vocab_size')}")
    parts += [f"the {_LABELS[n]} differ" for n in _COMPONENTS[1:] if a.get(n) != b.get(n)]
    return "; ".join(parts)


def tokenizer_difference(a: "Tokenizer", b: "Tokenizer", names: tuple[str, str] = ("student", "teacher")) -> str:
    """What differs between two tokenizers ("" when they are the same): `description_difference`."""
    return description_difference(a.describe(), b.describe(), names)


# ---------------------------------------------------------------------------------------------
# Conversations


def check_turns(messages: Sequence[Mapping[str, str]]) -> list[Mapping[str, str]]:
    """The turns as a list, each with a known `role` and a text `content`; ValueError otherwise."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"a conversation is a list of turns {{'role', 'content'}}, got {type(messages).__name__}")
    turns = list(messages)
    if not turns:
        raise ValueError("the conversation has no turns")
    for i, t in enumerate(turns):
        if not isinstance(t, Mapping) or t.get("role") not in ROLES:
            role = t.get("role") if isinstance(t, Mapping) else None
            raise ValueError(f"turn {i} has role {role!r}; a turn's role is one of {list(ROLES)}")
        if not isinstance(t.get("content"), str):
            raise ValueError(f"turn {i} ({t['role']}) has content of type {type(t.get('content')).__name__}; it must be text")
    return turns


def plain_conversation(tokenizer: "Tokenizer", messages: Sequence[Mapping[str, str]], what: str) -> tuple[list[int], list[int]]:
    """A conversation without a chat template: user and assistant turns alternating from a user
    turn; the first user turn is `encode_prompt(text)` (BOS where the tokenizer has one), later
    ones plain text, each assistant turn its text + EOS (the masked part). `what` names the
    tokenizer in errors."""
    turns = check_turns(messages)
    roles = [t["role"] for t in turns]
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if roles != expected:
        raise ValueError(
            f"{what} has no chat template: it renders user and assistant turns, alternating from a user turn, "
            f"as plain text; got {roles}; give the prompt as text, or use a tokenizer with a chat template"
        )
    ids: list[int] = []
    mask: list[int] = []
    for i, t in enumerate(turns):
        if t["role"] == "user":
            piece = tokenizer.encode_prompt(t["content"]) if i == 0 else tokenizer.encode(t["content"])
            ids += piece
            mask += [0] * len(piece)
        else:
            piece = tokenizer.encode(t["content"]) + [tokenizer.eos_id]
            ids += piece
            mask += [1] * len(piece)
    return ids, mask


# ---------------------------------------------------------------------------------------------
# The character tokenizer


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
        """BOS + the text. There is no chat template: chat input is rendered as plain text (user
        and assistant turns alternating, ending with a user turn; see `plain_conversation`)."""
        if isinstance(prompt, str):
            return [self.bos_id, *self.encode(prompt)]
        turns = check_turns(prompt)
        if turns[-1]["role"] != "user":
            raise ValueError(f"a prompt ends with a user turn; got turns {[t['role'] for t in turns]}")
        return plain_conversation(self, turns, "the character tokenizer")[0]

    def encode_conversation(self, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[int]]:
        """BOS + user text + assistant text + EOS (+ ...), the assistant's text and EOS masked."""
        return plain_conversation(self, messages, "the character tokenizer")

    def to_json(self) -> dict:
        return {"type": "char", "alphabet": self.alphabet, "specials": list(self.specials)}

    def describe(self) -> TokenizerDescription:
        roles = (("bos", BOS), ("eos", EOS), ("pad", PAD), ("stop", EOS))
        return TokenizerDescription(
            kind="char",
            tokens=(*self.specials, *self.alphabet),
            special_tokens=tuple((r, t) for r, t in roles if t in self.specials),
        )

    @property
    def fingerprint(self) -> str:
        """sha256 over the id -> token table: equal iff every id means the same token."""
        return self.describe().fingerprint

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path


# ---------------------------------------------------------------------------------------------
# Finding and loading a directory's tokenizer


def _is_char_file(file: Path) -> bool:
    try:
        return json.loads(file.read_text()).get("type") == "char"
    except (OSError, ValueError, AttributeError):
        return False


def tokenizer_home(directory: str | os.PathLike) -> Path | None:
    """Where in `directory` its tokenizer lives: the directory itself (our character
    tokenizer.json, or Hugging Face tokenizer files), else its `hf/` (Hugging Face files, as a
    converted or HF-initialised model directory keeps them); None when it holds none."""
    from megatron_opd.data.hf_tokenizer import is_hf_tokenizer_dir

    directory = Path(directory)
    if (directory / "tokenizer.json").is_file() or is_hf_tokenizer_dir(directory):
        return directory
    if is_hf_tokenizer_dir(directory / "hf"):
        return directory / "hf"
    return None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer a model directory holds (or the `tokenizer.json` file itself), by what is there.

    - `tokenizer.json` of type "char": the `CharTokenizer` written by `write_model_dir`;
    - Hugging Face tokenizer files (`tokenizer_config.json`, or a `tokenizer.json` in the
      `tokenizers` library's format), in the directory or its `hf/`: an `HFTokenizer`
      (transformers, local files only).
    """
    path = Path(path)
    if path.is_file():
        if _is_char_file(path):
            spec = json.loads(path.read_text())
            return CharTokenizer(alphabet=spec["alphabet"], specials=tuple(spec["specials"]))
        path = path.parent
    home = tokenizer_home(path)
    if home is None:
        raise FileNotFoundError(
            f"{path} holds no tokenizer: expected tokenizer.json (the character tokenizer a model "
            f"directory of megatron-opd carries) or Hugging Face tokenizer files (tokenizer.json, "
            f"tokenizer_config.json) in it or in its hf/"
        )
    file = home / "tokenizer.json"
    if file.is_file():
        if _is_char_file(file):
            return load_tokenizer(file)
        spec = json.loads(file.read_text())
        if not (isinstance(spec, dict) and "model" in spec and "type" not in spec):
            kind = spec.get("type") if isinstance(spec, dict) else type(spec).__name__
            raise ValueError(
                f"{file}: unknown tokenizer type {kind!r} (supported: 'char', and Hugging Face "
                f"tokenizer.json files of the tokenizers library)"
            )
    from megatron_opd.data.hf_tokenizer import HFTokenizer

    return HFTokenizer(home)


def run_tokenizer(
    run_dir: str | os.PathLike, init_from: str | os.PathLike = "", tokenizer_dir: str | os.PathLike = ""
) -> Tokenizer:
    """The tokenizer a run trains with: the one its directory already holds (a resumed run keeps
    its own), else `data.tokenizer` (`tokenizer_dir`: a model trained from scratch with a chosen
    tokenizer), else that of the model it starts from (`train.init_from`: a model directory, or
    its `checkpoints/` or one `checkpoints/step_N` in it), else the tiny domains' character
    tokenizer. A `tokenizer_dir` that differs from the run's own or init_from's is refused, naming
    the difference. Torch-free: checked before launch."""
    from megatron_opd.config.typed import ConfigError

    own = load_tokenizer(run_dir) if tokenizer_home(run_dir) is not None else None
    init = None
    if init_from:
        path = Path(init_from)
        if path.name.startswith("step_") and path.parent.name == "checkpoints":
            path = path.parent
        path = path.parent if path.name == "checkpoints" else path
        init = load_tokenizer(path) if tokenizer_home(path) is not None else None
    named = None
    if tokenizer_dir:
        try:
            named = load_tokenizer(tokenizer_dir)
        except (OSError, ValueError) as e:
            raise ConfigError(f"data.tokenizer={tokenizer_dir}: {e}") from None
        for other, whose in ((own, f"the run's own ({run_dir})"), (init, f"train.init_from's ({init_from})")):
            if other is not None and other.fingerprint != named.fingerprint:
                raise ConfigError(
                    f"data.tokenizer={tokenizer_dir} is not {whose} tokenizer: "
                    f"{tokenizer_difference(named, other, ('data.tokenizer', 'other'))}; drop data.tokenizer or point it at that tokenizer"
                )
    return own or named or init or CharTokenizer()
