"""Tiny verifiable domains: prompt generators, the rules that solve them, and their `PromptSource`.

A domain is a prompt generator plus a rule that solves its prompts; its verifier (rewards/tiny.py)
is exact match against that rule. They are small enough that a 2-layer model masters one in a minute on a CPU,
and different enough that one student must learn all of them from separate teachers:

    add      "37+45="   -> "82"      two-digit addition
    reverse  "r:hjqa="  -> "aqjh"    reverse 3-5 letters
    sort     "s:5193="  -> "1359"    sort 3-5 digits
    count    "n:abca="  -> "4"       count 2-9 letters

Prompts are short on purpose: with BOS and EOS every sequence fits in 16 tokens.

`TinyDomains` is their `PromptSource` (data/prompts.py): a global sample index maps to a prompt
deterministically (round-robin over the domains), held-out prompts come from a separate stream,
and each domain is verified by the reward of its own name. Its demonstrations (SFT) are each
prompt as a user turn answered by the domain's rule.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable

from megatron_opd.data.prompts import Demonstration, Prompt


@dataclass(frozen=True)
class Domain:
    name: str
    sample_prompt: Callable[[random.Random], str]
    solve: Callable[[str], str]  # the correct response (demonstrations; the verifier compares with it)


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


class TinyDomains:
    """The `PromptSource` of the tiny domains: deterministic, resumable, round-robin by index."""

    def __init__(self, domains: list[str], seed: int, eval_size: int):
        if not domains:
            raise ValueError("data.domains is empty; name at least one of " + str(sorted(DOMAINS)))
        self.specs = [get_domain(d) for d in domains]
        self.domains = [d.name for d in self.specs]
        self.seed = seed
        self.eval_size = eval_size
        self._held_out = {d.name: self._eval_prompts(d) for d in self.specs}
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
        domain = self.specs[index % len(self.specs)]
        rng = _rng("train", self.seed, index)
        for _ in range(1000):
            text = domain.sample_prompt(rng)
            if text not in self._held_out_text[domain.name]:
                return Prompt(text, domain.name, f"{domain.name}/{index}")
        raise RuntimeError(f"domain {domain.name} has no training prompts left outside its eval set")

    def prompts(self, start: int, count: int) -> list[Prompt]:
        return [self.prompt(i) for i in range(start, start + count)]

    def reward_name(self, domain: str) -> str:
        return domain  # rewards/tiny.py registers each domain's rule verifier under its name

    def demonstrations(self, start: int, count: int) -> list[Demonstration]:
        """The prompts of [start, start + count), each answered by its domain's rule: SFT's data."""
        return [
            Demonstration(p, ({"role": "user", "content": p.text}, {"role": "assistant", "content": get_domain(p.domain).solve(p.text)}))
            for p in self.prompts(start, count)
        ]
