"""The generative reward model's stages (issue 14; notes/grm.md): the actor is its own judge.

One set of weights answers the rubric task ("rubric": `w:<letters>|<codes>=`) and judges answers
under the judge template ("judge": `j:<letters>|<codes>:<answer>>` -> "101,6"). Two stages:

    grm_sft   the cold start: SFT on the rubric task's demonstrations and on the annotations'
              verdicts (data.domains [rubric, judge], or [judge] alone)
    grm       GRPO (stages/grpo.py, unchanged) whose rewards are
                judge  : `judge_agreement` against the annotation (rewards/grm.py) -> judge RL
                rubric : the judge's k voted verdicts on the sample (GRMReward)    -> policy RL
              with data.domains [judge] (judge RL alone), [rubric] (policy RL with a judge) or
              [rubric, judge] (actor as judge: every rollout interleaves judge-RL groups on the
              annotations with policy groups, so the shared weights keep judging while they
              learn to answer). KL to the cold start: grpo.kl_coef with train.init_from.

Who judges (grm.judge): "live" the trainer's own weights at the moment of scoring, "frozen" a
snapshot loaded once (grm.judge_weights, "" = train.init_from), "http" a judge server's
/generate (grm.judge_url: `megatron-opd serve` of a GRM checkpoint, or any SGLang server).
In-job judges generate with the server's own loop (serving/backend.py ModelBackend.run, one
torch.Generator per verdict seeded by its `sampling_seed`), so a server holding the same weights
returns the same verdicts for the same seeds. The in-job judge runs inside the reward call on the
replica's first rank: it needs tp = pp = 1 (config/stages.py refuses other layouts).

The hidden oracle is not imported here: training sees only the annotation file. Each rollout's
rubric samples and their GRM rewards are appended to `<run_dir>/grm_samples.jsonl` (first rank),
so the evaluator can score them with the oracle afterwards (the judge-vs-oracle gap over training).
"""

from __future__ import annotations

import json

import torch

from megatron_opd.data.rubric import CODES_PER_PROMPT, JUDGE_DOMAIN, TASK_DOMAIN, JudgeTemplate
from megatron_opd.rewards.base import Reward
from megatron_opd.rewards.grm import GRMReward, Judge, JudgeAgreement
from megatron_opd.rewards.registry import get_reward
from megatron_opd.serving.backend import ModelBackend
from megatron_opd.serving.requests import GenItem
from megatron_opd.stages.grpo import GRPOStage
from megatron_opd.stages.on_policy import Rollout
from megatron_opd.stages.sft import SFTStage

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
        self.generator = _Generator(model, model_cfg, tokenizer, model_path="in-job", weight_version="in-job", seed=0)

    def judge(self, prompts: list[str], seeds: list[int]) -> list[str]:
        items = [judge_item(self.tokenizer, p, s, self.temperature) for p, s in zip(prompts, seeds, strict=True)]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                results = [r for i in range(0, len(items), self.batch_size)
                           for r in self.generator.run(items[i : i + self.batch_size])]  # fmt: skip
        finally:
            self.model.train(was_training)
        return [self.tokenizer.decode(r.output_ids) for r in results]


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


class JudgedRewards:
    """What both GRM stages share: the rewards of the GRM's domains, with the configured judge."""

    judge: Judge | None = None

    def make_rewards(self) -> dict[str, Reward]:
        g, out = self.cfg.grm, {}
        template = JudgeTemplate(self.cfg.data.judge_template)
        template.check(self.tokenizer, key="data.judge_template")
        for domain in self.source.domains:
            if domain == JUDGE_DOMAIN:
                out[domain] = JudgeAgreement(item_weight=g.item_weight, format_reward=g.judge_format_reward)
            elif domain == TASK_DOMAIN:
                out[domain] = GRMReward(_LazyJudge(self), k=g.votes, seed=self.cfg.run.seed, template=template,
                                        format_reward=g.policy_format_reward)  # fmt: skip
            else:
                out[domain] = get_reward(self.source.reward_name(domain))
        return out

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
