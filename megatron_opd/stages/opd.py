"""Multi-teacher on-policy distillation: the student learns from its own samples, scored by experts.

One step: prompts from every domain -> the student samples (RolloutEngine) -> each trajectory is
routed to the expert of its domain and scored (TeacherPool) -> at every response position the
student minimises the reverse KL to that expert's distribution -> optimizer step -> weight sync.

What the loss sees per teacher signal kind (docs/architecture.md, "OPD losses"):
- hidden: the teacher's final hidden states times the teacher's own output layer, sharded over
  the student's TP ranks -> exact full-vocabulary KL (`vocab_parallel_reverse_kl`, or fused with
  both output layers, `fused_linear_reverse_kl`, when opd.fused_output_layer is set);
- logits: the same from teacher log-probs over the vocabulary (small vocabularies, tests);
- topk: the top-k-plus-tail lower bound (`topk_reverse_kl`);
- sampled: the sampled-token estimator as a policy-gradient surrogate (`sampled_kl_surrogate`).

Prompts, rollouts, verification, weight sync and evaluation are the on-policy skeleton's
(stages/on_policy.py); this stage adds the scoring (route each trajectory to its domain's teacher,
score it through that teacher's `Scorer`, optionally keep the signals in a TeacherStore) and the
loss. Teachers are served (`teachers.<name>.placement: server`, the TeacherPool over HTTP: only
the replica's first model-parallel rank talks to them and shares the signals with its replica) or
in the job (`in_job`, InJobTeachers: megatron models loaded on demand under the student's layout,
run by every rank of the replica through `Trainer.forward_only`); a job may mix both. Either way
the loss gets the same `TeacherSignals`.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from megatron_opd.data.trajectories import SIGNAL_FIELDS, TeacherSignals, Trajectories
from megatron_opd.models.gpt import output_layer_bypassed
from megatron_opd.models.heads import load_output_layer_shard
from megatron_opd.models.model_dir import read_model_dir
from megatron_opd.runtime.distributed import broadcast_object, device, first_error
from megatron_opd.stages.on_policy import OnPolicyStage, Rollout
from megatron_opd.stages.trainer import MicroBatch, logits_forward, metric
from megatron_opd.teachers.in_job import InJobTeachers, ScoreStats
from megatron_opd.teachers.scorer import Scorer, route_by_domain


def _signals_for_rows(signals: list[TeacherSignals], rows: range) -> list[TeacherSignals]:
    """The signals of batch rows `rows`, with row indices made relative to rows.start."""
    out = []
    for s in signals:
        keep = (s.rows >= rows.start) & (s.rows < rows.stop)
        if not bool(keep.any()):
            continue
        fields = {
            k: getattr(s, k)[keep]
            for k in ("response_lens", *(f for fields in SIGNAL_FIELDS.values() for f in fields))
            if getattr(s, k) is not None
        }
        out.append(replace(s, rows=s.rows[keep] - rows.start, **fields))
    return out


def _flatten_responses(values: torch.Tensor, response_lens: torch.Tensor) -> torch.Tensor:
    """[N, R, ...] left-aligned per-response-token values -> [sum(R_i), ...] in row order."""
    r = values.shape[1]
    keep = torch.arange(r)[None, :] < response_lens[:, None]
    return values[keep]


class OPDStage(OnPolicyStage):
    name = "opd"
    progress_keys = ["kl", "rollout_acc", "acc/mean"]
    finite_metrics = ["kl"]

    # -- set-up -----------------------------------------------------------------------------------

    def setup(self) -> None:
        # The config's checks (teachers for every domain, signal and temperature, placement, fused
        # output layer) ran before launch: JobConfig.check, config/stages.py.
        cfg = self.cfg
        self.teacher_names = sorted(cfg.teachers)
        self.domain_owner = {d: n for n, t in cfg.teachers.items() for d in t.domains}
        served = {n: t for n, t in cfg.teachers.items() if t.placement == "server"}
        in_job = {n: t for n, t in cfg.teachers.items() if t.placement == "in_job"}
        # The teachers each Scorer owns; `scorer` (HTTP) exists on the replica's first rank only.
        self.server_teachers, self.in_job_teachers = set(served), set(in_job)
        self.in_job = self._start_in_job(in_job) if in_job else None
        try:
            self.scorer: Scorer | None = self._start_pool(served) if served else None
        except BaseException:
            if self.in_job is not None:
                self.in_job.close()
            raise
        self.store = None
        if cfg.opd.signal_store and dist.get_rank() == self.mp_src:
            from megatron_opd.teachers.store import TeacherStore

            # float32: signals read back after a restart must equal the ones first scored.
            self.store = TeacherStore(cfg.opd.signal_store, hidden_dtype="float32")
        self.heads = self._load_teacher_heads()

    def _start_pool(self, teachers) -> Scorer | None:
        """Start the pool on the replica's first rank; every rank raises the same error if it fails."""
        from megatron_opd.teachers.pool import TeacherPool

        pool, error = None, None
        if dist.get_rank() == self.mp_src:
            try:
                pool = TeacherPool(
                    teachers,
                    student_vocab_size=self.tokenizer.vocab_size,
                    student_tokenizer=self.tokenizer,
                )
                pool.start_sync()
            except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                error = f"{type(e).__name__}: {e}"
        first = first_error(error)
        if first:
            if pool is not None:
                pool.close()
            raise RuntimeError(f"teacher pool failed to start, before any training step: {first}")
        return pool

    def _start_in_job(self, teachers) -> InJobTeachers:
        """The in-job teachers, opened and checked on every rank (each reads its own shards); every
        rank raises the first rank's error."""
        o = self.cfg.opd
        scorer = InJobTeachers(
            teachers,
            layout=self.trainer.layout,
            student_vocab_size=self.tokenizer.vocab_size,
            student_fingerprint=self.tokenizer.fingerprint,
            student_max_seq_len=self.cfg.model.max_seq_len,
            dtype=self.trainer.dtype,
            hidden_forward=self.teacher_hidden,
            replica_group=self.mp_group,
            resident=o.resident_teachers,
            weights=o.teacher_weights,
            prefetch=o.prefetch_teachers,
        )
        error = None
        try:
            scorer.start()
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            error = f"{type(e).__name__}: {e}"
        first = first_error(error)
        if first:
            scorer.close()
            raise RuntimeError(f"in-job teachers failed to load, before any training step: {first}")
        return scorer

    def _load_teacher_heads(self) -> dict[str, torch.Tensor]:
        """Output-layer shards of hidden-signal teachers, cut like the student's vocab shard."""
        from megatron.core import parallel_state

        heads = {}
        for name in self.teacher_names:
            teacher = self.cfg.teachers[name]
            if teacher.signal != "hidden":
                continue
            model_dir = read_model_dir(teacher.model_dir)
            heads[name] = load_output_layer_shard(
                model_dir.latest_checkpoint(),
                model_dir.model,
                student_padded_vocab=self.cfg.model.padded_vocab_size(self.trainer.layout.tp),
                tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                tp_size=self.trainer.layout.tp,
                dtype=self.trainer.dtype,  # cast once here, not per micro-batch
            ).to(device())
        return heads

    def teacher_hidden(self, model: torch.nn.Module, batch: Trajectories) -> torch.Tensor:
        """An in-job teacher's final hidden states [B, T, d] (float32, host) at every position of
        `batch`, on every rank of the replica: `Trainer.forward_only` with the teacher's chunk
        (its TP shard and PP stage), output layer bypassed. Collective over the replica."""
        from megatron.core import parallel_state

        def forward(chunk: torch.nn.Module, mb: MicroBatch) -> torch.Tensor:
            with output_layer_bypassed(chunk, gather_sequence=True):
                return logits_forward(chunk, mb)

        mbs = self.row_micro_batches(batch, range(len(batch)), lambda r: {})
        out = self.trainer.forward_only(mbs, lambda mb, h: h.float().cpu(), forward=forward, model=[model])
        hidden = torch.cat(out) if out else None
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:  # outputs are on the last stage
            hidden = broadcast_object(
                hidden, parallel_state.get_pipeline_model_parallel_last_rank(), parallel_state.get_pipeline_model_parallel_group()
            )
        return hidden

    # -- scoring and micro-batches ----------------------------------------------------------------

    def make_rollout(self, index: int) -> Rollout:
        if self.in_job is not None and not self._stored(index * self.updates_per_rollout):
            # The rollout's domains are known before it is sampled: read the first in-job teacher
            # to load while the student generates.
            domains = {p.domain for p in self.replica_prompts(index)}
            self.in_job.prefetch_for({self.domain_owner[d] for d in domains} & self.in_job_teachers)
        return super().make_rollout(index)

    def _stored(self, step: int) -> bool:
        """Whether the signal store holds this replica's signals of `step` (all ranks agree)."""
        if not self.cfg.opd.signal_store:
            return False
        return self.on_replica_source(lambda: self.store.is_written(step, self.trainer.dp_rank))

    def score(self, rollout: Rollout) -> list[TeacherSignals]:
        """Route every row to its domain's teacher and score it through that teacher's Scorer (or
        read a rollout already in the signal store, as after a restart); every rank of the
        replica gets the routing and the signals."""
        batch, step = rollout.batch, rollout.index * self.updates_per_rollout
        route_by_domain(batch, self.domain_owner)  # on every rank: a function of the domains
        if self._stored(step):
            signals = self.on_replica_source(lambda: self.store.read(step, batch.sample_ids))
            if self.in_job is not None:
                rollout.metrics.update(ScoreStats().metrics())  # nothing recomputed
            return signals
        signals = []
        for scorer, names in ((self.scorer, self.server_teachers), (self.in_job, self.in_job_teachers)):
            rows = [i for i, t in enumerate(batch.teacher) if t in names]
            if not rows:
                continue
            part = batch if len(rows) == len(batch) else batch.select(rows)
            if names is self.in_job_teachers:  # collective: every rank of the replica runs the models
                got = scorer.score(part)
                rollout.metrics.update(scorer.last_stats.metrics())
            else:  # HTTP on the replica's first rank, shared with the rest
                got = self.on_replica_source(lambda: scorer.score(part))
            index = torch.tensor(rows, dtype=torch.long)
            signals += [replace(s, rows=index[s.rows]) for s in got]
        signals.sort(key=lambda s: int(s.rows.min()))  # one order whatever the placements
        if self.store is not None:
            self.store.write(step, self.trainer.dp_rank, batch.sample_ids, signals)
        return signals

    def micro_batches(self, rollout: Rollout, rows: range) -> list[MicroBatch]:
        batch, signals = rollout.batch, rollout.scores
        domain_ids = torch.tensor([self.source.domains.index(d) for d in batch.domain])
        return self.row_micro_batches(
            batch,
            rows,
            lambda r: {
                "prompt_lens": batch.prompt_lens[r.start : r.stop],
                "domain_ids": domain_ids[r.start : r.stop],
                "signals": _signals_for_rows(signals, r),
            },
        )

    # -- forward and loss -------------------------------------------------------------------------

    def forward(self, model: torch.nn.Module, mb: MicroBatch) -> torch.Tensor:
        """Vocab-parallel logits, or (opd.fused_output_layer) the hidden states entering the output
        layer, so that the loss applies student and teacher heads chunk by chunk."""
        if not self.cfg.opd.fused_output_layer:
            return logits_forward(model, mb)
        with output_layer_bypassed(self.trainer.module):
            return logits_forward(model, mb)  # [b, s, h]

    def _student_output_weight(self) -> torch.Tensor:
        module = self.trainer.module
        return module.shared_embedding_or_output_weight() if self.cfg.model.tie_embeddings else module.output_layer.weight

    def loss(self, mb: MicroBatch, output: torch.Tensor):
        from megatron_opd import losses

        fused = self.cfg.opd.fused_output_layer
        prompt_lens = mb.host["prompt_lens"]
        vocab = self.tokenizer.vocab_size
        total = output.new_zeros((), dtype=torch.float32)
        count = 0
        reports: dict[str, torch.Tensor] = {}
        per_domain = torch.zeros(len(self.source.domains), 2, dtype=torch.float64, device=output.device)
        for s in mb.host["signals"]:
            teacher = self.cfg.teachers[s.teacher]
            # The student's output (logits or hidden) at the positions that predict each response
            # token, [N, V/tp] or [N, h], rows in the order of _flatten_responses.
            j = torch.arange(int(s.response_lens.max()))
            keep = j[None, :] < s.response_lens[:, None]
            pos = (prompt_lens[s.rows][:, None] - 1 + j[None, :])[keep]
            row_of = s.rows[:, None].expand_as(keep)[keep]
            student = output[row_of, pos]
            if fused and s.kind == "hidden":
                kl = losses.fused_linear_reverse_kl(
                    student,
                    self._student_output_weight(),
                    _flatten_responses(s.hidden, s.response_lens).to(student.device, student.dtype),
                    self.heads[s.teacher].to(student.dtype),
                    temperature=teacher.temperature,
                    vocab_size=vocab,
                    group=self.tp_group,
                    chunk_size=self.cfg.opd.fused_chunk_size,
                )
                total = total + kl.sum()
            else:
                if fused:  # the other signal kinds need this rows' logits: form them here
                    student = student @ self._student_output_weight().t()
                kl, surrogate, extra = self._unfused_kl(s, teacher, student, mb.tokens[row_of, pos + 1])
                total = total + (kl.sum() if surrogate is None else surrogate.sum())
                reports.update(extra)
            count += kl.numel()
            reports[f"kl/{s.teacher}"] = metric(kl.sum(), kl.numel())
            self._add_domain(per_domain, mb.host["domain_ids"][row_of], kl)
        for d, (ksum, n) in zip(self.source.domains, per_domain.tolist()):
            if n:
                reports[f"kl_domain/{d}"] = metric(ksum, n)
        reports["kl"] = metric(per_domain[:, 0].sum(), per_domain[:, 1].sum())
        if count == 0:  # every row empty: keep the graph connected so backward still runs
            total = output.sum() * 0.0
        return total, torch.tensor(count, dtype=torch.int, device=output.device), reports

    def _unfused_kl(self, s: TeacherSignals, teacher, student: torch.Tensor, tokens: torch.Tensor):
        """(per-token KL, surrogate to minimise instead of the KL or None, extra metrics)."""
        from megatron_opd import losses

        vocab, group = self.tokenizer.vocab_size, self.tp_group
        if s.kind in ("hidden", "logits"):
            if s.kind == "hidden":
                hidden = _flatten_responses(s.hidden, s.response_lens).to(student.device, student.dtype)
                teacher_logits = hidden @ self.heads[s.teacher].to(student.dtype).t()
            else:
                teacher_logits = self._shard_full_vocab(_flatten_responses(s.logits, s.response_lens), student)
            kl = losses.vocab_parallel_reverse_kl(
                student, teacher_logits, temperature=teacher.temperature, vocab_size=vocab, group=group
            )
            return kl, None, {}
        if s.kind == "topk":
            out = losses.topk_reverse_kl(
                student,
                _flatten_responses(s.topk_ids, s.response_lens).to(student.device),
                _flatten_responses(s.topk_logprobs, s.response_lens).to(student.device),
                vocab_size=vocab,
                group=group,
            )
            return out.kl, None, {f"topk_mass/{s.teacher}": metric(out.teacher_mass.sum(), out.teacher_mass.numel())}
        # sampled: the k1 estimate, minimised through its policy-gradient surrogate
        student_lp = losses.vocab_parallel_logprobs(student, tokens[:, None], vocab_size=vocab, group=group).squeeze(-1)
        teacher_lp = _flatten_responses(s.sampled_logprobs, s.response_lens).to(student_lp.device, student_lp.dtype)
        return losses.sampled_reverse_kl(student_lp, teacher_lp), losses.sampled_kl_policy_loss(student_lp, teacher_lp), {}

    @staticmethod
    def _add_domain(per_domain: torch.Tensor, domain_ids: torch.Tensor, kl: torch.Tensor) -> None:
        detached = kl.detach().to(torch.float64)
        domain_ids = domain_ids.to(kl.device)
        per_domain[:, 0].index_add_(0, domain_ids, detached)
        per_domain[:, 1].index_add_(0, domain_ids, torch.ones_like(detached))

    def _shard_full_vocab(self, full: torch.Tensor, student_shard: torch.Tensor) -> torch.Tensor:
        """Cut [N, V] teacher values to this rank's [N, V/tp] vocabulary shard (padding: -inf)."""
        from megatron.core import parallel_state

        shard = student_shard.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * shard
        out = full.new_full((full.shape[0], shard), float("-inf"))
        cols = max(0, min(full.shape[1], start + shard) - start)
        out[:, :cols] = full[:, start : start + cols]
        return out.to(student_shard.device, student_shard.dtype)

    # -- around the step --------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.scorer is not None:
                self.scorer.close()
        finally:
            if self.in_job is not None:
                self.in_job.close()
