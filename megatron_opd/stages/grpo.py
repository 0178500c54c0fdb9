"""GRPO as DeepSeek-V3.2 runs it (notes/opd-math.md section 5), a short stage on the on-policy skeleton.

One rollout batch k (optimizer steps [k U, (k + 1) U), U = grpo.updates_per_batch):

    B prompts x G samples                 the skeleton's prompts (a group's rows adjacent), sampled
                                          by the RolloutEngine and verified by each domain's Reward
 [-> dynamic sampling]                    groups whose rewards are all equal are dropped and refilled
                                          from prompt batches reserved for rollout k (below)
 -> score                                 A_i = R_i - mean of the group (/ std: grpo.advantage_scale);
                                          old log-probs = the sampler's own (V3.2): `kept_logprobs`
                                          when the kept sets are used, else `behavior_logprobs`;
                                          reference log-probs (grpo.kl_coef > 0 only) by a
                                          forward-only pass of the frozen initial weights
 -> U optimizer steps                     log pi_theta of the response tokens, vocab-parallel,
                                          renormalised over the kept sets; `grpo_token_loss`
                                          (clip, unbiased KL, off-policy sequence masking) weighted
                                          by `aggregation_weights`; later updates are off-policy
 -> weight sync                           the skeleton's, after the rollout's last update

Keep sampling mask (grpo.keep_sampling_mask, default true). When the sampler truncates (top_p < 1,
top_k > 0, min_p > 0), the rollout carries the kept set of every response position; pi_theta and
pi_ref are then renormalised over it (`vocab_parallel_logprobs(kept_ids=...)`) and the old policy
is the sampler's `kept_logprobs`, so all three act on the truncated distribution the tokens were
drawn from. A rollout without kept sets under truncating sampling is an error naming
rollout.engine. With keep_sampling_mask=false, every log-prob is over the full vocabulary (old =
`behavior_logprobs`, SGLang's log-prob before truncation): the ratio then ignores the truncation,
as most GRPO implementations do, and tokens the sampler could never draw still move pi_theta.

Dynamic sampling (DAPO; grpo.dynamic_sampling). With R = grpo.refill_rounds, rollout k reads
prompt batches k (1 + R) + c of the skeleton's size, c = 0 (the rollout) .. R (its refills): every
refill prompt is fixed by (k, c), so a resumed run refills exactly as an uninterrupted one, and
no prompt can be trained in two rollouts. Refill c is sampled with its own seeds. Every replica
refills until every replica has its B groups with unequal rewards (the generation and the
verification are collective); groups left short after R refills are filled with dropped groups
(advantage 0) and counted. The trained rows are the first B such groups in prompt order;
rollout metrics (reward, accuracy, lengths, time-outs) describe the unfiltered rollout (c = 0),
an unbiased view of the policy, and `dynamic/*` what the filter did.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_opd.data.prompts import Prompt, replica_slice, repeat_for_group
from megatron_opd.data.trajectories import Trajectories, concat
from megatron_opd.rollout.embedded import truncates
from megatron_opd.rollout.config import SamplingParams
from megatron_opd.stages.evaluation import sum_over_replicas
from megatron_opd.stages.on_policy import OnPolicyStage, Rollout
from megatron_opd.stages.trainer import MicroBatch, logits_forward, metric

# The (sum, count) metrics grpo_token_loss returns, reported overall and per domain.
LOSS_METRICS = ("clip_low", "clip_high", "opsm_masked", "ratio", "kl")


def old_policy(batch: Trajectories, params: SamplingParams, *, keep_sampling_mask: bool, engine: str):
    """(old log-probs [B, R], kept ids [B, R, K] or None): what the ratio's denominator is and
    whether pi_theta is renormalised over kept sets. The sampler's own numbers, never recomputed."""
    if keep_sampling_mask and truncates(params):
        if batch.kept_ids is None or batch.kept_logprobs is None:
            raise RuntimeError(
                f"rollout.engine={engine} returned no kept sets, but the sampling truncates (rollout.top_p="
                f"{params.top_p}, top_k={params.top_k}, min_p={params.min_p}) and grpo.keep_sampling_mask=true "
                f"renormalises pi_theta over them: use an engine that returns them (rollout.engine=embedded), "
                f"or set grpo.keep_sampling_mask=false"
            )
        return batch.kept_logprobs, batch.kept_ids
    if batch.behavior_logprobs is None:
        raise RuntimeError(f"rollout.engine={engine} returned no log-probs of the sampled tokens; GRPO's ratio needs them")
    return batch.behavior_logprobs, None


