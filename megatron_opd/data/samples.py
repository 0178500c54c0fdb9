"""Recorded responses as training data: a JSONL of samples, and the `PromptSource` that serves them.

The recipe's mixed SFT (sequence-level distillation, off-policy) trains on what each expert
answered, not on the rule's answer: launchers/recipe.py has every expert decode greedily the
training prompts of its own domains (stages/evaluation.py `greedy_samples`), `write_samples`
keeps them one line each,

    {"index": 17, "domain": "sort", "prompt": "s:5193=", "response": "1359"}

and `RecordedResponses` wraps the prompt source they came from: training prompt `index` is that
source's prompt with the recorded response in `metadata["response"]`, and its demonstration
(what SFT trains on, stages/sft.py) is that prompt as the user turn answered by the recorded
response. A recorded prompt that is not the source's prompt at its
index (another data.seed or domain list), or an index beyond the file, is an error: nothing is
silently replaced by the rule's answer. Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Mapping

from megatron_opd.data.prompts import Demonstration, Prompt, PromptSource


def write_samples(path: str | Path, samples: Iterable[Mapping]) -> int:
    """Write `samples` (index, domain, prompt, response) as JSONL, atomically; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w") as f:
        for s in samples:
            f.write(json.dumps({k: s[k] for k in ("index", "domain", "prompt", "response")}) + "\n")
            n += 1
    tmp.replace(path)
    return n


def read_samples(path: str | Path) -> dict[int, dict]:
    """{index: sample} from a samples file; a repeated index or a line without a key is an error."""
    out: dict[int, dict] = {}
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        s = json.loads(line)
        missing = [k for k in ("index", "domain", "prompt", "response") if k not in s]
        if missing:
            raise ValueError(f"{path}:{lineno}: sample without {missing}")
        if s["index"] in out:
            raise ValueError(f"{path}:{lineno}: index {s['index']} appears twice")
        out[int(s["index"])] = s
    return out


class RecordedResponses:
    """A `PromptSource` whose training prompts carry recorded responses (module docstring)."""

    def __init__(self, source: PromptSource, path: str | Path):
        self.source, self.path = source, Path(path)
        self.domains = source.domains
        self.samples = read_samples(self.path)

    def prompt(self, index: int) -> Prompt:
        p = self.source.prompt(index)
        s = self.samples.get(index)
        if s is None:
            raise ValueError(
                f"data.samples={self.path} holds {len(self.samples)} samples and none at index {index}: "
                f"train.steps x train.global_batch_size reads past it; record more samples or train fewer steps"
            )
        if s["prompt"] != p.text or s["domain"] != p.domain:
            raise ValueError(
                f"data.samples={self.path}: sample {index} is {s['domain']} {s['prompt']!r} but the prompt source "
                f"has {p.domain} {p.text!r} there; the samples were recorded for another data section"
            )
        return replace(p, metadata={**p.metadata, "response": s["response"]})

    def prompts(self, start: int, count: int) -> list[Prompt]:
        return [self.prompt(i) for i in range(start, start + count)]

    def demonstrations(self, start: int, count: int) -> list[Demonstration]:
        """The prompts of [start, start + count), each answered by its recorded response."""
        return [
            Demonstration(p, ({"role": "user", "content": p.text}, {"role": "assistant", "content": p.metadata["response"]}))
            for p in self.prompts(start, count)
        ]

    def eval_prompts(self, domain: str) -> list[Prompt]:
        return self.source.eval_prompts(domain)

    def reward_name(self, domain: str) -> str:
        return self.source.reward_name(domain)
