"""`Trajectories` and `TeacherSignals`: the one batch type every stage reads and writes.

Alignment convention (used everywhere): row i holds `tokens[i, :lengths[i]]`, of which the first
`prompt_lens[i]` are the prompt and the rest the response. The model's output at position t
predicts token t + 1, so response token j (0-based) of row i is predicted at position
`prompt_lens[i] - 1 + j`. Per-response-token quantities (teacher signals, advantages) are stored
as [B, R] / [B, R, ...] with R = the longest response in the batch, left-aligned, zero-padded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Literal, Sequence

import torch

if TYPE_CHECKING:
    from megatron_opd.data.prompts import Prompt
    from megatron_opd.data.tokenizer import Tokenizer

SignalKind = Literal["hidden", "topk", "sampled", "logits"]


@dataclass
class Trajectories:
    tokens: torch.Tensor  # [B, T] long, right-padded with the pad id
    lengths: torch.Tensor  # [B] long, prompt + response length
    prompt_lens: torch.Tensor  # [B] long
    domain: list[str]
    # Stable ids (for example "add/step3/17") so that resume and requeue can prove that no
    # sample is lost or repeated.
    sample_ids: list[str]
    teacher: list[str] = field(default_factory=list)  # filled by routing; "" when none
    behavior_logprobs: torch.Tensor | None = None  # [B, R] sampler's log p of each response token
    finish_reasons: list[str] = field(default_factory=list)  # "stop" or "length" per row
    rewards: torch.Tensor | None = None  # [B] float
    # Keep sampling mask (GRPO): the token ids the sampler could draw at each response position,
    # [B, R, K] long, most probable first, -1 padded (K: the batch's largest kept set), never a
    # dense [B, R, V] mask; with `kept_logprobs` [B, R] float, each response token's log-prob
    # renormalised over its kept set (`behavior_logprobs` is before truncation, as SGLang
    # reports it). None when not recorded or when the sampler kept the whole vocabulary.
    kept_ids: torch.Tensor | None = None
    kept_logprobs: torch.Tensor | None = None
    # Keep routing (MoE): [B, T, moe_layers, topk] int32, at each token position the expert ids every
    # MoE layer (in model order, `ModelConfig.moe_layers`) chose when the sampler fed that token;
    # -1 where nothing was fed (a row's last token, padding). T is `tokens`' width, so the training
    # forward of the same rows replays it position for position (models/routing.py).
    routed_experts: torch.Tensor | None = None
    weight_version: str = ""  # policy version that sampled these rows

    def __post_init__(self):
        b = self.tokens.shape[0]
        for name in ("lengths", "prompt_lens"):
            if getattr(self, name).shape != (b,):
                raise ValueError(f"Trajectories.{name} has shape {tuple(getattr(self, name).shape)}, expected ({b},)")
        for name in ("domain", "sample_ids"):
            if len(getattr(self, name)) != b:
                raise ValueError(f"Trajectories.{name} has {len(getattr(self, name))} entries for {b} rows")
        if not self.teacher:
            self.teacher = [""] * b
        if bool((self.prompt_lens < 1).any()) or bool((self.lengths < self.prompt_lens).any()):
            raise ValueError("Trajectories: every row needs prompt_len >= 1 and length >= prompt_len")
        if len(self) and int(self.lengths.max()) > self.tokens.shape[1]:
            raise ValueError("Trajectories: a length exceeds the token tensor's width")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def response_lens(self) -> torch.Tensor:
        return self.lengths - self.prompt_lens

    @property
    def max_response_len(self) -> int:
        return int(self.response_lens.max()) if len(self) else 0

    def prediction_mask(self) -> torch.Tensor:
        """[B, T] float: 1 at the positions whose output predicts a response token."""
        t = torch.arange(self.tokens.shape[1])
        return ((t >= self.prompt_lens[:, None] - 1) & (t < self.lengths[:, None] - 1)).float()

    def response_tokens(self) -> torch.Tensor:
        """[B, R] long, left-aligned response tokens (pad id 0 beyond each row's response)."""
        return gather_response(self.tokens, self.prompt_lens, self.response_lens, offset=0)

    def select(self, rows: Sequence[int] | torch.Tensor) -> "Trajectories":
        """A new batch with the given rows, in that order."""
        idx = torch.as_tensor(list(rows) if not torch.is_tensor(rows) else rows, dtype=torch.long)
        lst = idx.tolist()
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if torch.is_tensor(v):
                out[f.name] = v[idx]
            elif isinstance(v, list):
                out[f.name] = [v[i] for i in lst] if v else []
            else:
                out[f.name] = v
        return Trajectories(**out)


def concat(batches: Sequence[Trajectories], pad_id: int) -> Trajectories:
    """One batch of the rows of `batches`, in order (GRPO's dynamic sampling joins its refill
    batches). Per-row tensors are right-padded to the widest batch: tokens with `pad_id`, kept ids
    with -1, everything else with 0. The batches must come from one policy (`weight_version`)
    and carry the same optional fields."""
    if not batches:
        raise ValueError("concat needs at least one batch")
    versions = sorted({b.weight_version for b in batches})
    if len(versions) > 1:
        raise ValueError(f"the batches were sampled by different weights {versions}; they cannot form one rollout")
    out = {}
    for f in fields(Trajectories):
        values = [getattr(b, f.name) for b in batches]
        if f.name == "weight_version":
            out[f.name] = versions[0]
        elif all(isinstance(v, list) for v in values):
            out[f.name] = [x for v in values for x in v]
        elif all(v is None for v in values):
            out[f.name] = None
        elif all(torch.is_tensor(v) for v in values):
            fill = pad_id if f.name == "tokens" else -1 if f.name == "kept_ids" else 0
            shape = [max(v.shape[d] for v in values) for d in range(1, values[0].dim())]
            padded = []
            for v in values:
                p = v.new_full((v.shape[0], *shape), fill)
                p[tuple(slice(0, n) for n in v.shape)] = v
                padded.append(p)
            out[f.name] = torch.cat(padded)
        else:
            raise ValueError(f"Trajectories.{f.name} is set in some batches and not in others")
    return Trajectories(**out)


def gather_response(values: torch.Tensor, prompt_lens: torch.Tensor, response_lens: torch.Tensor, *, offset: int) -> torch.Tensor:
    """Left-align per-position `values` [B, T, ...] at positions prompt_len + offset + j -> [B, R, ...].

    offset=0 takes the response tokens themselves; offset=-1 takes the positions that predict them.
    """
    b, t = values.shape[:2]
    j = torch.arange(int(response_lens.max()) if len(response_lens) else 0)
    pos = (prompt_lens[:, None] + offset + j[None, :]).clamp(0, t - 1)
    out = values[torch.arange(b)[:, None], pos]
    out[j[None, :] >= response_lens[:, None]] = 0
    return out


def pack(
    rows: list[list[int]], prompt_lens: list[int], prompts: Sequence[Prompt], tokenizer: Tokenizer, max_len: int
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


# The per-token fields each teacher signal kind carries.
SIGNAL_FIELDS = {
    "hidden": ("hidden",),
    "topk": ("topk_ids", "topk_logprobs"),
    "sampled": ("sampled_logprobs",),
    "logits": ("logits",),
}


@dataclass
class TeacherSignals:
    """One teacher's signal for some rows of a `Trajectories` batch, per response token.

    `rows` indexes the batch; entry j of a row is the teacher's distribution (or its summary) at
    the position that predicts response token j. Exactly the field of `kind` is set.
    """

    teacher: str
    kind: SignalKind
    rows: torch.Tensor  # [N] long, rows of the batch
    response_lens: torch.Tensor  # [N] long
    hidden: torch.Tensor | None = None  # [N, R, d_teacher]
    topk_ids: torch.Tensor | None = None  # [N, R, k] long, global vocabulary ids
    topk_logprobs: torch.Tensor | None = None  # [N, R, k] float, sorted descending
    sampled_logprobs: torch.Tensor | None = None  # [N, R] teacher log q of the sampled token
    logits: torch.Tensor | None = None  # [N, R, V]
    weight_version: str = ""

    def __post_init__(self):
        if self.kind not in SIGNAL_FIELDS:
            raise ValueError(f"unknown teacher signal kind {self.kind!r}; expected one of {list(SIGNAL_FIELDS)}")
        n = self.rows.shape[0]
        for name in SIGNAL_FIELDS[self.kind]:
            value = getattr(self, name)
            if value is None:
                raise ValueError(f"TeacherSignals(kind={self.kind!r}) from {self.teacher!r} needs {name}")
            if value.shape[0] != n:
                raise ValueError(
                    f"TeacherSignals.{name} from {self.teacher!r} has {value.shape[0]} rows, expected {n}"
                )
