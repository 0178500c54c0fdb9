"""The generative reward model's stages (issue 14; notes/grm.md): the actor is its own judge.

One set of weights answers the rubric task ("rubric": `w:<letters>|<codes>=`) and judges answers
under the judge template ("judge": `j:<letters>|<codes>:<answer>>` -> "101,6"). Three stages:

    grm_sft   the cold start: SFT on the rubric task's demonstrations and on the annotations'
              verdicts (data.domains [rubric, judge], or [judge] alone)
    grm       GRPO (stages/grpo.py, unchanged) whose rewards are
                judge  : `judge_agreement` against the annotation (rewards/grm.py) -> judge RL
                rubric : the judge's k voted verdicts on the sample (GRMReward)    -> policy RL
              with data.domains [judge] (judge RL alone), [rubric] (policy RL with a judge) or
              [rubric, judge] (actor as judge: every rollout interleaves judge-RL groups on the
              annotations with policy groups, so the shared weights keep judging while they
              learn to answer). KL to the cold start: grpo.kl_coef with train.init_from.
              grm.policy_reward swaps the policy's reward for the report's baselines: a scalar
              reward model (scalar_rm) or the hidden oracle (oracle, the upper bound).
    grm_rm    the scalar reward model the GRM replaces: the same backbone (train.init_from, the
              cold start) with a regression head, fit to the annotations' overall scores
              (score / 9, squared error) on the judge template's text; no verdicts, no votes.

Who judges (grm.judge): "live" the trainer's own weights at the moment of scoring, "frozen" a
snapshot loaded once (grm.judge_weights, "" = train.init_from), "http" a judge server's
/generate (grm.judge_url: `megatron-opd serve` of a GRM checkpoint, or any SGLang server).
In-job judges generate with the server's own loop (serving/backend.py ModelBackend.run, one
torch.Generator per verdict seeded by its `sampling_seed`), so a server holding the same weights
returns the same verdicts for the same seeds. The in-job judge runs inside the reward call on the
replica's first rank: it needs tp = pp = 1 (config/stages.py refuses other layouts).

The hidden oracle is not imported here: training sees only the annotation file (the oracle
baseline's reward is loaded by name, grm_oracle/reward.py, only when grm.policy_reward=oracle). Each rollout's
rubric samples and their GRM rewards are appended to `<run_dir>/grm_samples.jsonl` (first rank),
so the evaluator can score them with the oracle afterwards (the judge-vs-oracle gap over training).
"""

from __future__ import annotations

import importlib
import json

import torch

from megatron_opd.data.rubric import CODES_PER_PROMPT, JUDGE_DOMAIN, MAX_SCORE, TASK_DOMAIN, JudgeTemplate
from megatron_opd.rewards.base import Reward
from megatron_opd.data.prompts import Prompt, replica_slice
from megatron_opd.data.sources import job_prompt_source
from megatron_opd.rewards.grm import GRMReward, Judge, JudgeAgreement, ScalarRMReward, ValueModel
from megatron_opd.rewards.ranking import pairwise_accuracy
from megatron_opd.rewards.registry import get_reward
from megatron_opd.serving.backend import ModelBackend
from megatron_opd.serving.requests import GenItem
from megatron_opd.stages.grpo import GRPOStage
from megatron_opd.stages.on_policy import Rollout
from megatron_opd.stages.sft import WIDTH_MULTIPLE, SFTStage
from megatron_opd.stages.trainer import MicroBatch, StatelessStage, StepBatch, logits_forward, metric

VERDICT_TOKENS = CODES_PER_PROMPT + 3  # "101,6" and EOS


class _Generator(ModelBackend):
    """The server's generation loop over a model it does not own: no hidden-state capture (the
    hook would hold the trainer's activations)."""

    def attach(self, model) -> None:
        pass


class ModelJudge:
    """A `Judge` on a megatron model of this rank (the live module, or a frozen snapshot)."""

    def __init__(self, model: torch.nn.Module, model_cfg, tokenizer, *, temperature: float, batch_size: int = 256):
        self.model, self.tokenizer, self.temperature, self.batch_size = model, tokenizer, temperature, batch_size
        self.generator = model_generator(model, model_cfg, tokenizer)

    def judge(self, prompts: list[str], seeds: list[int]) -> list[str]:
        items = [judge_item(self.tokenizer, p, s, self.temperature) for p, s in zip(prompts, seeds, strict=True)]
        return generate_texts(self.generator, items, batch_size=self.batch_size)


