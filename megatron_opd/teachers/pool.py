"""`TeacherPool`: the trainer's one door to its teachers.

    pool = TeacherPool(cfg.teachers, student_vocab_size=V, student_fingerprint=tok.fingerprint)
    pool.start_sync()                      # refuses incompatible or unreachable teachers
    signals = pool.score(pool.route(traj)) # one TeacherSignals per teacher in the batch

Routing: each trajectory goes to the teacher that owns its domain; an unknown domain is an error,
never a default.

Start-up compatibility (every replica of every teacher; docs/teachers.md, "Compatibility"):
- our embedded server reports `vocab_size` and `tokenizer_fingerprint` in /model_info: both must
  equal the student's;
- a stock SGLang server reports neither, so its config names the teacher's tokenizer directory
  (`teachers.<name>.tokenizer_dir`, compared here) or declares both (what the operator checked);
  they must equal the student's, and a probe proves the vocabulary claim as far as the protocol
  can: scoring a few tokens with `top_logprobs_num` = the student's vocabulary size must return
  that many ids, all inside the student's id range, holding probability mass 1;
- a refusal says what differs (data/tokenizer.py `tokenizer_difference`: the first differing
  token id with both tokens, the chat template, ...) when the teacher's tokenizer is at hand
  (`tokenizer_dir`, or `model_dir`'s), else from the digest our server reports in /model_info
  (which block of ids, which component);
- then one scoring request per teacher with its own signal kind proves the whole path (hidden
  states enabled, top-k honoured, row counts right); for hidden-state teachers the state width
  must match the `model_dir` whose output layer the trainer will apply, and the checkpoint the
  server reports in /model_info (`checkpoint_id`) must be the one that head is loaded from (a
  stock SGLang server reports none: then the check is skipped with a warning).

Each teacher is one `SGLangClient` (serving/client.py: pooled connections, retries, failover);
scoring batches its sequences by prompt length (`score_items`). The clients live on a private
event-loop thread, so `score()` is a plain call from the training loop and `await ascore()` works
from any other loop. The pool is the HTTP implementation of `teachers.scorer.Scorer`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from megatron_opd.data.tokenizer import (
    Tokenizer,
    TokenizerDescription,
    description_difference,
    digest_difference,
    load_tokenizer,
)
from megatron_opd.data.trajectories import SIGNAL_FIELDS, TeacherSignals, Trajectories
from megatron_opd.serving import wire
from megatron_opd.serving.client import ClientSettings, EventLoopThread, SGLangClient, ServerError, gather_all
from megatron_opd.teachers import protocol as P
from megatron_opd.teachers.config import TeacherConfig, check_teachers
from megatron_opd.teachers.scorer import RoutingError, route_by_domain, rows_by_teacher

PROBE_MASS_TOLERANCE = 1e-3
log = logging.getLogger(__name__)


def _newest_id(model_dir: str) -> str | None:
    from megatron_opd.models.model_dir import read_model_dir

    try:
        return read_model_dir(model_dir).weights_id()  # a checkpoint's id, or an HF directory's
    except (OSError, ValueError):
        return None


class TeacherIncompatible(ServerError):
    """A teacher does not share the student's vocabulary/tokenizer (or cannot serve its signal)."""


def client_for(name: str, cfg: TeacherConfig, *, trace: bool = False) -> SGLangClient:
    """The SGLang client of one teacher (its replicas or router, key, timeouts, concurrency)."""
    settings = ClientSettings(
        endpoints=tuple(cfg.endpoints), api_key=cfg.api_key, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
        retry_backoff_s=cfg.retry_backoff_s, max_concurrency=cfg.max_concurrency,
    )  # fmt: skip
    return SGLangClient(f"teacher {name!r}", settings, trace=trace)


def binary_supported(cfg: TeacherConfig, info: dict) -> bool:
    """Our binary form, when the config allows it and the server advertises it in /model_info."""
    return cfg.wire == "auto" and int((info.get(wire.INFO_SERVER) or {}).get("binary_signal", 0)) >= 1


