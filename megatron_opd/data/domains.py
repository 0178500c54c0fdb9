"""Tiny verifiable domains and the prompt source that feeds every stage.

A domain is a prompt generator plus a rule that solves its prompts; the verifier is exact match
against that rule. They are small enough that a 2-layer model masters one in a minute on a CPU,
and different enough that one student must learn all of them from separate teachers:

    add      "37+45="   -> "82"      two-digit addition
    reverse  "r:hjqa="  -> "aqjh"    reverse 3-5 letters
    sort     "s:5193="  -> "1359"    sort 3-5 digits
    count    "n:abca="  -> "4"       count 2-9 letters

Prompts are short on purpose: with BOS and EOS every sequence fits in 16 tokens.

`PromptSource` maps a global sample index to a prompt deterministically, so a data cursor is one
integer, a resumed run sees exactly the samples an uninterrupted run would, and every sample has
a stable id. Held-out evaluation prompts are drawn from a separate stream and never trained on.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_opd.data.tokenizer import CharTokenizer
from megatron_opd.data.trajectories import Trajectories


@dataclass(frozen=True)
class Domain:
    name: str
    sample_prompt: Callable[[random.Random], str]
    solve: Callable[[str], str]

    def verify(self, prompt: str, response: str) -> bool:
        return response == self.solve(prompt)


def _add_prompt(rng: random.Random) -> str:
    return f"{rng.randint(10, 99)}+{rng.randint(10, 99)}="


def _add_solve(prompt: str) -> str:
    a, b = prompt[:-1].split("+")
    return str(int(a) + int(b))


def _letters(rng: random.Random, alphabet: str) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 5)))


def _body(prompt: str, tag: str) -> str:
    return prompt[len(tag) : -1]


def _reverse_prompt(rng: random.Random) -> str:
    return f"r:{_letters(rng, 'abcdefghijklmnopqrstuvwxyz')}="


def _sort_prompt(rng: random.Random) -> str:
    return f"s:{_letters(rng, '0123456789')}="


def _count_prompt(rng: random.Random) -> str:
    # Lengths start at 2: held-out prompts are distinct, and a domain with few short prompts would
    # otherwise lose all of them to the evaluation set and never train on them.
    return f"n:{''.join(rng.choice('abcdefgh') for _ in range(rng.randint(2, 9)))}="


DOMAINS: dict[str, Domain] = {
    "add": Domain("add", _add_prompt, _add_solve),
    "reverse": Domain("reverse", _reverse_prompt, lambda p: _body(p, "r:")[::-1]),
    "sort": Domain("sort", _sort_prompt, lambda p: "".join(sorted(_body(p, "s:")))),
    "count": Domain("count", _count_prompt, lambda p: str(len(_body(p, "n:")))),
}


def get_domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; known domains: {sorted(DOMAINS)}")
    return DOMAINS[name]


def _rng(*parts) -> random.Random:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


@dataclass(frozen=True)
class Prompt:
    text: str
    domain: str
    sample_id: str


class PromptSource:
    """Deterministic, resumable stream of prompts over several domains (round-robin by index)."""

    def __init__(self, domains: list[str], seed: int, eval_size: int):
        if not domains:
            raise ValueError("data.domains is empty; name at least one of " + str(sorted(DOMAINS)))
        self.domains = [get_domain(d) for d in domains]
        self.seed = seed
        self.eval_size = eval_size
        self._held_out = {d.name: self._eval_prompts(d) for d in self.domains}
        self._held_out_text = {d: {p.text for p in ps} for d, ps in self._held_out.items()}

    def _eval_prompts(self, domain: Domain) -> list[Prompt]:
        rng = _rng("eval", self.seed, domain.name)
        seen: dict[str, None] = {}
        for _ in range(50 * self.eval_size):
            if len(seen) == self.eval_size:
                break
            seen.setdefault(domain.sample_prompt(rng))
        return [Prompt(t, domain.name, f"{domain.name}/eval{i}") for i, t in enumerate(seen)]

    def eval_prompts(self, domain: str) -> list[Prompt]:
        return self._held_out[domain]

    def prompt(self, index: int) -> Prompt:
        """The training prompt at global position `index` (never a held-out prompt)."""
        domain = self.domains[index % len(self.domains)]
        rng = _rng("train", self.seed, index)
        for _ in range(1000):
            text = domain.sample_prompt(rng)
            if text not in self._held_out_text[domain.name]:
                return Prompt(text, domain.name, f"{domain.name}/{index}")
        raise RuntimeError(f"domain {domain.name} has no training prompts left outside its eval set")

    def prompts(self, start: int, count: int) -> list[Prompt]:
        return [self.prompt(i) for i in range(start, start + count)]


def encode_prompts(prompts: list[Prompt], tokenizer: CharTokenizer) -> list[list[int]]:
    return [[tokenizer.bos_id, *tokenizer.encode(p.text)] for p in prompts]


def pack(
    rows: list[list[int]], prompt_lens: list[int], prompts: list[Prompt], tokenizer: CharTokenizer, max_len: int
) -> Trajectories:
    """Right-pad token rows into a `Trajectories` batch, as wide as its longest row rounded up to 8
    (sequence parallelism needs the length divisible by TP)."""
    longest = max(len(r) for r in rows)
    if longest > max_len:
        raise ValueError(f"a sequence of {longest} tokens does not fit model.max_seq_len={max_len}")
    width = min(max_len, -(-longest // 8) * 8)
    tokens = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return Trajectories(
        tokens=tokens,
        lengths=torch.tensor([len(r) for r in rows], dtype=torch.long),
        prompt_lens=torch.tensor(prompt_lens, dtype=torch.long),
        domain=[p.domain for p in prompts],
        sample_ids=[p.sample_id for p in prompts],
    )


def demonstrations(prompts: list[Prompt], tokenizer: CharTokenizer, max_len: int) -> Trajectories:
    """Prompts with their correct answers and EOS as responses: the SFT batch."""
    encoded = encode_prompts(prompts, tokenizer)
    rows = [
        e + tokenizer.encode(get_domain(p.domain).solve(p.text)) + [tokenizer.eos_id]
        for e, p in zip(encoded, prompts)
    ]
    return pack(rows, [len(e) for e in encoded], prompts, tokenizer, max_len)