def generate_texts(generator: ModelBackend, items: list[GenItem], *, batch_size: int = 256) -> list[str]:
    """The decoded outputs of `items` with the server's generation loop (each seeded by its own
    `sampling_seed`), `batch_size` at a time, the model in eval mode meanwhile."""
    model = generator.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            results = [r for i in range(0, len(items), batch_size) for r in generator.run(items[i : i + batch_size])]
    finally:
        model.train(was_training)
    return [generator.tokenizer.decode(r.output_ids) for r in results]


def model_generator(model: torch.nn.Module, model_cfg, tokenizer) -> ModelBackend:
    """The server's generation loop over a model this rank already holds."""
    return _Generator(model, model_cfg, tokenizer, model_path="in-job", weight_version="in-job", seed=0)


def judge_item(tokenizer, prompt: str, seed: int, temperature: float) -> GenItem:
    """One verdict request: what the in-job judge runs and what the HTTP judge sends."""
    return GenItem(input_ids=tokenizer.encode_prompt(prompt), max_new_tokens=VERDICT_TOKENS, temperature=temperature,
                   stop_token_ids=(tokenizer.eos_id,), sampling_seed=seed)  # fmt: skip


class HTTPJudge:
    """A `Judge` behind SGLang's /generate (a served GRM), through serving's one client."""

    def __init__(self, url: str, tokenizer, *, temperature: float, api_key: str = ""):
        from megatron_opd.serving.client import ClientSettings, EventLoopThread, SGLangClient

        self.tokenizer, self.temperature = tokenizer, temperature
        self._loop = EventLoopThread("judge-client")
        self.client = SGLangClient("judge server", ClientSettings(endpoints=(url,), api_key=api_key))
        self._loop.run(self.client.start())

    def judge(self, prompts: list[str], seeds: list[int]) -> list[str]:
        items = [judge_item(self.tokenizer, p, s, self.temperature) for p, s in zip(prompts, seeds, strict=True)]
        body = {
            "input_ids": [it.input_ids for it in items],
            "sampling_params": [{"max_new_tokens": it.max_new_tokens, "temperature": it.temperature,
                                 "stop_token_ids": list(it.stop_token_ids), "sampling_seed": it.sampling_seed}
                                for it in items],  # fmt: skip
        }
        responses = self._loop.run(self.client.generate(body))
        if len(responses) != len(items):
            raise RuntimeError(f"the judge server returned {len(responses)} verdicts for {len(items)} prompts")
        return [self.tokenizer.decode(r["output_ids"]) for r in responses]

    def close(self) -> None:
        self._loop.run(self.client.close())
        self._loop.stop()


# -- the scalar reward model (the baseline the GRM replaces) ----------------------------------------


def value_column(model_cfg, tokenizer) -> int:
    """The scalar RM's head: the output layer's first padding row (global id `tokenizer.vocab_size`),
    a linear map of the final hidden state. No token uses it (every softmax masks it), so it
    starts untrained and fitting it moves no token's logit; the backbone is fine-tuned with it."""
    if model_cfg.padded_vocab_size(1) <= tokenizer.vocab_size:
        raise ValueError(
            f"the scalar reward model reads its value from a padding row of the output layer, but "
            f"model.vocab_size={tokenizer.vocab_size} pads to no extra row; set model.make_vocab_size_divisible_by "
            f"so that the padded vocabulary is larger than the tokenizer's"
        )
    return tokenizer.vocab_size