def signal_spec(cfg: TeacherConfig, info: dict | None = None) -> P.SignalSpec:
    """What to ask the server at /model_info `info` for (`None`: as the responses are checked)."""
    return P.SignalSpec(
        kind=cfg.signal, topk=cfg.topk, topk_format=cfg.topk_format,
        binary=info is not None and binary_supported(cfg, info), hidden_dtype=cfg.hidden_dtype,
    )  # fmt: skip


def request_batches(items: Sequence[P.ScoreItem], batch_size: int) -> list[list[int]]:
    """Indices of `items` in requests: equal prompt lengths together, `batch_size` at most
    (one scalar `logprob_start_len` per request is what the sglang-router accepts)."""
    by_len: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        by_len.setdefault(it.prompt_len, []).append(i)
    return [idx[j : j + batch_size] for idx in by_len.values() for j in range(0, len(idx), batch_size)]


async def score_items(
    client: SGLangClient, cfg: TeacherConfig, items: Sequence[P.ScoreItem], *, vocab_size: int = 0
) -> list[P.ItemSignal]:
    """The teacher's signal for each item, in order (`cfg.signal`, aligned to response tokens).
    `client.start()` must have run (its /model_info decides the wire form per replica)."""
    out: list[P.ItemSignal | None] = [None] * len(items)

    async def one(idx: list[int]) -> None:
        chunk = [items[i] for i in idx]
        make = lambda url: P.score_request(chunk, signal_spec(cfg, client.model_infos.get(url) or {}))  # noqa: E731
        url, payload, ctype = await client.post("/generate", make)
        where = client.where(url)
        responses = wire.decode_response_body(payload, ctype, where)
        for i, sig in zip(idx, P.parse_score_response(responses, chunk, signal_spec(cfg), where, vocab_size=vocab_size)):
            out[i] = sig

    await gather_all([one(idx) for idx in request_batches(items, cfg.batch_size)])
    return out  # type: ignore[return-value]


