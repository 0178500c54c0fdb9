"""The rubric task family (GRM, issue 14): prompts no rule on the trainer's side can verify, the
judge template, and the annotation file: everything the trainer may know about the task.

A task prompt carries a letter set (the query) and three opaque rubric codes:

    w:<letters>|<codes>=      e.g. "w:hbkd|352="   -> any short string of letters

Each code names a criterion the answer should meet; what a code means and how much it weighs
are NOT here: they live in the hidden oracle (megatron_opd/grm_oracle/), which only the
annotation maker and the evaluator import. Answers have many acceptable forms and graded
quality; the only supervision is a small annotation file (`load_annotations`): per-criterion
verdicts and an overall score digit for B (query, response) pairs, made once by
`grm_oracle.annotate` with annotator noise.

A judge reads the (query, rubric, response) rendered by the judge template (default
`JUDGE_TEMPLATE`, "j:{query}|{rubric}:{response}>") and writes its verdict: one 0/1 per listed
code, in the order the judge prompt lists them, a comma and a score digit 0..9 (rewards/grm.py
parses it). Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
import string
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from megatron_opd.data.prompts import Demonstration, Prompt
from megatron_opd.data.tokenizer import Tokenizer

TASK_DOMAIN = "rubric"  # the policy's task
JUDGE_DOMAIN = "judge"  # the judge template over the annotations

LETTERS = "abcdefghijklmnop"  # what queries and answers are written in
CODES = "123456"  # the rubric codes (their meanings: the hidden oracle)
SET_SIZE = 4  # letters per query
CODES_PER_PROMPT = 3
MAX_SCORE = 9  # the score digit's range is 0..MAX_SCORE
MAX_RESPONSE_LEN = 6  # what the policy's rollout.max_new_tokens should allow (plus EOS)

TASK_TEMPLATE = "w:{query}|{rubric}="
JUDGE_TEMPLATE = "j:{query}|{rubric}:{response}>"
TEMPLATE_FIELDS = ("query", "rubric", "response")


def _rng(*parts) -> random.Random:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def task_prompt_text(query: str, rubric: str) -> str:
    return TASK_TEMPLATE.format(query=query, rubric=rubric)


def random_task(rng: random.Random) -> tuple[str, str]:
    """(query, rubric): SET_SIZE distinct letters in random order, CODES_PER_PROMPT distinct codes."""
    return "".join(rng.sample(LETTERS, SET_SIZE)), "".join(rng.sample(CODES, CODES_PER_PROMPT))


def task_prompt(query: str, rubric: str, sample_id: str) -> Prompt:
    return Prompt(task_prompt_text(query, rubric), TASK_DOMAIN, sample_id, metadata={"query": query, "rubric": rubric})


def random_response(rng: random.Random, query: str) -> str:
    """A response of the start policy's demonstrations: 1..MAX_RESPONSE_LEN letters, mostly from
    the query's set. Chosen without knowing the rubric's meaning, so its quality is spread out."""
    n = rng.randint(1, MAX_RESPONSE_LEN)
    return "".join(rng.choice(query) if rng.random() < 0.75 else rng.choice(LETTERS) for _ in range(n))


class RubricTasks:
    """The `PromptSource` of the rubric task (domain "rubric"): deterministic by index, held-out
    prompts from their own stream and never trained on. Its reward is a judge's ("grm"): no rule
    verifies it from here."""

    domains = [TASK_DOMAIN]

    def __init__(self, seed: int, eval_size: int):
        self.seed, self.eval_size = seed, eval_size
        rng = _rng("rubric-eval", seed)
        seen: dict[tuple[str, str], None] = {}
        for _ in range(50 * max(eval_size, 1)):
            if len(seen) == eval_size:
                break
            seen.setdefault(random_task(rng))
        self._held_out = [task_prompt(q, r, f"{TASK_DOMAIN}/eval{i}") for i, (q, r) in enumerate(seen)]
        self._held_out_keys = set(seen)

    def prompt(self, index: int) -> Prompt:
        rng = _rng("rubric-train", self.seed, index)
        for _ in range(1000):
            task = random_task(rng)
            if task not in self._held_out_keys:
                return task_prompt(*task, f"{TASK_DOMAIN}/{index}")
        raise RuntimeError("the rubric task has no training prompts left outside its eval set")

    def prompts(self, start: int, count: int) -> list[Prompt]:
        return [self.prompt(i) for i in range(start, start + count)]

    def eval_prompts(self, domain: str) -> list[Prompt]:
        if domain != TASK_DOMAIN:
            raise ValueError(f"the rubric task has no domain {domain!r}; its domain is {TASK_DOMAIN!r}")
        return self._held_out

    def reward_name(self, domain: str) -> str:
        return "grm"

    def demonstration(self, prompt: Prompt) -> str:
        """The start policy's SFT target for `prompt` (random_response, seeded by the sample id)."""
        return random_response(_rng("rubric-demo", self.seed, prompt.sample_id), prompt.metadata["query"])