def value_batch(tokenizer, prompts: list[str], *, width_multiple: int = WIDTH_MULTIPLE) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [b, w] right-padded, index of each row's last prompt token [b]): where the RM reads."""
    ids = [tokenizer.encode_prompt(p) for p in prompts]
    w = -(-max(len(i) for i in ids) // width_multiple) * width_multiple
    tokens = torch.full((len(ids), w), tokenizer.pad_id, dtype=torch.long)
    for b, row in enumerate(ids):
        tokens[b, : len(row)] = torch.tensor(row, dtype=torch.long)
    return tokens, torch.tensor([len(i) - 1 for i in ids], dtype=torch.long)


def values_at_last(logits: torch.Tensor, last: torch.Tensor, column: int) -> torch.Tensor:
    """[b] float32: the value column's logit at each row's last prompt token (causal attention: the
    padding after it does not reach it)."""
    return logits[torch.arange(logits.shape[0], device=logits.device), last, column].float()


class ModelValue:
    """A `ValueModel` on a megatron model of this rank (a grm_rm run's weights)."""

    def __init__(self, model: torch.nn.Module, model_cfg, tokenizer, *, batch_size: int = 256):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.column = value_column(model_cfg, tokenizer)

    def values(self, prompts: list[str]) -> list[float]:
        out: list[float] = []
        device = next(self.model.parameters()).device
        with torch.no_grad():
            for i in range(0, len(prompts), self.batch_size):
                tokens, last = value_batch(self.tokenizer, prompts[i : i + self.batch_size])
                positions = torch.arange(tokens.shape[1]).expand_as(tokens)
                logits = self.model(tokens.to(device), positions.to(device), None)
                out += values_at_last(logits, last.to(device), self.column).tolist()
        return out


class ScalarRMStage(StatelessStage):
    """Stage grm_rm: the annotations' judge-template texts (data.domains [judge], rubric codes in a
    seeded order per prompt as the judge sees them) regressed to score / MAX_SCORE with squared
    error at the value column. Evaluated on the whole annotation set: its fit (mse, and pairwise
    accuracy over pairs with different scores); held-out quality is the evaluator's, against the
    oracle (stages/grm_eval.py)."""

    name = "grm_rm"
    progress_keys = ["loss", "rm_mse", "rm_pairwise_acc"]
    finite_metrics = ["loss"]

    def __init__(self, cfg, trainer, tokenizer):
        self.cfg, self.trainer, self.tokenizer = cfg, trainer, tokenizer
        self.source = job_prompt_source(cfg, tokenizer)
        self.column = value_column(cfg.model, tokenizer)

    def _micro_batch(self, prompts: list[Prompt]) -> MicroBatch:
        tokens, last = value_batch(self.tokenizer, [p.text for p in prompts])
        target = torch.tensor([p.metadata["score"] / MAX_SCORE for p in prompts], dtype=torch.float32)
        return MicroBatch(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), {"last": last, "target": target})

    def make_batch(self, step: int) -> StepBatch:
        rows = replica_slice(step, self.cfg.train.global_batch_size, self.trainer.dp_rank, self.trainer.dp_size)
        prompts = self.source.prompts(rows.start, len(rows))
        size = self.cfg.train.micro_batch_size
        return StepBatch([self._micro_batch(prompts[i : i + size]) for i in range(0, len(prompts), size)],
                         sample_ids=[p.sample_id for p in prompts])  # fmt: skip

    forward = staticmethod(logits_forward)

    def loss(self, mb: MicroBatch, logits: torch.Tensor):
        err = (values_at_last(logits, mb.data["last"], self.column) - mb.data["target"]) ** 2
        total, count = err.sum(), torch.tensor(err.numel())
        return total, count, {"loss": metric(total, count)}

    def evaluate(self, step: int) -> dict[str, float]:
        prompts = self.source.eval_prompts(JUDGE_DOMAIN)
        model = self.trainer.module
        was_training = model.training
        model.eval()
        try:
            values = ModelValue(model, self.cfg.model, self.tokenizer).values([p.text for p in prompts])
        finally:
            model.train(was_training)
        targets = [p.metadata["score"] / MAX_SCORE for p in prompts]
        return {"rm_mse": sum((v - t) ** 2 for v, t in zip(values, targets)) / len(values),
                "rm_pairwise_acc": pairwise_accuracy([values], [targets])[0]}  # fmt: skip


class JudgedRewards:
    """What both GRM stages share: the rewards of the GRM's domains, with the configured judge."""

    judge: Judge | None = None
    value_model: ValueModel | None = None

    def make_rewards(self) -> dict[str, Reward]:
        g, out = self.cfg.grm, {}
        template = JudgeTemplate(self.cfg.data.judge_template)
        template.check(self.tokenizer, key="data.judge_template")
        for domain in self.source.domains:
            if domain == JUDGE_DOMAIN:
                out[domain] = JudgeAgreement(item_weight=g.item_weight, format_reward=g.judge_format_reward)
            elif domain == TASK_DOMAIN and g.policy_reward == "scalar_rm":
                out[domain] = ScalarRMReward(_LazyValue(self), template=template)
            elif domain == TASK_DOMAIN and g.policy_reward == "oracle":
                # The report's upper bound, by design the one run that reads the hidden oracle:
                # by name, so that no other run can reach it (grm_oracle/reward.py).
                out[domain] = importlib.import_module("megatron_opd.grm_oracle.reward").OracleReward()
            elif domain == TASK_DOMAIN:
                out[domain] = GRMReward(_LazyJudge(self), k=g.votes, seed=self.cfg.run.seed, template=template,
                                        format_reward=g.policy_format_reward)  # fmt: skip
            else:
                out[domain] = get_reward(self.source.reward_name(domain))
        return out

    def build_value_model(self) -> ValueModel:
        """The scalar RM of grm.reward_model, frozen, on this rank."""
        from megatron_opd.models.gpt import build_gpt_model

        model = build_gpt_model(self.cfg.model, self.trainer.layout, dtype=self.trainer.dtype)
        model.requires_grad_(False)
        self.trainer.load_weights(self.cfg.grm.reward_model, [model], key="grm.reward_model")
        return ModelValue(model.eval(), self.cfg.model, self.tokenizer)

    def build_judge(self) -> Judge:
        g = self.cfg.grm
        if g.judge == "http":
            return HTTPJudge(g.judge_url, self.tokenizer, temperature=g.judge_temperature)
        if g.judge == "frozen":
            from megatron_opd.models.gpt import build_gpt_model

            model = build_gpt_model(self.cfg.model, self.trainer.layout, dtype=self.trainer.dtype)
            model.requires_grad_(False)
            key, path = ("grm.judge_weights", g.judge_weights) if g.judge_weights else ("train.init_from", self.cfg.train.init_from)
            self.trainer.load_weights(path, [model], key=key)
            return ModelJudge(model.eval(), self.cfg.model, self.tokenizer, temperature=g.judge_temperature)
        return ModelJudge(self.trainer.module, self.cfg.model, self.tokenizer, temperature=g.judge_temperature)

    def close_judge(self) -> None:
        if isinstance(self.judge, HTTPJudge):
            self.judge.close()
        self.judge = None


