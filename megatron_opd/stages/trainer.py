"""The one training loop, shared by every stage (SFT, OPD, GRPO, GRM).

A stage supplies what differs: how a step's batch is made (demonstrations, or rollouts scored
by teachers or rewards), the per-micro-batch loss, what happens after an optimizer step (weight
sync) and how to evaluate. The `Trainer` owns everything else: the megatron model chunks under
megatron DDP, the megatron optimizer and LR schedule, `forward_backward_func` over
micro-batches (pipeline-parallel schedules included), gradient clipping, checkpoints and resume,
metrics and progress.

Loss reduction is per token over the whole global batch: a stage's loss returns the SUM of its
per-token losses and the number of tokens; megatron (`calculate_per_token_loss`) sums gradients
over micro-batches and data-parallel ranks and `finalize_model_grads` divides by the global token
count, so every response token of the step weighs the same wherever it was computed.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.distributed as dist

from megatron_opd.config import JobConfig, dump_config
from megatron_opd.data.tokenizer import Tokenizer
from megatron_opd.models.gpt import build_gpt_model
from megatron_opd.models.hf.config_json import is_hf_model_dir
from megatron_opd.models.model_dir import load_model_dir_weights, write_model_dir
from megatron_opd.models.routing import replaying
from megatron_opd.rollout.config import keep_routing_problems
from megatron_opd.runtime import checkpoint as ckpt
from megatron_opd.runtime.distributed import broadcast_object, device, replica_group_and_src
from megatron_opd.runtime.layout import ParallelLayout
from megatron_opd.runtime.resiliency import Resiliency
from megatron_opd.stages.reporting import MetricsWriter, Progress
from megatron_opd.stages.run_dir import StartPlan, plan_start, saved_config


@dataclass
class MicroBatch:
    """One forward's input: tokens and positions (first stage) and the loss's inputs (last stage)."""

    tokens: torch.Tensor  # [b, s] long
    position_ids: torch.Tensor  # [b, s] long
    data: dict[str, torch.Tensor] = field(default_factory=dict)  # loss inputs, on the model's device
    # Bookkeeping the loss reads on the host (row indices, teacher signals): never moved, so the
    # loss does not sync the device to read it back.
    host: dict[str, Any] = field(default_factory=dict)
    # Keep routing: [b, s, moe_layers, topk] experts the sampler chose for these rows
    # (Trajectories.routed_experts), replayed in the trainer's own forwards (models/routing.py).
    routed_experts: torch.Tensor | None = None

    def to(self, device: torch.device) -> "MicroBatch":
        data = {k: v.to(device) for k, v in self.data.items()}
        routed = self.routed_experts.to(device) if self.routed_experts is not None else None
        return MicroBatch(self.tokens.to(device), self.position_ids.to(device), data, self.host, routed)


# loss(micro_batch, output) -> (sum of per-token losses, number of tokens, {metric: [sum, count]})
LossFunc = Callable[[MicroBatch, torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]
# forward(model, micro_batch) -> what the last pipeline stage hands to the loss
ForwardFunc = Callable[[torch.nn.Module, MicroBatch], torch.Tensor]
# collect(micro_batch, output) -> what a forward-only pass keeps of a micro-batch (log-probs, ...)
CollectFunc = Callable[[MicroBatch, torch.Tensor], Any]


def logits_forward(model: torch.nn.Module, mb: MicroBatch) -> torch.Tensor:
    """The usual forward: vocab-parallel logits [b, s, V/tp] on the last pipeline stage."""
    return model(mb.tokens, mb.position_ids, None)


@dataclass
class StepBatch:
    micro_batches: list[MicroBatch]
    # Stable ids of this replica's samples: the sample ledger proves none is lost or repeated.
    sample_ids: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # from making the batch (rollout, scoring)


class Stage(Protocol):
    name: str
    progress_keys: list[str]
    # Metrics of the stage's loss that must stay finite: the trainer stops the run, naming the
    # metric and the step, the first time one is not (grad_norm is always checked).
    finite_metrics: list[str]

    def make_batch(self, step: int) -> StepBatch: ...

    def forward(self, model: torch.nn.Module, mb: MicroBatch) -> torch.Tensor: ...

    def loss(self, mb: MicroBatch, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]: ...

    def after_step(self, step: int) -> dict[str, float]: ...

    def evaluate(self, step: int) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class StatelessStage:
    """The `Stage` methods of a stage that keeps nothing between steps (SFT, the scalar RM)."""

    def after_step(self, step: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def metric(total: torch.Tensor | float, count: torch.Tensor | float) -> torch.Tensor:
    """A metric reported from a loss: its sum and count, so averages stay exact across ranks."""
    return torch.stack([torch.as_tensor(total).detach().to("cpu", torch.float64).reshape(()),
                        torch.as_tensor(count).detach().to("cpu", torch.float64).reshape(())])


def split_micro_batches(tokens: torch.Tensor, micro_batch_size: int, **data: torch.Tensor | list) -> list[MicroBatch]:
    """Cut a [B, s] batch (and per-row data) into micro-batches of `micro_batch_size` rows."""
    out = []
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    for start in range(0, tokens.shape[0], micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        out.append(MicroBatch(tokens[rows], positions[rows], {k: v[rows] for k, v in data.items()}))
    return out


class Trainer:
    """The shared loop. `tokenizer` (when given) is written into the run directory beside
    model.yaml, and its fingerprint is checked on resume."""

    def __init__(self, cfg: JobConfig, layout: ParallelLayout, tokenizer: Tokenizer | None = None):
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.cfg, self.layout = cfg, layout
        self.rank = dist.get_rank()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        t = cfg.train
        self.dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
        keep_routing = cfg.rollout.keep_routing
        if keep_routing and (problems := keep_routing_problems(cfg.model, layout)):
            raise ValueError("; ".join(problems))
        model = build_gpt_model(cfg.model, layout, dtype=self.dtype, routing_replay=keep_routing)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=t.use_distributed_optimizer,
        )
        self.model = [DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)]
        o = t.optim
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=o.lr,
                min_lr=o.min_lr,
                weight_decay=o.weight_decay,
                adam_beta1=o.adam_beta1,
                adam_beta2=o.adam_beta2,
                adam_eps=o.adam_eps,
                clip_grad=o.clip_grad,
                bf16=self.dtype == torch.bfloat16,
                params_dtype=self.dtype,
                use_distributed_optimizer=t.use_distributed_optimizer,
            ),
            self.model,
        )
        # The class values win over a checkpoint's (override): a resumed run follows the schedule
        # of its new config from the checkpoint's step (stages/run_dir.py, RESUME_RULES).
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if o.warmup_steps else o.lr,
            max_lr=o.lr,
            min_lr=o.min_lr,
            lr_warmup_steps=o.warmup_steps,
            lr_decay_steps=max(t.steps, o.warmup_steps + 1),
            lr_decay_style=o.decay,
            start_wd=o.weight_decay,
            end_wd=o.weight_decay,
            wd_incr_steps=max(t.steps, 1),
            wd_incr_style="constant",
            use_checkpoint_opt_param_scheduler=False,
            override_opt_param_scheduler=True,
        )
        config = model.config
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss
        config.no_sync_func = self.model[0].no_sync
        self.step = 0
        self.run_dir = cfg.run_dir
        self.tokenizer = tokenizer
        self.is_logger = self.rank == 0
        self.writer = MetricsWriter(self.run_dir, enabled=False)  # opened by resume()
        self.ledger = SampleLedger(self.run_dir / "samples.jsonl", enabled=self.is_logger)
        self.resiliency = Resiliency()
        self.stopped_by: str | None = None  # the signal that ended the run early, if any
        self.last_metrics: dict[str, float] = {}  # of the newest step (and its evaluation)
        self.wall_time_s = 0.0  # training time of the steps this run holds, over all attempts
        # How this attempt starts, decided on rank 0 before anything is written: a refused resume
        # raises here on every rank and leaves the run directory as it was.
        self.plan: StartPlan = _on_rank0(lambda: plan_start(cfg, tokenizer.fingerprint if tokenizer else None))
        if self.plan.checkpoint is None:  # a fresh run: nothing to protect, write its identity now
            self._write_identity()

    @property
    def module(self) -> torch.nn.Module:
        """The bare GPTModel of this rank (its TP shard and PP stage)."""
        return self.model[0].module

    @property
    def samples_per_rank(self) -> int:
        return self.cfg.train.global_batch_size // self.dp_size

    # -- one optimizer step -----------------------------------------------------------------------

    def forward_backward(
        self, micro_batches: list[MicroBatch], loss: LossFunc, forward: ForwardFunc = logits_forward
    ) -> dict[str, float]:
        """Gradients of the step's loss in the DDP buffers (`param.main_grad`), no optimizer step."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

        on = device()

        def forward_step(data_iterator, model):
            mb = next(data_iterator).to(on)
            with replaying(model, mb.routed_experts):  # keep routing: the sampler's experts
                output = forward(model, mb)
            return output, partial(loss, mb)

        reports = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=self.model,
            num_microbatches=len(micro_batches),
            seq_length=micro_batches[0].tokens.shape[1],
            micro_batch_size=micro_batches[0].tokens.shape[0],
            forward_only=False,
        )
        return self.reduce_reports(reports)

    def train_step(
        self,
        micro_batches: list[MicroBatch],
        loss: LossFunc,
        forward: ForwardFunc = logits_forward,
        finite: Sequence[str] = ("loss",),
    ) -> dict[str, float]:
        """One optimizer step; raises FloatingPointError before it if a metric in `finite` is not
        finite (so a NaN never reaches the weights), and after it if the gradient norm is not."""
        t0 = time.perf_counter()
        metrics = self.forward_backward(micro_batches, loss, forward)
        check_finite(metrics, finite, self.step + 1)
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        elapsed = time.perf_counter() - t0
        tokens = sum(int(mb.tokens.numel()) for mb in micro_batches) * self.dp_size
        metrics.update(
            lr=self.optimizer.param_groups[0]["lr"],
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            step_time_s=elapsed,
            train_tokens_per_s=tokens / elapsed,
        )
        if not ok:
            metrics["skipped_step"] = 1.0
        check_finite(metrics, ["grad_norm"], self.step + 1)
        return metrics

    def forward_only(
        self,
        micro_batches: list[MicroBatch],
        collect: CollectFunc,
        forward: ForwardFunc = logits_forward,
        model: list[torch.nn.Module] | None = None,
    ) -> list[Any]:
        """`collect(mb, output)` of every micro-batch after a forward pass without gradients
        (megatron's schedule with forward_only=True, pipeline stages included), in eval mode:
        old-policy log-probs, or with `model` (chunks built for the same layout, e.g. frozen
        reference weights) reference log-probs. The list is filled on the last pipeline stage,
        where the outputs are; other stages get []. Collective like a training step. Micro-batches
        that carry routed experts replay them in the trainer's own chunks, not in `model`'s (a
        reference routes as it would)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        on = device()
        own = model is None
        chunks = self.model if model is None else model
        modes = [chunk.training for chunk in chunks]

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            on_device = mb.to(on)
            with replaying(model, on_device.routed_experts if own else None):
                output = forward(model, on_device)
            # Megatron's non-loss path: whatever this returns is what the schedule keeps.
            return output, lambda out, non_loss_data=True: collect(mb, out)

        for chunk in chunks:
            chunk.eval()
        try:
            with torch.no_grad():
                return get_forward_backward_func()(
                    forward_step_func=forward_step,
                    data_iterator=iter(micro_batches),
                    model=chunks,
                    num_microbatches=len(micro_batches),
                    seq_length=micro_batches[0].tokens.shape[1],
                    micro_batch_size=micro_batches[0].tokens.shape[0],
                    forward_only=True,
                    collect_non_loss_data=True,
                )
        finally:
            for chunk, mode in zip(chunks, modes):
                chunk.train(mode)

    def reduce_reports(self, reports: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Average loss-reported (sum, count) metrics over micro-batches and all ranks.

        Only the last pipeline stage holds reports; tensor-parallel ranks hold identical copies,
        which cancel in sum/count. Every rank must call this (it is a collective)."""
        names = sorted({k for r in reports for k in r})
        names = _all_names(names)
        if not names:
            return {}
        stacked = torch.zeros(len(names), 2, dtype=torch.float64)
        for r in reports:
            for i, k in enumerate(names):
                if k in r:
                    stacked[i] += r[k].to(torch.float64).cpu()
        dist.all_reduce(stacked)
        return {k: float(s / c) if c > 0 else float("nan") for k, (s, c) in zip(names, stacked.tolist())}

    # -- checkpoints ------------------------------------------------------------------------------

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def save(self, stage: Stage | None) -> Path:
        common = {
            "trainer": {
                "step": self.step,
                "scheduler": self.scheduler.state_dict(),
                "metrics": dict(self.last_metrics),
                "wall_time_s": self.wall_time_s,
            },
            "stage": stage.state_dict() if stage is not None else {},
            "config": saved_config(self.cfg),  # what resume compares
            "tokenizer": self.tokenizer.fingerprint if self.tokenizer else None,
        }
        return ckpt.save_checkpoint(
            self.checkpoint_root,
            self.step,
            self.model,
            self.optimizer,
            common=common,
            keep_last=self.cfg.train.keep_checkpoints,
        )

    def resume(self, stage: Stage | None) -> bool:
        """Start as `self.plan` says: continue from its checkpoint (returns True), or fresh from
        `train.init_from` or random weights. The run's files follow only once the checkpoint has
        loaded: config.yaml and the model directory, metrics and ledger cut back to its step."""
        path = self.plan.checkpoint
        if path is None:
            if self.is_logger and self.plan.moved_aside:
                print(f"train.restart=true: moved the previous run to {self.plan.moved_aside}", flush=True)
            if self.cfg.train.init_from:
                self.load_weights(self.cfg.train.init_from)
            self._open_records(-1)
            return False
        common = ckpt.load_checkpoint(path, self.model, self.optimizer)
        trainer_state = common["trainer"]
        self.step = trainer_state["step"]
        self._apply_optimizer_settings()
        self.scheduler.load_state_dict(trainer_state["scheduler"])  # its step; the values are the config's
        self.last_metrics = dict(trainer_state.get("metrics", {}))
        self.wall_time_s = float(trainer_state.get("wall_time_s", 0.0))
        if stage is not None:
            stage.load_state_dict(common["stage"])
        self._write_identity()
        self._open_records(self.step)
        if self.is_logger:
            print(f"resumed from {path} at step {self.step}", flush=True)
            for change in self.plan.changes:
                print(f"resume: {change} (applied)", flush=True)
        return True

    def _apply_optimizer_settings(self) -> None:
        """Loading the optimizer restores its param groups from the checkpoint, and with them the
        old Adam settings and the `max_lr`/`min_lr` each group carries for the scheduler (megatron
        prefers those to its own): the config's win. lr and weight decay follow at every step."""
        o = self.cfg.train.optim
        for group in self.optimizer.param_groups:
            if "max_lr" in group:
                group["max_lr"], group["min_lr"] = o.lr, o.min_lr
            if "betas" in group:
                group["betas"] = (o.adam_beta1, o.adam_beta2)
            if "eps" in group:
                group["eps"] = o.adam_eps

    def _write_identity(self) -> None:
        """config.yaml and the model directory (model.yaml, tokenizer.json) of this attempt."""
        if not self.is_logger:
            return
        dump_config(self.cfg, self.run_dir / "config.yaml")
        if self.tokenizer is not None:
            write_model_dir(self.run_dir, self.cfg.model, self.tokenizer, origin=self.cfg.train.init_from)

    def _open_records(self, step: int) -> None:
        """Metrics and ledger from `step` on: what an interrupted attempt logged after it is dropped."""
        self.writer.close()
        self.writer = MetricsWriter(self.run_dir, enabled=self.is_logger, start=step)
        self.ledger.truncate(step)

    def load_weights(
        self, path: str | Path, model: list[torch.nn.Module] | None = None, *, key: str = "train.init_from"
    ) -> Path:
        """Initialise the model (not the optimizer state), or other chunks of its layout (`model`:
        a frozen reference), from a checkpoint dir, a root or model directory holding them, or a
        Hugging Face model directory (converted in memory under this layout; config.json must
        describe `model:`, which JobConfig.check holds). Returns what was loaded. `key`: the
        config key that named `path`, for the error."""
        path = Path(path)
        chunks = self.model if model is None else model
        if is_hf_model_dir(path):
            load_model_dir_weights(path, chunks, model_config=self.cfg.model)
        else:
            if not (path / ckpt.COMPLETE).exists():
                found = ckpt.latest_complete(path) or ckpt.latest_complete(path / "checkpoints")
                if found is None:
                    raise FileNotFoundError(f"{key}={path} holds no complete checkpoint")
                path = found
            ckpt.load_checkpoint(path, chunks, None, load_rng=False)
        if model is None:
            # Main parameters were copied from the random init when the optimizer was built;
            # without this the first step would write them back over the loaded weights.
            self.optimizer.reload_model_params()
        return path

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self, stage: Stage) -> dict[str, Any]:
        """Train to `train.steps` (or until a stop signal). Returns the final metrics (those of the
        last step and its evaluation), `step`, `steps`, `finished` (step == steps), `stopped_early`
        and `wall_time_s` (training time over all attempts): what summary.json holds. A rerun of a
        finished run returns the same, from its checkpoint."""
        t = self.cfg.train
        resumed = self.resume(stage)
        progress = Progress(
            stage.name, t.steps, self.step, enabled=self.is_logger, mode=self.cfg.run.progress, every=self.cfg.run.log_every
        )
        if not resumed and t.eval_every and t.eval_at_start:
            self.last_metrics = stage.evaluate(self.step)
            self.writer.write(self.step, self.last_metrics, prefix="eval/")
        start_time, start_wall = time.monotonic(), self.wall_time_s
        try:
            while self.step < t.steps:
                batch = stage.make_batch(self.step)
                metrics = self.train_step(batch.micro_batches, stage.loss, stage.forward, stage.finite_metrics)
                metrics.update(batch.metrics)
                metrics.update(stage.after_step(self.step))
                self.step += 1
                self.ledger.append(self.step, _gather_replica_ids(batch.sample_ids))
                inject_fault(self.step)
                if self.step % self.cfg.run.log_every == 0 or self.step == t.steps:
                    self.writer.write(self.step, metrics, prefix="train/")
                if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.steps):
                    evaluation = stage.evaluate(self.step)
                    self.resiliency.heartbeat()  # evaluation and saves can outlast a step
                    self.writer.write(self.step, evaluation, prefix="eval/")
                    metrics.update(evaluation)
                progress.update(self.step, metrics, stage.progress_keys)
                self.last_metrics = metrics
                self.wall_time_s = start_wall + (time.monotonic() - start_time)
                self.resiliency.on_step(self.step)
                if self.resiliency.should_stop():
                    self.stopped_by = self.resiliency.received or "a signal on another rank"
                    break
                if t.checkpoint_every and self.step % t.checkpoint_every == 0 and self.step < t.steps:
                    self.save(stage)
                    self.resiliency.heartbeat()
        finally:
            progress.close()
        if ckpt.latest_complete(self.checkpoint_root) != ckpt.step_dir(self.checkpoint_root, self.step):
            self.save(stage)  # (a rerun of a finished run has nothing new to save)
        finished = self.step >= t.steps
        if self.stopped_by and not finished and self.is_logger:
            print(f"stopped by {self.stopped_by} at step {self.step}; checkpoint saved, rerun to resume", flush=True)
        return {
            **self.last_metrics,
            "step": self.step,
            "steps": t.steps,
            "finished": finished,
            "stopped_early": float(not finished),
            "wall_time_s": self.wall_time_s,
        }

    def close(self) -> None:
        self.writer.close()
        self.resiliency.close()