# -- the judge template ---------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeTemplate:
    """How a (query, rubric, response) becomes the judge's prompt text. The rubric's codes may be
    listed in any order (voting shuffles them); the verdict follows the order listed."""

    text: str = JUDGE_TEMPLATE

    def render(self, query: str, rubric: str, response: str) -> str:
        return self.text.format(query=query, rubric=rubric, response=response)

    def check(self, tokenizer: Tokenizer, *, key: str = "grm.judge_template") -> None:
        """Refuse a template without each field once, or one the tokenizer cannot encode (naming
        the key and the character), before any step."""
        names = [f for _, f, _, _ in string.Formatter().parse(self.text) if f is not None]
        for f in TEMPLATE_FIELDS:
            if names.count(f) != 1:
                raise ValueError(f"{key}={self.text!r} must contain {{{f}}} exactly once (fields: {TEMPLATE_FIELDS})")
        unknown = sorted(set(names) - set(TEMPLATE_FIELDS))
        if unknown:
            raise ValueError(f"{key}={self.text!r} has unknown fields {unknown}; known: {TEMPLATE_FIELDS}")
        example = self.render(LETTERS[:SET_SIZE], CODES[:CODES_PER_PROMPT], LETTERS[:MAX_RESPONSE_LEN])
        try:
            tokenizer.encode(example + verdict_text([1] * CODES_PER_PROMPT, MAX_SCORE))
        except ValueError as e:
            raise ValueError(f"{key}={self.text!r}: the tokenizer cannot encode the judge prompt: {e}") from None


def verdict_text(verdicts: Sequence[int], score: int) -> str:
    """What a judge writes: "101,6" (one 0/1 per listed code, a comma, the score digit)."""
    return "".join(str(int(v)) for v in verdicts) + f",{int(score)}"


# -- annotations ----------------------------------------------------------------------------------

ANNOTATION_FIELDS = ("id", "query", "rubric", "response", "verdicts", "score")


@dataclass(frozen=True)
class Annotation:
    """One labelled example: per-criterion verdicts in the rubric's order and the overall score."""

    id: str
    query: str
    rubric: str
    response: str
    verdicts: tuple[int, ...]
    score: int

    def to_json(self) -> dict:
        return {"id": self.id, "query": self.query, "rubric": self.rubric, "response": self.response,
                "verdicts": list(self.verdicts), "score": self.score}  # fmt: skip


