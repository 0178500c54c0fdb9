"""`InJobTeachers`: teachers that run inside the training job, loaded on demand, one at a time.

The Scorer of `teachers.<name>.placement: in_job` (teachers/scorer.py). Each such teacher is a
megatron GPTModel built from its model directory under the job's own parallel layout (its TP
shard and PP stage on every rank, like the student), run without gradients on the rows of its
domains, giving the `TeacherSignals` a `hidden` server sends: the final (post-norm) hidden states
at the positions that predict the response tokens. The stage applies the teacher's output layer
in the loss (models/heads.py), exactly as for a server; nothing downstream of the signals differs.

Scheduling, as DeepSeek-V4 is reported to do it:

    score(batch)   rows grouped by teacher; groups run one teacher at a time, the teachers that are
                   already resident first (most recent first), then the others by name
      for each group:
        make resident   bind its weights: from the staging buffer the prefetch filled (disk), or
                        from host memory (teacher_weights=host); the least recently used teacher
                        is released first when `resident` are already on the device
        prefetch next   a background thread reads the next group's teacher (this rank's shards,
                        no collectives: models/weights.py) into host buffers, pinned on a GPU
        forward         `hidden_forward(model, rows)`: the stage's forward-only pass (TP/PP)

So at most `resident` teachers' weights live on the device, plus one staging buffer on the host;
memory grows with `opd.resident_teachers`, not with the number of teachers. A teacher stays
resident after its group until its slot is needed, so with one slot a step of T teachers loads
T - 1 of them (the first is the previous step's last). The stage also asks for the first teacher
of the next rollout before generating it (`prefetch_for`), so that read overlaps the rollout.

Every teacher is opened and checked once at `start()`, before the first step, on every rank (each
checks what it will read): its model directory, tokenizer and vocabulary against the student's,
its architecture against the job's layout, and every byte of this rank's shards read once (a
missing, truncated or garbled checkpoint file fails here, naming the teacher and the file). With
teacher_weights=host that read is kept as the host copy.

`score` is collective over the data-parallel replica (every rank calls it with the same batch):
the forward is; a rank whose weights fail to load tells the others before the forward.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Literal

import torch
import torch.distributed as dist

from megatron_opd.data.trajectories import TeacherSignals, Trajectories, gather_response
from megatron_opd.models.model_dir import ModelDir, read_model_dir
from megatron_opd.models.weights import (
    WeightPlan,
    bind_weights,
    check_readable,
    read_weights,
    release_weights,
    return_freed_host_memory,
    weight_plan,
)
from megatron_opd.runtime.layout import ParallelLayout
from megatron_opd.teachers.config import TeacherConfig, check_teachers
from megatron_opd.teachers.scorer import route_by_domain, rows_by_teacher

# (teacher model, rows) -> [rows, T, d] final hidden states at every position, float32 on the host,
# on every rank of the replica. Collective over the replica (the stage's forward-only pass).
HiddenForward = Callable[[torch.nn.Module, Trajectories], torch.Tensor]

# The teacher's output layer is not loaded: the loss applies the head the stage loads.
SKIPPED = ("output_layer.",)


class InJobTeacherError(RuntimeError):
    """An in-job teacher cannot be used; the message names it, the file or key, and the fix."""


@dataclass
class _Teacher:
    name: str
    cfg: TeacherConfig
    model_dir: ModelDir
    checkpoint: Path
    model: torch.nn.Module  # built on meta; parameters bound while resident
    plan: WeightPlan
    version: str  # the checkpoint's id: the signals' weight_version
    host: dict[str, torch.Tensor] | None = None  # teacher_weights=host: this rank's weights


@dataclass
class ScoreStats:
    """What one `score` call spent, for the step's metrics."""

    order: list[str] = field(default_factory=list)  # teachers in the order they ran
    loads: list[str] = field(default_factory=list)  # teachers made resident by this call
    forward_s: float = 0.0  # teacher forward passes
    load_wait_s: float = 0.0  # time blocked on weight reads (the reads left on the critical path)
    load_s: float = 0.0  # whole loads: reads waited for, binding, the replica agreeing on the outcome
    read_s: float = 0.0  # disk reads finished for this call, background ones included
    rows: int = 0

    def metrics(self) -> dict[str, float]:
        return {
            "teacher_forward_s": self.forward_s,
            "teacher_load_wait_s": self.load_wait_s,
            "teacher_load_s": self.load_s,
            "teacher_read_s": self.read_s,
            "teacher_loads": float(len(self.loads)),
            "teacher_rows": float(self.rows),
        }


