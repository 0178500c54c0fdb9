"""Tiny verifiable domains: prompt generators, the rules that solve them, and their `PromptSource`.

A domain is a prompt generator plus a rule that solves its prompts; its verifier (rewards/tiny.py)
is exact match against that rule. They are small enough that a 2-layer model learns one in a few
hundred steps on a CPU, and different enough that one student must learn all of them from separate
teachers:

    name     prompt        answer    rule                                   distinct prompts
    add      "37+45="   -> "82"      two-digit addition                       8,100
    sub      "82-45="   -> "37"      two-digit subtraction, minuend >= subtrahend   4,095
    reverse  "r:hjqa="  -> "aqjh"    reverse 3-5 letters                      12.3 M
    sort     "s:5193="  -> "1359"    sort 3-5 digits ascending                111,000
    dsort    "d:5193="  -> "9531"    sort 3-5 digits descending (twin of sort)  111,000
    count    "n:abca="  -> "4"       count 2-9 letters of a-h                 153 M
    rot1     "c:hjqa="  -> "ikrb"    shift 3-5 letters by 1 (z -> a)          12.3 M
    rot3     "k:hjqa="  -> "kmtd"    shift 3-5 letters by 3 (twin of rot1)    12.3 M
    max      "m:51937=" -> "9"       largest of 3-9 digits                    1.1 G
    min      "i:51937=" -> "1"       smallest of 3-9 digits (twin of max)     1.1 G

Conflicting twins (`TWINS`): the same body under another one-letter tag, with another answer
(sort/dsort, rot1/rot3, max/min; add/sub differ only by the operator). A model that ignores the
tag solves at most one of a pair: one set of weights must condition on it, which is what makes
merging experts (or mixed training) interfere.

Prompts are short on purpose: with BOS and EOS every sequence fits in `MAX_SEQUENCE_TOKENS` (16,
the default job's model.max_seq_len) and every answer in 5 tokens plus EOS. Every character is in
the character tokenizer's alphabet (data/tokenizer.py). Each domain's prompt space is far larger
than a held-out set of a few hundred (count's shortest lengths are its smallest: 64 prompts of 2
letters).

`TinyDomains` is their `PromptSource` (data/prompts.py): a global sample index maps to a prompt
deterministically (round-robin over the domains), held-out prompts come from a separate stream
and never appear in training, and each domain is verified by the reward of its own name; its demonstrations (SFT) are
each prompt as a user turn answered by the domain's rule.
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
    tag: str = ""  # the prefix that names the rule ("s:"); a twin has the same body under another tag


def _add_prompt(rng: random.Random) -> str:
    return f"{rng.randint(10, 99)}+{rng.randint(10, 99)}="


def _add_solve(prompt: str) -> str:
    a, b = prompt[:-1].split("+")
    return str(int(a) + int(b))


def _sub_prompt(rng: random.Random) -> str:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{max(a, b)}-{min(a, b)}="  # answers stay non-negative: no sign to learn


def _sub_solve(prompt: str) -> str:
    a, b = prompt[:-1].split("-")
    return str(int(a) - int(b))


def _tagged(tag: str, alphabet: str, lengths: tuple[int, int]) -> Callable[[random.Random], str]:
    """A generator of `tag` + a random string of `alphabet` with a length in `lengths` + "="."""

    def sample(rng: random.Random) -> str:
        return f"{tag}{''.join(rng.choice(alphabet) for _ in range(rng.randint(*lengths)))}="

    return sample


def body(prompt: str, tag: str) -> str:
    """What a tagged prompt asks about: the text between the tag and the final "="."""
    return prompt[len(tag) : -1]


def _tagged_domain(name: str, tag: str, alphabet: str, lengths: tuple[int, int], rule: Callable[[str], str]) -> Domain:
    return Domain(name, _tagged(tag, alphabet, lengths), lambda p: rule(body(p, tag)), tag)


def _shift(text: str, k: int) -> str:
    return "".join(chr((ord(c) - ord("a") + k) % 26 + ord("a")) for c in text)


_DIGITS, _LETTERS = "0123456789", "abcdefghijklmnopqrstuvwxyz"

DOMAINS: dict[str, Domain] = {
    "add": Domain("add", _add_prompt, _add_solve),
    "reverse": _tagged_domain("reverse", "r:", _LETTERS, (3, 5), lambda b: b[::-1]),
    "sort": _tagged_domain("sort", "s:", _DIGITS, (3, 5), lambda b: "".join(sorted(b))),
    # Lengths start at 2: held-out prompts are distinct, and a domain with few short prompts would
    # otherwise lose all of them to the evaluation set and never train on them.
    "count": _tagged_domain("count", "n:", "abcdefgh", (2, 9), lambda b: str(len(b))),
    "sub": Domain("sub", _sub_prompt, _sub_solve),
    "dsort": _tagged_domain("dsort", "d:", _DIGITS, (3, 5), lambda b: "".join(sorted(b, reverse=True))),
    "rot1": _tagged_domain("rot1", "c:", _LETTERS, (3, 5), lambda b: _shift(b, 1)),
    "rot3": _tagged_domain("rot3", "k:", _LETTERS, (3, 5), lambda b: _shift(b, 3)),
    "max": _tagged_domain("max", "m:", _DIGITS, (3, 9), max),
    "min": _tagged_domain("min", "i:", _DIGITS, (3, 9), min),
}

# Conflicting pairs: the same bodies, drawn the same way, under another tag with another rule.
TWINS: tuple[tuple[str, str], ...] = (("sort", "dsort"), ("rot1", "rot3"), ("max", "min"))

MAX_SEQUENCE_TOKENS = 16  # BOS + prompt + answer + EOS, for every prompt of every domain


def twin_prompt(prompt: str, domain: str, twin: str) -> str:
    """`prompt` of `domain` with the tag of `twin`: the same question under the other rule."""
    a, b = get_domain(domain), get_domain(twin)
    if not (a.tag and b.tag and prompt.startswith(a.tag)):
        raise ValueError(f"{prompt!r} of {domain!r} has no twin in {twin!r}: both must be tagged domains")
    return b.tag + prompt[len(a.tag) :]


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