class TeacherPool:
    collective = False  # teachers.scorer.Scorer: called on the replica's first rank only

    def __init__(
        self,
        teachers: dict[str, TeacherConfig],
        *,
        student_vocab_size: int,
        student_fingerprint: str = "",
        student_tokenizer: Tokenizer | None = None,
        trace: bool = False,
    ):
        """`student_tokenizer` (optional): lets a refusal name what differs from a teacher's."""
        self.teachers = dict(teachers)
        self.domain_owner = check_teachers(self.teachers)
        self.student_vocab_size = student_vocab_size
        if student_tokenizer is not None and student_fingerprint not in ("", student_tokenizer.fingerprint):
            raise ValueError(
                f"student_fingerprint {student_fingerprint!r} is not that of student_tokenizer ({student_tokenizer.fingerprint!r})"
            )
        self.student_tokenizer = student_tokenizer
        self.student_fingerprint = student_fingerprint or (student_tokenizer.fingerprint if student_tokenizer else "")
        if not self.student_fingerprint:
            raise ValueError("TeacherPool needs the student's tokenizer: give student_tokenizer (or student_fingerprint)")
        self.clients = {name: client_for(name, cfg, trace=trace) for name, cfg in self.teachers.items()}
        self.started = False
        self._loop: EventLoopThread | None = None

    def _runner(self) -> EventLoopThread:
        if self._loop is None:
            self._loop = EventLoopThread("teacher-pool")
        return self._loop

    # -- start-up -----------------------------------------------------------------------------

    def start_sync(self) -> None:
        self._runner().run(self._start())

    async def start(self) -> None:
        await self._runner().wrap(self._start())

    async def _start(self) -> None:
        await gather_all([self._start_teacher(name) for name in self.teachers])
        self.started = True

    async def _start_teacher(self, name: str) -> None:
        client, cfg = self.clients[name], self.teachers[name]
        infos = await client.start(require_all=True)
        for url, info in infos.items():
            if info.get(wire.INFO_VOCAB_SIZE) is None or info.get(wire.INFO_FINGERPRINT) is None:
                await self._check_stock_sglang(name, url)
            else:
                fingerprint = str(info[wire.INFO_FINGERPRINT])
                served = None
                if fingerprint != self.student_fingerprint and self.student_tokenizer is not None:
                    served = await client.tokenizer_description(url)  # to name what differs
                self._compare(name, url, int(info[wire.INFO_VOCAB_SIZE]), fingerprint, "reported by /model_info",
                              digest=info.get(wire.INFO_TOKENIZER_DIGEST), teacher=served)  # fmt: skip
            if cfg.signal == "logits" and not (info.get(wire.INFO_SERVER) or {}).get("full_logprobs"):
                raise TeacherIncompatible(
                    f"teacher {name!r} at {url} cannot send signal 'logits': SGLang has no full-vocabulary output "
                    f"(only our embedded server does); use signal 'hidden' for the exact distribution"
                )
        await self._probe_signal(name)

    def _compare(
        self, name: str, url: str, vocab: int, fingerprint: str, source: str, *,
        digest: dict | None = None, teacher: TokenizerDescription | None = None,
    ) -> None:  # fmt: skip
        if vocab != self.student_vocab_size:
            what = self._what_differs(name, fingerprint, digest, teacher) if fingerprint != self.student_fingerprint else ""
            raise TeacherIncompatible(
                f"teacher {name!r} at {url} has vocabulary size {vocab} ({source}) but the student has "
                f"{self.student_vocab_size}{what}; refusing to start"
            )
        if fingerprint != self.student_fingerprint:
            raise TeacherIncompatible(
                f"teacher {name!r} at {url} has tokenizer fingerprint {fingerprint!r} ({source}) but the student has "
                f"{self.student_fingerprint!r}{self._what_differs(name, fingerprint, digest, teacher)}; refusing to start"
            )

    def _what_differs(self, name: str, fingerprint: str, digest: dict | None, teacher: TokenizerDescription | None) -> str:
        """': <what differs>' between the student's tokenizer and teacher `name`'s (whose fingerprint
        is `fingerprint`): exact from the teacher's own description (served, or its tokenizer_dir or
        model_dir's), else by component from the digest its server reported, else a hint."""
        if self.student_tokenizer is not None:
            if teacher is None and (local := self._local_tokenizer(name)) is not None:
                teacher = local.describe()
            if teacher is not None and teacher.fingerprint == fingerprint:
                return f": {description_difference(self.student_tokenizer.describe(), teacher)}"
            if digest and digest.get("fingerprint") == fingerprint:
                return f": {digest_difference(self.student_tokenizer.describe().digest(), digest)}"
        return f" (set teachers.{name}.tokenizer_dir to the teacher's tokenizer directory to have the difference named)"

    def _local_tokenizer(self, name: str) -> Tokenizer | None:
        cfg = self.teachers[name]
        for path in (cfg.tokenizer_dir, cfg.model_dir):
            if path:
                try:
                    return load_tokenizer(path)
                except (OSError, ValueError):
                    continue
        return None

    async def _check_stock_sglang(self, name: str, url: str) -> None:
        cfg = self.teachers[name]
        if cfg.tokenizer_dir:
            try:
                tok = load_tokenizer(cfg.tokenizer_dir)
            except (OSError, ValueError) as e:
                raise TeacherIncompatible(f"teachers.{name}.tokenizer_dir={cfg.tokenizer_dir}: {e}") from None
            self._compare(name, url, cfg.vocab_size or tok.vocab_size, tok.fingerprint,
                          f"teachers.{name}.tokenizer_dir", teacher=tok.describe())  # fmt: skip
        elif not cfg.tokenizer_fingerprint or not cfg.vocab_size:
            raise TeacherIncompatible(
                f"teacher {name!r} at {url} does not report its tokenizer (a stock SGLang server): set "
                f"teachers.{name}.tokenizer_dir to the directory of the tokenizer it serves, or declare "
                f"teachers.{name}.tokenizer_fingerprint and teachers.{name}.vocab_size after checking that it uses the "
                f"student's tokenizer (student: fingerprint {self.student_fingerprint!r}, vocabulary {self.student_vocab_size})"
            )
        else:
            self._compare(name, url, cfg.vocab_size, cfg.tokenizer_fingerprint, f"declared in teachers.{name}")
        # The probe: the whole distribution must live on the student's ids.
        V = self.student_vocab_size
        probe = [t % V for t in (1, 2, 3, 4)]
        body = {"input_ids": [probe], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                "logprob_start_len": 0, "top_logprobs_num": V}  # fmt: skip
        where = f"teacher {name!r} at {url}"
        try:
            payload, ctype = await self.clients[name].post_to(url, "/generate", body)
        except ServerError as e:
            raise TeacherIncompatible(f"{where} failed the vocabulary probe (top_logprobs_num={V}): {e}") from None
        (resp,) = wire.decode_response_body(payload, ctype, where)
        rows = [r for r in (resp.get("meta_info") or {}).get("input_top_logprobs") or [] if r is not None]
        if len(rows) != len(probe) - 1:
            raise TeacherIncompatible(f"{where} answered the vocabulary probe with {len(rows)} top-k rows; expected {len(probe) - 1}")
        for row in rows:
            ids = np.array([e[1] for e in row])
            mass = float(np.exp(np.array([e[0] for e in row], np.float64)).sum())
            if len(row) != V or ids.min() < 0 or ids.max() >= V or abs(mass - 1.0) > PROBE_MASS_TOLERANCE:
                raise TeacherIncompatible(
                    f"{where} fails the vocabulary probe: top {V} logprobs returned {len(row)} ids in "
                    f"[{ids.min()}, {ids.max()}] holding mass {mass:.6f}; the student's vocabulary is [0, {V})"
                )

    async def _probe_signal(self, name: str) -> None:
        cfg, client = self.teachers[name], self.clients[name]
        V = self.student_vocab_size
        item = P.ScoreItem(tuple(t % V for t in (1, 2, 3, 4)), prompt_len=2)
        try:
            (sig,) = await score_items(client, cfg, [item], vocab_size=V)
        except ServerError as e:
            raise TeacherIncompatible(f"teacher {name!r} failed the start-up probe with signal {cfg.signal!r}: {e}") from None
        except wire.ProtocolError as e:
            raise TeacherIncompatible(f"teacher {name!r} failed the start-up probe: {e}") from None
        if cfg.signal == "hidden" and cfg.model_dir:
            from megatron_opd.models.model_dir import read_model_dir

            mdir = read_model_dir(cfg.model_dir)
            width = sig.hidden.shape[-1]
            if width != mdir.model.hidden_size:
                raise TeacherIncompatible(
                    f"teacher {name!r} sends hidden states of width {width} but teachers.{name}.model_dir "
                    f"({cfg.model_dir}) has hidden_size {mdir.model.hidden_size}: its output layer cannot apply"
                )
            self._compare(name, cfg.model_dir, mdir.model.vocab_size, mdir.tokenizer.fingerprint,
                          f"teachers.{name}.model_dir", teacher=mdir.tokenizer.describe())  # fmt: skip
            self._check_head_checkpoint(name, mdir.latest_checkpoint())

    def _check_head_checkpoint(self, name: str, head: Path) -> None:
        """The output layer the trainer applies to a teacher's hidden states must be the served
        model's: every replica's checkpoint id (/model_info) must be that of the checkpoint the
        head is loaded from (teachers.<name>.model_dir's newest)."""
        from megatron_opd.models.model_dir import weights_id_of

        want = weights_id_of(head)  # a checkpoint's id, or an HF directory's (the server reports the same)
        for url, info in self.clients[name].model_infos.items():
            served = info.get(wire.INFO_CHECKPOINT_ID)
            if want is None or served is None:
                log.warning(
                    "teacher %r at %s: cannot check that teachers.%s.model_dir (%s) is the model it serves: %s",
                    name, url, name, self.teachers[name].model_dir,
                    "the checkpoint has no id (saved before ids)" if want is None else "the server reports no checkpoint id",
                )  # fmt: skip
                continue
            if served != want:
                owners = [
                    f"teachers.{other}.model_dir ({cfg.model_dir})"
                    for other, cfg in self.teachers.items()
                    if other != name and cfg.model_dir and _newest_id(cfg.model_dir) == served
                ]
                hint = f"; it serves the checkpoint of {', '.join(owners)}" if owners else ""
                raise TeacherIncompatible(
                    f"teacher {name!r} at {url} serves checkpoint {served} ({info.get('model_path')}) but "
                    f"teachers.{name}.model_dir ({self.teachers[name].model_dir}) holds {want} ({head}){hint}: the trainer "
                    f"would apply another model's output layer to its hidden states; point teachers.{name}.model_dir "
                    f"at the model this server serves"
                )

    # -- routing and scoring ------------------------------------------------------------------

    def route(self, traj: Trajectories) -> Trajectories:
        """Fill `traj.teacher` from each row's domain (in place; returns `traj`)."""
        return route_by_domain(traj, self.domain_owner)

    def score(self, traj: Trajectories) -> list[TeacherSignals]:
        return self._runner().run(self._score(traj))

    async def ascore(self, traj: Trajectories) -> list[TeacherSignals]:
        return await self._runner().wrap(self._score(traj))

    async def _score(self, traj: Trajectories) -> list[TeacherSignals]:
        if not self.started:
            raise RuntimeError("TeacherPool.score before start(): call pool.start_sync() (or await pool.start()) first")
        if any(t == "" for t in traj.teacher):
            self.route(traj)
        rows_of = rows_by_teacher(traj, self.clients)
        R = traj.max_response_len

        async def one(name: str, rows: list[int]) -> TeacherSignals:
            items = [
                P.ScoreItem(tuple(traj.tokens[i, : int(traj.lengths[i])].tolist()), int(traj.prompt_lens[i]), traj.sample_ids[i])
                for i in rows
            ]
            sigs = await score_items(self.clients[name], self.teachers[name], items, vocab_size=self.student_vocab_size)
            return assemble(name, self.teachers[name].signal, rows, items, sigs, R)

        return await gather_all([one(name, rows) for name, rows in rows_of.items()])

    # -- shutdown -----------------------------------------------------------------------------

    def close(self) -> None:
        if self._loop is not None:
            self._loop.run(gather_all([c.close() for c in self.clients.values()]))
            self._loop.stop()
            self._loop = None

    def __enter__(self) -> "TeacherPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def assemble(name: str, kind: str, rows: list[int], items: list[P.ScoreItem], sigs: list[P.ItemSignal], R: int) -> TeacherSignals:
    """Stack per-item signals into one left-aligned, zero-padded `TeacherSignals` of width R."""
    versions = {s.weight_version for s in sigs}
    if len(versions) > 1:
        raise wire.ProtocolError(f"teacher {name!r} answered one batch with different weight versions {sorted(versions)}")
    n = len(items)
    lens = torch.tensor([it.response_len for it in items], dtype=torch.long)
    fields: dict[str, torch.Tensor] = {}
    for key in SIGNAL_FIELDS[kind]:
        out = None
        for b, sig in enumerate(sigs):
            t = torch.from_numpy(np.ascontiguousarray(getattr(sig, key)))
            t = t.long() if key == "topk_ids" else t
            if t.shape[0] != items[b].response_len:
                raise wire.ProtocolError(f"teacher {name!r}: {key} of item {b} has {t.shape[0]} rows for {items[b].response_len} response tokens")
            if out is None:
                out = torch.zeros((n, R, *t.shape[1:]), dtype=t.dtype)
            out[b, : t.shape[0]] = t
        fields[key] = out
    return TeacherSignals(
        teacher=name,
        kind=kind,
        rows=torch.tensor(rows, dtype=torch.long),
        response_lens=lens,
        weight_version=versions.pop() if versions else "",
        **fields,
    )


__all__ = [
    "TeacherPool", "TeacherIncompatible", "RoutingError", "assemble", "score_items", "client_for", "request_batches", "signal_spec",
]  # fmt: skip