class _LazyJudge:
    """The stage's judge, built on the first verdict: a frozen snapshot is loaded after the
    trainer's own weights, and the live judge is whatever the module holds when asked."""

    def __init__(self, stage: JudgedRewards):
        self.stage = stage

    def judge(self, prompts: list[str], seeds: list[int]) -> list[str]:
        if self.stage.judge is None:
            self.stage.judge = self.stage.build_judge()
        return self.stage.judge.judge(prompts, seeds)


class _LazyValue:
    """The stage's scalar RM, loaded on the first sample (after the trainer's own weights)."""

    def __init__(self, stage: JudgedRewards):
        self.stage = stage

    def values(self, prompts: list[str]) -> list[float]:
        if self.stage.value_model is None:
            self.stage.value_model = self.stage.build_value_model()
        return self.stage.value_model.values(prompts)


class GRMSFTStage(JudgedRewards, SFTStage):
    """The cold start: SFT on the GRM's domains (demonstrations: data/rubric.py), held-out
    accuracy judged by the in-job judge (rubric) and against the annotations (judge)."""

    name = "grm_sft"

    def close(self) -> None:
        self.close_judge()
        super().close()


class GRMStage(JudgedRewards, GRPOStage):
    """GRPO with judge-RL and GRM rewards (module docstring)."""

    name = "grm"
    progress_keys = ["reward", "reward/rubric", "reward/judge", "judge_format_fail", "kl"]

    def verify(self, rollout: Rollout) -> dict[str, float]:
        """GRPO's rollout metrics plus the format-failure rates of the judge-RL verdicts and of
        the policy's votes, over all replicas; logs the rubric samples for the evaluator."""
        from megatron_opd.rollout.embedded import responses
        from megatron_opd.stages.evaluation import sum_over_replicas

        out = super().verify(rollout)
        counts = torch.zeros(2, 2, dtype=torch.float64)  # [judge RL, policy] x [format failures, samples]
        for p, r in zip(rollout.prompts, self.reward_results):
            row = 0 if p.domain == JUDGE_DOMAIN else 1
            counts[row] += torch.tensor([float(r.info.get("format_failure", False)), 1.0], dtype=torch.float64)
        counts = sum_over_replicas(counts)
        if counts[0, 1]:
            out["judge_format_fail"] = float(counts[0, 0] / counts[0, 1])
        if counts[1, 1]:
            out["grm_format_fail"] = float(counts[1, 0] / counts[1, 1])
        if self.trainer.is_logger:
            self._log_samples(rollout, responses(rollout.batch, self.tokenizer))
        return out

    def _log_samples(self, rollout: Rollout, texts: list[str]) -> None:
        """The rubric samples and their GRM rewards (this replica's), for the evaluator's oracle."""
        rows = [
            {"rollout": rollout.index, "sample_id": p.sample_id, "query": p.metadata["query"],
             "rubric": p.metadata["rubric"], "response": t, "reward": float(r)}
            for p, t, r in zip(rollout.prompts, texts, rollout.batch.rewards.tolist()) if p.domain == TASK_DOMAIN
        ]  # fmt: skip
        if rows:
            with open(self.cfg.run_dir / "grm_samples.jsonl", "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)

    def teardown(self) -> None:
        self.close_judge()
        super().teardown()