def _on_rank0(decide: Callable[[], Any]) -> Any:
    """`decide()` on rank 0 (it may touch files), its result or its exception on every rank."""
    outcome: tuple[Any, BaseException | None] = (None, None)
    if dist.get_rank() == 0:
        try:
            outcome = (decide(), None)
        except Exception as e:  # noqa: BLE001 - raised on every rank below
            outcome = (None, e)
    result, error = broadcast_object(outcome, 0, dist.group.WORLD)
    if error is not None:
        raise error
    return result


def inject_fault(step: int) -> None:
    """Test hook: MEGATRON_OPD_FAULT="<exit|hang|signal>:<rank>:<step>" makes that rank die hard,
    hang, or receive SIGUSR1 right after that step (first attempt only under torchrun/ft_launcher
    restarts). Resume, requeue and heartbeat tests use it; unset, it does nothing."""
    spec = os.environ.get("MEGATRON_OPD_FAULT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    kind, rank, at = spec.split(":")
    if int(rank) != dist.get_rank() or int(at) != step:
        return
    if kind == "exit":
        os._exit(17)
    elif kind == "hang":
        while True:
            time.sleep(3600)
    elif kind == "signal":
        os.kill(os.getpid(), signal.SIGUSR1)
    else:
        raise ValueError(f"MEGATRON_OPD_FAULT={spec!r}: kind must be exit, hang or signal")


class SampleLedger:
    """`samples.jsonl`: the sample ids each completed step trained on (rank 0 writes).

    Resuming from a checkpoint at step k drops the entries of steps after k, which the resumed run
    then redoes with the same samples; so the ledger of a finished run lists every sample exactly
    once however often the job was interrupted."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def append(self, step: int, sample_ids: list[str]) -> None:
        if self.enabled and sample_ids:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "samples": sample_ids}) + "\n")

    def truncate(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)


def read_ledger(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "samples.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _gather_replica_ids(ids: list[str]) -> list[str]:
    """Every data-parallel replica's sample ids, on rank 0 (one copy per replica)."""
    _, src = replica_group_and_src()
    mine = ids if dist.get_rank() == src else []
    gathered: list[list[str]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, mine)
    return [i for part in gathered for i in part]


def _all_names(names: list[str]) -> list[str]:
    """The union of every rank's metric names, sorted, known to every rank: pipeline stages
    before the last report nothing, and data-parallel replicas may report different names (a
    replica whose rows hold no sample of a domain has no per-domain metric for it), yet the
    all-reduce of their (sum, count) rows needs one order everywhere."""
    if dist.get_world_size() == 1:
        return names
    gathered: list[list[str]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, names)
    return sorted({n for part in gathered for n in part})


def check_finite(metrics: dict[str, float], keys: Sequence[str], step: int) -> None:
    for k in keys:
        if k in metrics and not math.isfinite(metrics[k]):
            raise FloatingPointError(
                f"{k} became {metrics[k]} at step {step}; check the data that step trained on (teacher "
                f"signals, rewards) or lower train.optim.lr"
            )