@dataclass(frozen=True)
class AnnotationSet:
    path: str
    sha256: str
    items: tuple[Annotation, ...] = field(repr=False)

    def __len__(self) -> int:
        return len(self.items)


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_annotations(path: str | Path, items: Sequence[Annotation]) -> str:
    """Write the annotation file (JSON lines), once: an existing file is never overwritten (the
    run's summary records its sha256). Returns the sha256."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"annotation file {path} exists; annotations are made once (delete it to remake them)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(a.to_json(), sort_keys=True) + "\n" for a in items))
    tmp.replace(path)
    return file_sha256(path)


def load_annotations(path: str | Path, *, min_size: int = 1, key: str = "grm.annotations") -> AnnotationSet:
    """The annotation file, every line checked: a missing or malformed field is an error naming the
    file, the line and the field; fewer than `min_size` examples (B = 0 included) is refused."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{key}: annotation file {path} does not exist; make it with the grm run's annotate phase")
    raw = path.read_bytes()
    items: list[Annotation] = []
    ids: set[str] = set()
    for n, line in enumerate(raw.decode().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: an annotation is a JSON object with fields {ANNOTATION_FIELDS}")
        missing = [f for f in ANNOTATION_FIELDS if f not in row]
        if missing:
            raise ValueError(f"{where}: annotation has no {missing[0]!r} field (fields needed: {ANNOTATION_FIELDS})")
        items.append(_annotation(row, where))
        if items[-1].id in ids:
            raise ValueError(f"{where}: annotation id {items[-1].id!r} appears twice")
        ids.add(items[-1].id)
    if len(items) < min_size:
        raise ValueError(f"{key}: {path} holds {len(items)} annotations; at least {min_size} are needed (B >= {min_size})")
    return AnnotationSet(str(path), hashlib.sha256(raw).hexdigest(), tuple(items))


def _annotation(row: dict, where: str) -> Annotation:
    for f in ("id", "query", "rubric", "response"):
        if not isinstance(row[f], str):
            raise ValueError(f"{where}: field {f!r} is a {type(row[f]).__name__}, expected a string")
    rubric, verdicts, score = row["rubric"], row["verdicts"], row["score"]
    if not rubric or any(c not in CODES for c in rubric) or len(set(rubric)) != len(rubric):
        raise ValueError(f"{where}: field 'rubric' {rubric!r} must be distinct codes from {CODES!r}")
    if not isinstance(verdicts, list) or len(verdicts) != len(rubric) or any(v not in (0, 1) or isinstance(v, bool) for v in verdicts):
        raise ValueError(f"{where}: field 'verdicts' {verdicts!r} must be one 0 or 1 per rubric code ({len(rubric)})")
    if not isinstance(score, int) or isinstance(score, bool) or not 0 <= score <= MAX_SCORE:
        raise ValueError(f"{where}: field 'score' {score!r} must be an integer in 0..{MAX_SCORE}")
    return Annotation(row["id"], row["query"], rubric, row["response"], tuple(verdicts), score)


@dataclass(frozen=True)
class Baselines:
    """What a constant verdict scores on the annotation set (the judge-RL reward subtracts it:
    rewards/grm.py)."""

    criterion: dict[str, float]  # code -> max(p, 1 - p)
    score_distance: float  # d0 = mean |y - median(y)|
    majority: dict[str, int]  # code -> its majority label (the best constant verdict)
    median_score: float

    def to_json(self) -> dict:
        return {"criterion": self.criterion, "score_distance": self.score_distance,
                "majority": self.majority, "median_score": self.median_score}  # fmt: skip

    @staticmethod
    def from_json(d: dict) -> "Baselines":
        return Baselines(dict(d["criterion"]), float(d["score_distance"]), dict(d["majority"]), float(d["median_score"]))


def annotation_baselines(items: Sequence[Annotation]) -> Baselines:
    ones: dict[str, list[int]] = {}
    for a in items:
        for code, v in zip(a.rubric, a.verdicts):
            ones.setdefault(code, []).append(v)
    rate = {c: sum(v) / len(v) for c, v in ones.items()}
    scores = [a.score for a in items]
    median = statistics.median(scores)
    return Baselines(
        criterion={c: max(p, 1 - p) for c, p in rate.items()},
        score_distance=sum(abs(s - median) for s in scores) / len(scores),
        majority={c: int(p >= 0.5) for c, p in rate.items()},
        median_score=median,
    )


def judge_prompt(a: Annotation, template: JudgeTemplate, *, baseline: dict | None = None,
                 sample_id: str | None = None) -> Prompt:  # fmt: skip
    """The judge-template prompt of an annotation, its label in the metadata (what the judge-RL
    reward compares with and what the cold start trains on) with the annotation set's constant-
    verdict `baseline` (rewards/grm.py Baselines.to_json) when given."""
    metadata = {"query": a.query, "rubric": a.rubric, "response": a.response, "verdicts": list(a.verdicts),
                "score": a.score, "target": verdict_text(a.verdicts, a.score)}  # fmt: skip
    if baseline is not None:
        metadata["baseline"] = baseline
    return Prompt(template.render(a.query, a.rubric, a.response), JUDGE_DOMAIN,
                  sample_id or f"{JUDGE_DOMAIN}/{a.id}", metadata=metadata)  # fmt: skip


class GRMSource:
    """The GRM's `PromptSource`: the rubric task ("rubric") and the judge template over the
    annotation file ("judge"), round-robin by global index in the order of `domains`. Judge
    prompts walk the annotations in a seeded order per epoch, each listing its rubric codes in a
    seeded order (labels permuted alike); each carries its label and the
    set's constant-verdict baseline. The judge's held-out prompts are the annotations themselves
    (its fit; its accuracy on fresh samples is the evaluator's, against the oracle)."""

    def __init__(self, domains: Sequence[str], *, seed: int, eval_size: int, annotations: AnnotationSet | None,
                 template: JudgeTemplate, baseline: dict | None = None):  # fmt: skip
        unknown = [d for d in domains if d not in (TASK_DOMAIN, JUDGE_DOMAIN)]
        if unknown or not domains:
            raise ValueError(f"data.domains={list(domains)}: the GRM's domains are {TASK_DOMAIN!r} and {JUDGE_DOMAIN!r}")
        if JUDGE_DOMAIN in domains and annotations is None:
            raise ValueError("data.domains lists 'judge' but data.annotations names no annotation file")
        self.domains = list(domains)
        self.seed, self.template, self.annotations, self.baseline = seed, template, annotations, baseline
        self.tasks = RubricTasks(seed, eval_size)

    def prompt(self, index: int) -> Prompt:
        n = len(self.domains)
        domain, j = self.domains[index % n], index // n
        if domain == TASK_DOMAIN:
            p = self.tasks.prompt(index)
            return Prompt(p.text, p.domain, p.sample_id, metadata={**p.metadata, "target": self.tasks.demonstration(p)})
        items = self.annotations.items
        epoch, pos = divmod(j, len(items))
        order = list(range(len(items)))
        random.Random(f"judge-order/{self.seed}/{epoch}").shuffle(order)
        # The rubric listed in a seeded order per prompt (labels permuted with it): the judge
        # learns to follow the listed order, as the shuffled votes ask of it (rewards/grm.py).
        a = items[order[pos]]
        codes = list(range(len(a.rubric)))
        random.Random(f"judge-codes/{self.seed}/{index}").shuffle(codes)
        a = replace(a, rubric="".join(a.rubric[c] for c in codes), verdicts=tuple(a.verdicts[c] for c in codes))
        return judge_prompt(a, self.template, baseline=self.baseline, sample_id=f"{JUDGE_DOMAIN}/{index}")

    def prompts(self, start: int, count: int) -> list[Prompt]:
        return [self.prompt(i) for i in range(start, start + count)]

    def eval_prompts(self, domain: str) -> list[Prompt]:
        if domain == TASK_DOMAIN:
            return self.tasks.eval_prompts(domain)
        if domain == JUDGE_DOMAIN and self.annotations is not None:
            return [judge_prompt(a, self.template, baseline=self.baseline, sample_id=f"{JUDGE_DOMAIN}/eval/{a.id}")
                    for a in self.annotations.items]  # fmt: skip
        raise ValueError(f"the GRM source has no domain {domain!r}; its domains are {self.domains}")

    def reward_name(self, domain: str) -> str:
        return "grm" if domain == TASK_DOMAIN else "judge_agreement"

    def demonstrations(self, start: int, count: int) -> list[Demonstration]:
        """The cold start's SFT data: each prompt answered by its `target` (a random answer of the
        rubric task; an annotation's verdict)."""
        return [Demonstration(p, ({"role": "user", "content": p.text}, {"role": "assistant", "content": p.metadata["target"]}))
                for p in self.prompts(start, count)]  # fmt: skip