class GRPOStage(OnPolicyStage):
    name = "grpo"
    progress_keys = ["reward", "rollout_acc", "kl", "acc/mean"]
    finite_metrics = ["loss", "kl"]
    forward = staticmethod(logits_forward)

    def __init__(self, cfg, trainer, tokenizer):
        g = cfg.grpo
        super().__init__(cfg, trainer, tokenizer, group_size=g.group_size, updates_per_rollout=g.updates_per_batch)

    # -- set-up -----------------------------------------------------------------------------------

    def setup(self) -> None:
        # The config's checks (group size, ranges, a reference source when kl_coef > 0) ran before
        # launch: JobConfig.check, config/stages.py check_grpo.
        g = self.cfg.grpo
        self.temperature = self.cfg.rollout.temperature
        self.reference: list[torch.nn.Module] | None = self._load_reference() if g.kl_coef > 0 else None

    def _load_reference(self) -> list[torch.nn.Module]:
        """The frozen reference: a model of the trainer's layout with the initial weights (never
        the resumed checkpoint's: the KL is to where the run started)."""
        from megatron_opd.models.gpt import build_gpt_model

        g = self.cfg.grpo
        key, path = ("grpo.reference", g.reference) if g.reference else ("train.init_from", self.cfg.train.init_from)
        if not path:
            raise ValueError(f"grpo.kl_coef={g.kl_coef} > 0 needs reference weights: set train.init_from or grpo.reference")
        model = build_gpt_model(self.cfg.model, self.trainer.layout, dtype=self.trainer.dtype)
        model.requires_grad_(False)
        self.trainer.load_weights(path, [model], key=key)
        return [model.eval()]

    # -- sampling ---------------------------------------------------------------------------------

    def replica_prompts(self, index: int, refill: int = 0) -> list[Prompt]:
        """This replica's prompts of rollout `index` (refill batch `refill` of it), each G times."""
        g = self.cfg.grpo
        batch = index * (1 + g.refill_rounds) + refill if g.dynamic_sampling else index
        indices = replica_slice(batch, self.prompts_per_rollout, self.trainer.dp_rank, self.trainer.dp_size)
        return repeat_for_group(self.source.prompts(indices.start, len(indices)), self.group_size)

    def verify(self, rollout: Rollout) -> dict[str, float]:
        """The skeleton's accuracy plus reward, response length and verifier time-outs per domain,
        and the fraction of groups whose rewards are all equal (no advantage), over all replicas."""
        out = super().verify(rollout)
        batch, counts, domains = rollout.batch, rollout.domain_counts, self.source.domains
        lengths = torch.zeros(len(domains) + 1, 2, dtype=torch.float64)  # per domain: tokens; last row: groups
        index = {d: i for i, d in enumerate(domains)}
        for d, n in zip(batch.domain, batch.response_lens.tolist()):
            lengths[index[d], 0] += n
        flat = _flat_groups(batch.rewards, self.group_size)
        lengths[-1] = torch.tensor([float(flat.sum()), float(len(flat))])
        lengths = sum_over_replicas(lengths)
        for i, (d, (_, reward, n, timed_out)) in enumerate(zip(domains, counts.tolist())):
            if n:
                out[f"reward/{d}"] = reward / n
                out[f"timed_out/{d}"] = timed_out / n
                out[f"response_len/{d}"] = float(lengths[i, 0]) / n
        total = counts.sum(0)
        out["reward"] = float(total[1] / total[2])
        out["timed_out"] = float(total[3] / total[2])
        out["groups_all_equal"] = float(lengths[-1, 0] / lengths[-1, 1])
        return out

    def sample(self, index: int) -> Rollout:
        if not self.cfg.grpo.dynamic_sampling:
            return super().sample(index)
        g, size = self.cfg.grpo, self.group_size
        need = self.prompts_per_rollout // self.trainer.dp_size  # groups this replica trains on
        parts: list[Rollout] = []
        varied = 0
        for refill in range(1 + g.refill_rounds):
            part = self.sample_prompts(index, self.replica_prompts(index, refill), refill=refill)
            parts.append(part)
            varied += int((~_flat_groups(part.batch.rewards, size)).sum())
            if not _any_rank(varied < need):
                break
        return self._assemble(index, parts, need)

    def _assemble(self, index: int, parts: list[Rollout], need: int) -> Rollout:
        """The rollout of the first `need` groups with unequal rewards over `parts` (the rollout and
        its refills, in order), short ones filled with dropped groups; metrics of parts[0]."""
        size = self.group_size
        groups: list[tuple[int, int]] = []  # (part, group) with unequal rewards, then the others
        dropped: list[tuple[int, int]] = []
        for p, part in enumerate(parts):
            for j, flat in enumerate(_flat_groups(part.batch.rewards, size).tolist()):
                (dropped if flat else groups).append((p, j))
        unfilled = max(0, need - len(groups))
        chosen = (groups + dropped)[:need]
        chosen.sort()  # prompt order: the rollout's groups first, then each refill's
        offsets = [0]
        for part in parts:
            offsets.append(offsets[-1] + len(part.batch))
        rows = [offsets[p] + j * size + k for p, j in chosen for k in range(size)]
        batch = concat([part.batch for part in parts], self.tokenizer.pad_id).select(rows)
        prompts = [pr for part in parts for pr in part.prompts]
        rollout = Rollout(index, [prompts[r] for r in rows], batch, domain_counts=parts[0].domain_counts)
        rollout.metrics = dict(parts[0].metrics)
        stats = sum_over_replicas(torch.tensor([len(groups) + len(dropped), len(dropped), unfilled, need], dtype=torch.float64))
        generation_s = sum(part.metrics["rollout_time_s"] for part in parts)
        tokens = sum(float(part.batch.response_lens.sum()) for part in parts) * self.trainer.dp_size
        rollout.metrics.update({
            "rollout_time_s": generation_s,
            "rollout_tokens_per_s": tokens / max(generation_s, 1e-9),
            "dynamic/dropped_frac": float(stats[1] / stats[0]),
            "dynamic/unfilled_frac": float(stats[2] / stats[3]),
            "dynamic/refill_rounds": float(len(parts) - 1),
        })  # fmt: skip
        return rollout

    # -- scoring and micro-batches ----------------------------------------------------------------

    def score(self, rollout: Rollout) -> dict[str, Any]:
        """Advantages, the old policy's log-probs and (kl_coef > 0) the reference's, [B] / [B, R]."""
        from megatron_opd.losses import group_advantages

        g, batch = self.cfg.grpo, rollout.batch
        advantages = group_advantages(batch.rewards, group_size=self.group_size, scale=g.advantage_scale)
        old, kept = old_policy(batch, self.cfg.rollout.sampling, keep_sampling_mask=g.keep_sampling_mask,
                               engine=self.cfg.rollout.engine)  # fmt: skip
        ref = self._reference_logprobs(batch, kept) if self.reference is not None else None
        rollout.metrics["advantage_abs"] = float(advantages.abs().mean())
        return {"advantages": advantages, "old": old.float(), "ref": ref, "kept": kept is not None}

    def _reference_logprobs(self, batch: Trajectories, kept: torch.Tensor | None) -> torch.Tensor:
        """[B, R] log pi_ref of the response tokens (over the kept sets when given), on every rank."""
        from megatron.core import parallel_state

        mbs = self.micro_batches_of(batch, range(len(batch)), kept=kept, extra=lambda r: {})
        out = self.trainer.forward_only(
            mbs, lambda mb, logits: self.response_logprobs(mb, logits)[0].detach().float().cpu(), model=self.reference
        )
        ref = torch.cat(out) if out else None
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:  # kept in every rank's rollout state
            from megatron_opd.runtime.distributed import broadcast_object

            last = parallel_state.get_pipeline_model_parallel_last_rank()
            ref = broadcast_object(ref, last, parallel_state.get_pipeline_model_parallel_group())
        return ref

    def micro_batches_of(self, batch: Trajectories, rows: range, *, kept: torch.Tensor | None, extra) -> list[MicroBatch]:
        """Micro-batches of `rows` with what `response_logprobs` reads, plus `extra(r)`."""
        domain_ids = torch.tensor([self.source.domains.index(d) for d in batch.domain])
        width = batch.max_response_len  # per-token tensors may be wider (joined refill batches)

        def host(r: range) -> dict[str, Any]:
            out = {
                "prompt_lens": batch.prompt_lens[r.start : r.stop],
                "response_lens": batch.response_lens[r.start : r.stop],
                "kept": kept[r.start : r.stop, :width] if kept is not None else None,
                "domain_ids": domain_ids[r.start : r.stop],
                "width": width,
            }
            out.update(extra(r))
            return out

        return self.row_micro_batches(batch, rows, host)

    def micro_batches(self, rollout: Rollout, rows: range) -> list[MicroBatch]:
        batch, s = rollout.batch, rollout.scores
        kept = batch.kept_ids if s["kept"] else None

        def extra(r: range) -> dict[str, Any]:
            width = batch.max_response_len
            return {
                "old": s["old"][r.start : r.stop, :width],
                "advantages": s["advantages"][r.start : r.stop],
                "ref": s["ref"][r.start : r.stop, :width] if s["ref"] is not None else None,
            }

        return self.micro_batches_of(batch, rows, kept=kept, extra=extra)

    # -- log-probs and the loss -------------------------------------------------------------------

    def response_logprobs(self, mb: MicroBatch, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-probs [b, R] of the response tokens under softmax(z / T), renormalised over the
        kept sets when the micro-batch has them, 0 off the response; the mask [b, R]; the logit
        rows [N, V/tp] that predict the N response tokens, in mask order)."""
        from megatron_opd.losses import vocab_parallel_logprobs

        h = mb.host
        on = logits.device
        j = torch.arange(h["width"])
        mask = j[None, :] < h["response_lens"][:, None]
        rows = torch.arange(mask.shape[0])[:, None].expand_as(mask)[mask]
        pos = (h["prompt_lens"][:, None] - 1 + j[None, :])[mask]
        student = logits[rows.to(on), pos.to(on)]
        targets = mb.tokens[rows.to(on), (pos + 1).to(on)]
        kept = h["kept"][mask].to(on) if h["kept"] is not None else None
        lp = vocab_parallel_logprobs(
            student, targets[:, None], temperature=self.temperature, vocab_size=self.tokenizer.vocab_size,
            group=self.tp_group, kept_ids=kept,
        ).squeeze(-1)  # fmt: skip
        out = lp.new_zeros(mask.shape)
        out[mask.to(on)] = lp
        return out, mask.to(on), student

    def loss(self, mb: MicroBatch, logits: torch.Tensor):
        from megatron_opd.losses import aggregation_weights, grpo_token_loss, vocab_parallel_entropy

        g, h = self.cfg.grpo, mb.host
        logprobs, mask, student = self.response_logprobs(mb, logits)
        on = logprobs.device
        weights = aggregation_weights(mask, g.aggregation)
        per_token = torch.zeros_like(logprobs)
        domain_ids = h["domain_ids"].to(on)
        reports: dict[str, torch.Tensor] = {}
        totals: dict[str, torch.Tensor] = {}
        # Per domain: the same loss row by row, with each domain's own metrics.
        for d in torch.unique(h["domain_ids"]).tolist():
            rows = (domain_ids == d).nonzero().flatten()
            loss_d, metrics = grpo_token_loss(
                logprobs[rows], h["old"].to(on)[rows], h["advantages"].to(on)[rows], mask[rows],
                ref_logprobs=h["ref"].to(on)[rows] if h["ref"] is not None else None,
                eps_low=g.eps_low, eps_high=g.eps_high, kl_coef=g.kl_coef, opsm_delta=g.opsm_delta,
            )  # fmt: skip
            per_token = per_token.index_put((rows,), loss_d)
            name = self.source.domains[d]
            for k, v in metrics.items():
                reports[f"{k}/{name}"] = v
                totals[k] = totals[k] + v if k in totals else v
        reports.update(totals)
        # The policy's entropy over the full vocabulary at the response positions (a metric).
        entropy = vocab_parallel_entropy(
            student.detach(), temperature=self.temperature, vocab_size=self.tokenizer.vocab_size, group=self.tp_group
        ).double()
        token_domain = domain_ids[:, None].expand_as(mask)[mask]
        per_domain = torch.zeros(len(self.source.domains), 2, dtype=torch.float64, device=on)
        per_domain[:, 0].index_add_(0, token_domain, entropy)
        per_domain[:, 1].index_add_(0, token_domain, torch.ones_like(entropy))
        for d, (total, n) in zip(self.source.domains, per_domain.tolist()):
            if n:
                reports[f"entropy/{d}"] = metric(total, n)
        reports["entropy"] = metric(per_domain[:, 0].sum(), per_domain[:, 1].sum())
        total = (weights.weights.to(on) * per_token).sum()
        count = weights.count.to(on)
        reports["loss"] = metric(total, count)
        if int(count) == 0:  # no response token: keep the graph connected so backward still runs
            total = logits.sum() * 0.0
        return total, count, reports

    def teardown(self) -> None:
        self.reference = None


def _flat_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[groups] bool: the groups (adjacent rows) whose rewards are all equal (advantage 0)."""
    grouped = rewards.reshape(-1, group_size)
    return (grouped == grouped[:, :1]).all(dim=1)


def _any_rank(flag: bool) -> bool:
    """Whether `flag` holds on any rank of the world (collective)."""
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
