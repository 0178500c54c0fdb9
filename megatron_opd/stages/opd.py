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
score it through the `Scorer`, optionally keep the signals in a TeacherStore) and the loss. Within a
data-parallel replica only the first model-parallel rank talks to the teachers; the signals reach
the rest of its group from it.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
import torch.distributed as dist

from megatron_opd.data.trajectories import SIGNAL_FIELDS, TeacherSignals
from megatron_opd.models.heads import load_output_layer_shard
from megatron_opd.models.model_dir import read_model_dir
from megatron_opd.runtime.distributed import device, first_error
from megatron_opd.stages.on_policy import OnPolicyStage, Rollout
from megatron_opd.stages.trainer import MicroBatch, logits_forward, metric
from megatron_opd.teachers.scorer import Scorer


@contextlib.contextmanager
def output_layer_bypassed(model: torch.nn.Module):
    """Make megatron's output layer hand back its input: GPTModel.forward then returns the final
    (post-norm) hidden states [b, s, h] instead of logits, for losses that apply the head themselves."""
    layer = model.output_layer
    layer.forward = lambda input_, weight=None, runtime_gather_output=None: (input_, None)
    try:
        yield
    finally:
        del layer.forward


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
        # The config's checks (teachers for every domain, signal and temperature, fused output
        # layer) ran before launch: JobConfig.check, config/stages.py.
        cfg = self.cfg
        self.teacher_names = sorted(cfg.teachers)
        self.scorer: Scorer | None = self._start_pool()
        self.store = None
        if cfg.opd.signal_store and dist.get_rank() == self.mp_src:
            from megatron_opd.teachers.store import TeacherStore

            # float32: signals read back after a restart must equal the ones first scored.
            self.store = TeacherStore(cfg.opd.signal_store, hidden_dtype="float32")
        self.heads = self._load_teacher_heads()

    def _start_pool(self) -> Scorer | None:
        """Start the pool on the replica's first rank; every rank raises the same error if it fails."""
        from megatron_opd.teachers.pool import TeacherPool

        pool, error = None, None
        if dist.get_rank() == self.mp_src:
            try:
                pool = TeacherPool(
                    self.cfg.teachers,
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

    # -- scoring and micro-batches ----------------------------------------------------------------

    def score(self, rollout: Rollout) -> list[TeacherSignals]:
        """Route and score on the replica's first rank (or read a rollout already in the signal
        store, as after a restart); every rank of the replica gets the routing and the signals."""
        batch, step = rollout.batch, rollout.index * self.updates_per_rollout

        def route_and_score():
            routed = self.scorer.route(batch)
            part = self.trainer.dp_rank
            if self.store is not None and self.store.is_written(step, part):
                signals = self.store.read(step, routed.sample_ids)
            else:
                signals = self.scorer.score(routed)
                if self.store is not None:
                    self.store.write(step, part, routed.sample_ids, signals)
            return routed.teacher, signals

        batch.teacher, signals = self.on_replica_source(route_and_score)
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
        if self.scorer is not None:
            self.scorer.close()
