"""Hugging Face artefacts made locally (no hub is reachable): a byte-level BPE tokenizer trained
with `tokenizers` on local text, saved with a Qwen2-style ChatML template into a directory that
transformers loads, variants of it with one thing changed, and prompt/SFT dataset files.

    tok_dir = make_bpe_tokenizer(tmp_path / "tok")        # tokenizer.json, tokenizer_config.json,
                                                           # generation_config.json
    HFTokenizer(tok_dir)  /  AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    write_jsonl(path, rows); write_parquet(path, rows)
    chat_rows(n), math_rows(n)                             # rows with messages / prompt + answer

Reusable by any test (tests/test_hf_data.py; the end-to-end HF test builds a tiny Qwen2 model
with `vocab_size = HFTokenizer(tok_dir).vocab_size` on top of it).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

# Qwen2-Instruct's chat template (tokenizer_config.json of Qwen/Qwen2-7B-Instruct): ChatML with
# a default system turn.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

_WORDS = (
    "the a one two three four five six seven eight nine ten plus minus times equals what is answer "
    "number sum of and sort reverse count letters digits please give only final result you are "
    "helpful assistant question think step compute add numbers list order small large hello world "
    "model train data token chat user system reply short brief correct wrong yes no"
).split()


def corpus(lines: int = 400, seed: int = 0) -> list[str]:
    """Local training text: sentences of common words, arithmetic and a few chat-like lines."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        kind = i % 3
        if kind == 0:
            out.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))).capitalize() + ".")
        elif kind == 1:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            out.append(f"What is {a} plus {b}? The answer is {a + b}.")
        else:
            out.append(f"Sort {' '.join(str(rng.randint(0, 9)) for _ in range(5))} in order, please!")
    return out


def make_bpe_tokenizer(
    directory: str | Path,
    *,
    vocab_size: int = 360,
    chat_template: str | None = QWEN2_CHAT_TEMPLATE,
    text: Sequence[str] | None = None,
    generation_config: bool = True,
    pad_token: str | None = "<|endoftext|>",
) -> Path:
    """Train a byte-level BPE (Qwen2/GPT-2 style: NFC, byte-level pre-tokenizer and decoder) on
    local text and save it as Hugging Face tokenizer files: tokenizer.json (tokenizers),
    tokenizer_config.json (Qwen2's special tokens: eos <|im_end|>, pad <|endoftext|>, no BOS, the
    chat template) and generation_config.json (eos ids <|im_end|>, <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(list(text or corpus()), trainer)
    tok.save(str(directory / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": pad_token,
        "unk_token": None,
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": True}
            for t in SPECIAL_TOKENS
        },
    }  # fmt: skip
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    if generation_config:
        ids = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}, indent=2))
    return directory


def copy_tokenizer(src: str | Path, dst: str | Path) -> Path:
    dst = Path(dst)
    shutil.copytree(src, dst)
    return dst


def swap_merges(directory: str | Path, index: int) -> tuple[Any, Any]:
    """Swap merges `index` and `index + 1` of tokenizer.json (one changed merge rank); returns them."""
    path = Path(directory) / "tokenizer.json"
    spec = json.loads(path.read_text())
    merges = spec["model"]["merges"]
    merges[index], merges[index + 1] = merges[index + 1], merges[index]
    path.write_text(json.dumps(spec))
    return merges[index], merges[index + 1]


def add_special_token(directory: str | Path, content: str) -> int:
    """Add one special token to the tokenizer (tokenizer.json); returns its id."""
    from tokenizers import AddedToken, Tokenizer

    path = Path(directory) / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
    tok.save(str(path))
    return tok.token_to_id(content)


def set_chat_template(directory: str | Path, template: str) -> None:
    path = Path(directory) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = template
    path.write_text(json.dumps(config, indent=2))


# -- dataset files ------------------------------------------------------------------------------


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> Path:
    """One JSON value per line (rows given as str are written as they are: bad rows for tests)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def write_parquet(path: str | Path, rows: Sequence[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(list(rows)), path)
    return path


def math_rows(n: int, seed: int = 0) -> list[dict]:
    """Prompt rows with a reference answer (the `math`/`exact` verifiers' field)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        rows.append({"prompt": f"What is {a} plus {b}? (#{i})", "answer": str(a + b)})
    return rows


def chat_rows(n: int, seed: int = 1, *, system_every: int = 3, turns: int = 2) -> list[dict]:
    """SFT rows: `messages` with an optional system turn, 1..`turns` user/assistant exchanges."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": "Be brief."}] if i % system_every == 0 else []
        for t in range(1 + i % turns):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            messages.append({"role": "user", "content": f"What is {a} plus {b}?"})
            messages.append({"role": "assistant", "content": f"The answer is {a + b}."})
        rows.append({"messages": messages, "answer": messages[-1]["content"]})
    return rows


def swap_tokens(directory: str | Path, a: int, b: int) -> tuple[str, str]:
    """Swap the ids of vocabulary entries `a` and `b` in tokenizer.json (same size, two ids that mean
    other tokens); returns the tokens now at ids a and b."""
    path = Path(directory) / "tokenizer.json"
    spec = json.loads(path.read_text())
    vocab = spec["model"]["vocab"]
    ta = next(t for t, i in vocab.items() if i == a)
    tb = next(t for t, i in vocab.items() if i == b)
    vocab[ta], vocab[tb] = b, a
    path.write_text(json.dumps(spec))
    return tb, ta
