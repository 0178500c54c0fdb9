"""The on-policy skeleton: what every stage that trains on the student's own samples shares.

OPD is a short stage on it; GRPO, the GRM stage and SFT from rollouts are meant to be. One
rollout batch of a data-parallel replica:

    prompts by global index             rollout k takes `replica_slice(k, prompts_per_rollout, ...)`
                                        of the PromptSource, each prompt `group_size` times with
                                        its own sample id (so its own sampling seed)
 -> RolloutEngine.generate              Trajectories (embedded in-job, or SGLang over HTTP)
 -> verify                              each domain's Reward on the replica's first rank:
                                        `Trajectories.rewards`, rollout accuracy per domain
 -> stage.score(rollout)                the stage's own signal: teacher signals (OPD), advantages
                                        and old/reference log-probs (GRPO, `Trainer.forward_only`),
                                        verdicts (GRM)
 -> `updates_per_rollout` optimizer steps, update u on the rows [u n, (u + 1) n) of the rollout
    (n = the replica's share of train.global_batch_size): stage.micro_batches(rollout, rows),
    then the trainer's forward/backward with stage.forward and stage.loss
 -> RolloutEngine.sync_weights          after the last update of every `rollout.sync_every`-th
                                        rollout, so the next rollout samples the new weights

So train.global_batch_size counts trajectories per optimizer step, and a rollout holds
global_batch_size x updates_per_rollout trajectories = that / group_size prompts. The step is the
whole data cursor: rollout k = step // updates_per_rollout. A checkpoint inside a rollout keeps
that rollout (every replica's, in the stage state), because the weights that sampled it are gone:
the resumed run trains on exactly the samples an uninterrupted one would.

A stage supplies `score`, `micro_batches`, `forward`, `loss`, and the class attributes `name`,
`progress_keys`, `finite_metrics`; `setup()` is where it builds what it needs (teacher pools,
reference weights) before the rollout engine starts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import torch
import torch.distributed as dist

from megatron_opd.config import JobConfig
from megatron_opd.data.prompts import Prompt, replica_slice, repeat_for_group
from megatron_opd.data.sources import job_prompt_source, source_metrics
from megatron_opd.data.tokenizer import Tokenizer
from megatron_opd.data.trajectories import Trajectories
from megatron_opd.rewards.registry import rewards_for
from megatron_opd.rollout.embedded import responses
from megatron_opd.rollout.engine import EmbeddedRolloutEngine, RolloutEngine
from megatron_opd.runtime.distributed import on_replica_source, replica_group_and_src
from megatron_opd.stages.evaluation import evaluate_held_out, verify_by_domain
from megatron_opd.stages.trainer import MicroBatch, StepBatch, Trainer


@dataclass
class Rollout:
    """One rollout batch of this data-parallel replica (the same on all of its ranks)."""

    index: int  # rollout number: optimizer steps [index * U, (index + 1) * U) train on it
    prompts: list[Prompt]  # one per row, in row order (a group's samples are adjacent)
    batch: Trajectories  # `rewards` filled by the verification
    # [D, 4] float64 [correct, reward sum, samples, timed out] per domain of the source, summed
    # over the replicas (what per-domain reward, accuracy and time-out metrics come from).
    domain_counts: torch.Tensor | None = None
    # What the stage's `score` returned. A checkpoint inside the rollout keeps it, so it must be
    # made of tensors, numbers, strings, lists and dicts (checkpoints load with weights_only).
    scores: Any = None
    metrics: dict[str, float] = field(default_factory=dict)  # reported with the rollout's first update


def make_rollout_engine(cfg: JobConfig, trainer: Trainer, tokenizer: Tokenizer) -> RolloutEngine:
    r = cfg.rollout
    if r.engine == "embedded":
        return EmbeddedRolloutEngine(r, trainer.module, tokenizer, max_len=cfg.model.max_seq_len, seed=cfg.run.seed)
    from megatron_opd.rollout.sglang import SGLangRolloutEngine

    return SGLangRolloutEngine(r, trainer, tokenizer, max_len=cfg.model.max_seq_len, seed=cfg.run.seed)


class OnPolicyStage:
    """Base of the stages that train on the student's own samples (module docstring): it owns
    the prompt source, the rewards, the rollout engine (`engine`) and the rollout being trained
    on (`current`), and implements the trainer's `Stage` interface around the hooks below."""

    name: str
    progress_keys: list[str]
    finite_metrics: list[str]

    def __init__(
        self, cfg: JobConfig, trainer: Trainer, tokenizer: Tokenizer, *, group_size: int = 1, updates_per_rollout: int = 1
    ):
        from megatron.core import parallel_state

        self.cfg, self.trainer, self.tokenizer = cfg, trainer, tokenizer
        self.group_size, self.updates_per_rollout = group_size, updates_per_rollout
        if updates_per_rollout < 1:
            raise ValueError(f"{self.name}: {updates_per_rollout} updates per rollout; it needs at least 1")
        trajectories = cfg.train.global_batch_size * updates_per_rollout
        if trajectories % (group_size * trainer.dp_size):
            raise ValueError(
                f"train.global_batch_size={cfg.train.global_batch_size} x {updates_per_rollout} updates per rollout "
                f"= {trajectories} samples do not split into groups of {group_size} over {trainer.dp_size} "
                f"data-parallel replicas"
            )
        self.prompts_per_rollout = trajectories // group_size
        self.source = job_prompt_source(cfg, tokenizer)  # file rows checked against the token limits
        self.reward_of = rewards_for(self.source)  # unknown reward names fail here, before any step
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.mp_group, self.mp_src = replica_group_and_src()
        self.current: Rollout | None = None
        self.setup()
        self.engine = make_rollout_engine(cfg, trainer, tokenizer)

    # -- what a stage supplies --------------------------------------------------------------------

    def setup(self) -> None:
        """Build what the stage needs before the rollout engine starts (pools, reference weights)."""

    def score(self, rollout: Rollout) -> Any:
        """The stage's signal for a rollout (collective over the replica); stored in
        `rollout.scores`. It may add metrics to `rollout.metrics`."""
        raise NotImplementedError

    def micro_batches(self, rollout: Rollout, rows: range) -> list[MicroBatch]:
        """The micro-batches of one update, over rows `rows` of the rollout."""
        raise NotImplementedError

    def teardown(self) -> None:
        """Release what `setup` built."""

    # -- one rollout ------------------------------------------------------------------------------

    def replica_prompts(self, index: int) -> list[Prompt]:
        """Rollout `index`'s prompts for this replica, each repeated for its group."""
        indices = replica_slice(index, self.prompts_per_rollout, self.trainer.dp_rank, self.trainer.dp_size)
        return repeat_for_group(self.source.prompts(indices.start, len(indices)), self.group_size)

    def make_rollout(self, index: int) -> Rollout:
        rollout = self.sample(index)
        t0 = time.perf_counter()
        rollout.scores = self.score(rollout)  # which may add its own metrics to rollout.metrics
        rollout.metrics["score_time_s"] = time.perf_counter() - t0
        return rollout

    def sample(self, index: int) -> Rollout:
        """Rollout `index` of this replica, generated and verified (`batch.rewards`, the rollout
        metrics). A stage that draws further prompts (GRPO's dynamic sampling) overrides it."""
        return self.sample_prompts(index, self.replica_prompts(index))

    def sample_prompts(self, index: int, prompts: list[Prompt], refill: int = 0) -> Rollout:
        """`prompts` sampled for rollout `index` (refill batch `refill` of it: its own seeds) and
        verified, with the generation's time and tokens/s (collective over the world)."""
        t0 = time.perf_counter()
        batch = self.engine.generate(prompts, index * self.updates_per_rollout, refill=refill)
        t_rollout = time.perf_counter() - t0
        rollout = Rollout(index, prompts, batch)
        rollout.metrics = self.verify(rollout)
        rollout.metrics["rollout_time_s"] = t_rollout
        rollout.metrics["rollout_tokens_per_s"] = float(batch.response_lens.sum()) * self.trainer.dp_size / max(t_rollout, 1e-9)
        return rollout

    def verify(self, rollout: Rollout) -> dict[str, float]:
        """Each sample's reward (into `batch.rewards`) and the rule-verified accuracy per domain
        and overall, over all replicas."""
        batch = rollout.batch
        domains = self.source.domains
        results, counts = verify_by_domain(domains, rollout.prompts, responses(batch, self.tokenizer), self.reward_of)
        batch.rewards = torch.tensor([r.score for r in results], dtype=torch.float32)
        rollout.domain_counts = counts
        out = {f"rollout_acc/{d}": float(c / n) for d, (c, _, n, _) in zip(domains, counts.tolist()) if n}
        total = counts.sum(0)
        out["rollout_acc"] = float(total[0] / total[2])
        out["response_len"] = float(batch.response_lens.float().mean())
        return out

    def on_replica_source(self, compute: Callable[[], Any]) -> Any:
        """`compute()` on the replica's first rank (the one that talks to servers), its result on
        every rank of the replica."""
        return on_replica_source(compute, self.mp_src, self.mp_group)

    # -- helpers for micro-batches and forward-only passes ------------------------------------------

    def row_micro_batches(self, batch: Trajectories, rows: range, host: Callable[[range], dict[str, Any]]) -> list[MicroBatch]:
        """Rows `rows` of `batch` cut into micro-batches of train.micro_batch_size; `host(r)` gives
        the host-side loss inputs of the micro-batch of rows r. With rollout.keep_routing each
        micro-batch carries its rows' routed experts, which the trainer's forwards replay."""
        size = self.cfg.train.micro_batch_size
        positions = torch.arange(batch.tokens.shape[1]).expand_as(batch.tokens)
        routed = self.routed_experts_of(batch)
        out = []
        for start in range(rows.start, rows.stop, size):
            r = range(start, min(start + size, rows.stop))
            mb = MicroBatch(batch.tokens[r.start : r.stop], positions[r.start : r.stop], host=host(r))
            mb.routed_experts = routed[r.start : r.stop] if routed is not None else None
            out.append(mb)
        return out

    def routed_experts_of(self, batch: Trajectories) -> torch.Tensor | None:
        """The batch's routed experts when rollout.keep_routing is on (an error if the rollout
        engine did not record them), else None."""
        if not self.cfg.rollout.keep_routing:
            return None
        if batch.routed_experts is None:
            raise RuntimeError(
                f"rollout.keep_routing=true but the {self.cfg.rollout.engine} rollout engine returned no routed experts"
            )
        return batch.routed_experts

    def rollout_logprobs(self, batch: Trajectories, model: list[torch.nn.Module] | None = None) -> torch.Tensor | None:
        """[B, T - 1] next-token log-probs of a whole rollout batch from a forward-only pass with
        the trainer's current weights (old-policy log-probs) or `model`'s (reference chunks of the
        same layout); None on pipeline stages before the last, which compute no loss.
        `gather_response(lp, prompt_lens, response_lens, offset=-1)` aligns them to the response."""
        mbs = self.row_micro_batches(batch, range(len(batch)), lambda r: {})
        out = self.trainer.forward_only(mbs, self.next_token_logprobs, model=model)
        return torch.cat(out) if out else None

    def next_token_logprobs(self, mb: MicroBatch, logits: torch.Tensor) -> torch.Tensor:
        """[b, s - 1] log p(token t + 1 | tokens <= t) under the model, float32 on the host: what
        a forward-only pass collects for old-policy or reference log-probs. Response token j of
        row i is at position prompt_len_i - 1 + j."""
        from megatron_opd.losses import vocab_parallel_logprobs

        targets = mb.tokens[:, 1:].to(logits.device)
        lp = vocab_parallel_logprobs(
            logits[:, :-1], targets[..., None], vocab_size=self.tokenizer.vocab_size, group=self.tp_group
        )
        return lp.squeeze(-1).float().cpu()

    # -- the trainer's Stage interface --------------------------------------------------------------

    def make_batch(self, step: int) -> StepBatch:
        index, update = divmod(step, self.updates_per_rollout)
        if self.current is None or self.current.index != index:
            if update:
                raise RuntimeError(
                    f"step {step} is update {update} of rollout {index}, which neither this run nor its "
                    f"checkpoint holds; resume from a checkpoint saved by this stage"
                )
            self.current = self.make_rollout(index)
        rollout = self.current
        n = self.trainer.samples_per_rank
        rows = range(update * n, (update + 1) * n)
        metrics = dict(rollout.metrics) if update == 0 else {}
        metrics.update(source_metrics(self.source))  # rows data.bad_rows=drop left out
        return StepBatch(self.micro_batches(rollout, rows), [rollout.batch.sample_ids[i] for i in rows], metrics)

    def after_step(self, step: int) -> dict[str, float]:
        done = step + 1
        rollouts_done, inside = divmod(done, self.updates_per_rollout)
        if inside == 0 and rollouts_done % self.cfg.rollout.sync_every == 0:
            return self.engine.sync_weights(done)
        return {}

    def evaluate(self, step: int) -> dict[str, float]:
        return evaluate_held_out(self.cfg, self.trainer.module, self.source, self.tokenizer, self.reward_of)

    def state_dict(self) -> dict[str, Any]:
        """The rollout a checkpoint falls inside, every replica's (collective: `Trainer.save`
        calls it on every rank). Prompts and seeds derive from the step, so at a rollout boundary
        the step (saved by the trainer) is the whole data cursor and this is empty."""
        step = self.trainer.step
        if step % self.updates_per_rollout == 0:
            return {}
        pending = self.current if self.current is not None and self.current.index == step // self.updates_per_rollout else None
        if pending is None:
            raise RuntimeError(f"saving at step {step}: rollout {step // self.updates_per_rollout} is not in memory")
        mine = (self.trainer.dp_rank, _rollout_state(pending)) if dist.get_rank() == self.mp_src else None
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        replicas = dict(g for g in gathered if g is not None)
        return {"rollout": {"index": pending.index, "replicas": [replicas[d] for d in range(self.trainer.dp_size)]}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("rollout")
        if not saved:
            return
        if len(saved["replicas"]) != self.trainer.dp_size:
            raise ValueError(
                f"the checkpoint falls inside rollout {saved['index']}, sampled by {len(saved['replicas'])} "
                f"data-parallel replicas; resume it with the same data-parallel size, or from a checkpoint "
                f"at a multiple of {self.updates_per_rollout} steps"
            )
        self.current = _rollout_from_state(saved["replicas"][self.trainer.dp_rank])

    def close(self) -> None:
        try:
            self.teardown()
        finally:
            self.engine.close()


# -- a rollout in a checkpoint: plain containers only (torch.load(weights_only=True) reads them) ----


def _rollout_state(rollout: Rollout) -> dict[str, Any]:
    state = {
        "index": rollout.index,
        "prompts": [
            {"text": p.text, "domain": p.domain, "sample_id": p.sample_id, "metadata": dict(p.metadata),
             "messages": [dict(m) for m in p.messages] if p.messages is not None else None}
            for p in rollout.prompts
        ],
        "batch": {f.name: getattr(rollout.batch, f.name) for f in fields(rollout.batch)},
        "domain_counts": rollout.domain_counts,
        "scores": rollout.scores,
        "metrics": dict(rollout.metrics),
    }  # fmt: skip
    _check_plain(state, "the rollout state")
    return state


def _rollout_from_state(state: dict[str, Any]) -> Rollout:
    prompts = [
        Prompt(p["text"], p["domain"], p["sample_id"], tuple(p["messages"]) if p["messages"] is not None else None, p["metadata"])
        for p in state["prompts"]
    ]
    return Rollout(
        state["index"], prompts, Trajectories(**state["batch"]),
        domain_counts=state["domain_counts"], scores=state["scores"], metrics=state["metrics"],
    )  # fmt: skip


def _check_plain(value: Any, where: str) -> None:
    """Refuse at save time what a weights_only load would refuse at resume time."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            _check_plain(v, where)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(k, where)
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(
        f"{where} holds a {type(value).__name__}: a checkpoint inside a rollout keeps the stage's scores, "
        f"which must be tensors, numbers, strings, lists and dicts"
    )