class InJobTeachers:
    collective: ClassVar[bool] = True  # teachers.scorer.Scorer: every rank of the replica calls score

    def __init__(
        self,
        teachers: dict[str, TeacherConfig],
        *,
        layout: ParallelLayout,
        student_vocab_size: int,
        student_fingerprint: str,
        student_max_seq_len: int,
        dtype: torch.dtype,
        hidden_forward: HiddenForward,
        replica_group: dist.ProcessGroup | None = None,
        resident: int = 1,
        weights: Literal["disk", "host"] = "disk",
        prefetch: bool = True,
    ):
        if resident < 1:
            raise ValueError(f"opd.resident_teachers must be >= 1, got {resident}")
        if weights not in ("disk", "host"):
            raise ValueError(f"opd.teacher_weights must be disk or host, got {weights!r}")
        self.configs = dict(teachers)
        self.domain_owner = check_teachers(self.configs, endpoints_required=False)
        self.layout, self.dtype = layout, dtype
        self.student_vocab_size, self.student_fingerprint = student_vocab_size, student_fingerprint
        self.student_max_seq_len = student_max_seq_len
        self.hidden_forward = hidden_forward
        self.group = replica_group
        self.capacity, self.weights = resident, weights
        self.pin = torch.cuda.is_available()
        self.teachers: dict[str, _Teacher] = {}
        self.resident: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()  # least recent first
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="teacher-prefetch") if prefetch and weights == "disk" else None
        self._staged: tuple[str, Future] | None = None
        self._read_s = 0.0  # reads finished since the last score() took the count
        self.last_stats = ScoreStats()
        self.load_log: list[str] = []  # every teacher made resident, in order (tests, benchmarks)

    # -- start-up: every teacher checked before the first step ----------------------------------

    def start(self) -> None:
        """Open and check every teacher on this rank (raises InJobTeacherError naming it). Not
        collective: the stage agrees on the outcome over all ranks."""
        for name in sorted(self.configs):
            self.teachers[name] = self._open(name)

    def _open(self, name: str) -> _Teacher:
        from megatron_opd.models.gpt import build_gpt_model
        from megatron_opd.models.hf.errors import CheckpointError
        from megatron_opd.runtime.checkpoint import checkpoint_id

        cfg = self.configs[name]
        where = f"in-job teacher {name!r} (teachers.{name}.model_dir={cfg.model_dir})"
        try:
            mdir = read_model_dir(cfg.model_dir)
        except (OSError, ValueError) as e:
            raise InJobTeacherError(f"{where}: {e}") from None
        model = mdir.model
        if mdir.tokenizer is None:
            raise InJobTeacherError(f"{where} holds no tokenizer.json: its tokenizer cannot be checked against the student's")
        if model.vocab_size != self.student_vocab_size or mdir.tokenizer.vocab_size != self.student_vocab_size:
            raise InJobTeacherError(
                f"{where} has vocabulary size {model.vocab_size} (tokenizer: {mdir.tokenizer.vocab_size}) but the "
                f"student has {self.student_vocab_size}; a teacher must share the student's vocabulary"
            )
        if mdir.tokenizer.fingerprint != self.student_fingerprint:
            raise InJobTeacherError(
                f"{where} has tokenizer fingerprint {mdir.tokenizer.fingerprint!r} but the student has "
                f"{self.student_fingerprint!r}; a teacher must share the student's tokenizer"
            )
        if model.max_seq_len < self.student_max_seq_len:
            raise InJobTeacherError(
                f"{where} has max_seq_len {model.max_seq_len}, shorter than the student's {self.student_max_seq_len}"
            )
        try:
            model.check(self.layout)
        except ValueError as e:
            raise InJobTeacherError(
                f"{where} does not fit the job's layout (tp={self.layout.tp}, pp={self.layout.pp}, ep={self.layout.ep}): "
                f"{e}; in-job teachers run under the student's layout: serve it instead (teachers.{name}.placement=server)"
            ) from None
        if model.is_moe and self.layout.ep > 1:
            raise InJobTeacherError(
                f"{where} is a mixture of experts and the job has parallel.ep={self.layout.ep}: its all-to-alls "
                f"would pair data-parallel replicas that score different teachers; serve it instead "
                f"(teachers.{name}.placement=server)"
            )
        try:
            checkpoint = mdir.latest_checkpoint()
            with torch.device("meta"):
                structure = build_gpt_model(model, self.layout, dtype=self.dtype, on_device="meta")
            structure.eval()
            plan = weight_plan(structure, skip=SKIPPED)
            host = None
            t0 = time.perf_counter()
            if self.weights == "host":  # the check read is the host copy
                host = read_weights(plan, checkpoint, pin_memory=self.pin)
            else:
                check_readable(plan, checkpoint)
                return_freed_host_memory()
            self._read_s += time.perf_counter() - t0
        except (OSError, ValueError, CheckpointError) as e:
            raise InJobTeacherError(f"{where} failed to load: {type(e).__name__}: {e}") from None
        return _Teacher(name, cfg, mdir, checkpoint, structure, plan, checkpoint_id(checkpoint) or "", host)

    # -- scheduling ---------------------------------------------------------------------------

    def order(self, names) -> list[str]:
        """The order a step's teachers run in: resident ones first (most recent first), so that the
        previous step's last teacher is not loaded twice; then the rest by name."""
        names = set(names)
        resident = [n for n in reversed(self.resident) if n in names]
        return resident + sorted(names - set(resident))

    def prefetch_for(self, names) -> None:
        """Start reading the first teacher of a coming `score` over `names` that is not resident
        (the stage calls this before the rollout that the scoring follows)."""
        upcoming = [n for n in self.order(names) if n not in self.resident]
        if upcoming:
            self._prefetch(upcoming[0])

    def _read(self, name: str) -> tuple[dict[str, torch.Tensor], float]:
        t = self.teachers[name]
        t0 = time.perf_counter()
        tensors = read_weights(t.plan, t.checkpoint, pin_memory=self.pin)
        return_freed_host_memory()  # the checkpoint reader's own buffers
        return tensors, time.perf_counter() - t0

    def _prefetch(self, name: str) -> None:
        if self._executor is None or name in self.resident:
            return
        if self._staged is not None:
            if self._staged[0] == name:
                return
            self._drop_staged()  # one staging buffer at most: memory stays bounded
        self._staged = (name, self._executor.submit(self._read, name))

    def _drop_staged(self) -> None:
        _, future = self._staged
        self._staged = None
        try:
            self._read_s += future.result()[1]
        except Exception:  # noqa: BLE001 - a prefetch nobody needs; the read that is needed reports its own error
            pass
        del future
        return_freed_host_memory()

    def _staged_or_read(self, name: str, stats: ScoreStats) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        try:
            return self._take_or_read(name)
        finally:
            stats.load_wait_s += time.perf_counter() - t0

    def _take_or_read(self, name: str) -> dict[str, torch.Tensor]:
        if self._staged is not None and self._staged[0] == name:
            _, future = self._staged
            self._staged = None
            tensors, seconds = future.result()
        else:
            if self._staged is not None:
                self._drop_staged()
            tensors, seconds = self._read(name)
        self._read_s += seconds
        return tensors

    def _make_resident(self, name: str, stats: ScoreStats) -> None:
        if name in self.resident:
            self.resident.move_to_end(name)
            return
        while len(self.resident) >= self.capacity:
            self._release(next(iter(self.resident)))
        t = self.teachers[name]
        from megatron_opd.runtime.distributed import device

        on = device()
        source = t.host if t.host is not None else self._staged_or_read(name, stats)
        tensors = {k: v.to(on, non_blocking=True) for k, v in source.items()} if on.type != "cpu" else source
        bind_weights(t.model, tensors)
        self.resident[name] = tensors
        stats.loads.append(name)
        self.load_log.append(name)

    def _release(self, name: str) -> None:
        release_weights(self.teachers[name].model, list(self.resident.pop(name)))
        return_freed_host_memory()

    def _agree(self, error: str | None) -> None:
        """Collective over the replica: if any rank failed to load, every rank raises (the forward
        would otherwise wait for it forever)."""
        errors: list[str | None] = [error]
        if self.group is not None and dist.get_world_size(self.group) > 1:
            errors = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(errors, error, group=self.group)
        first = next((e for e in errors if e), None)
        if first:
            raise InJobTeacherError(first)

    # -- the Scorer interface -------------------------------------------------------------------

    def route(self, batch: Trajectories) -> Trajectories:
        return route_by_domain(batch, self.domain_owner)

    def score(self, batch: Trajectories) -> list[TeacherSignals]:
        if not self.teachers:
            raise RuntimeError("InJobTeachers.score before start()")
        if any(t == "" for t in batch.teacher):
            self.route(batch)
        rows_of = rows_by_teacher(batch, self.teachers)
        order = self.order(rows_of)
        stats = ScoreStats(order=order)
        signals: dict[str, TeacherSignals] = {}
        for k, name in enumerate(order):
            t0 = time.perf_counter()
            error = None
            try:
                self._make_resident(name, stats)
            except Exception as e:  # noqa: BLE001 - shared with the replica below
                error = f"in-job teacher {name!r} failed to load {self.teachers[name].checkpoint}: {type(e).__name__}: {e}"
            self._agree(error)
            later = [n for n in order[k + 1 :] if n not in self.resident]
            if later:
                self._prefetch(later[0])
            stats.load_s += time.perf_counter() - t0
            rows = rows_of[name]
            sub = batch.select(rows)
            t0 = time.perf_counter()
            hidden = self.hidden_forward(self.teachers[name].model, sub)
            stats.forward_s += time.perf_counter() - t0
            stats.rows += len(rows)
            signals[name] = TeacherSignals(
                teacher=name,
                kind="hidden",
                rows=torch.tensor(rows, dtype=torch.long),
                response_lens=sub.response_lens.clone(),
                hidden=gather_response(hidden, sub.prompt_lens, sub.response_lens, offset=-1),
                weight_version=self.teachers[name].version,
            )
        stats.read_s, self._read_s = self._read_s, 0.0
        self.last_stats = stats
        return [signals[name] for name in rows_of]  # the pool's order: first appearance in the batch

    def close(self) -> None:
        if self._executor is not None:
            if self._staged is not None:
                self._drop_staged()
            self._executor.shutdown(wait=True)
            self._executor = None
        for name in list(self.resident):
            self._release(name)
        for t in self.teachers.values():
            t.host = None
