"""Finished model directories, without training: held-out accuracy per domain, and greedy samples.

What the recipe (launchers/recipe.py) asks of models it did not just train in the same world: the
merged experts (which no run trained), and every expert and method, so that every cell of its
table comes from one path (the same held-out prompts, greedy decoding, response budget and
verifiers as a stage's evaluation, stages/evaluation.py `held_out_accuracy`). It also records
each expert's greedy answers to training prompts (the mixed-SFT data, data/samples.py).

`evaluate_models(cfg_tree, requests)` is a rank entry (runtime/spawn.py spawn_world, one rank):

    {"name": ..., "model_dir": ..., "domains": [...]}                       -> {"acc/<d>": ..., "acc/mean": ...}
    {"name": ..., "model_dir": ..., "domains": [...], "sample_indices": [...]} -> {"samples": [...]}

Sample requests decode the training prompts of the job's data section (data.domains, data.seed)
at those indices; each must belong to one of the request's domains.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from megatron_opd.config import JobConfig, build


def open_model(model_dir: str | Path, layout):
    """The GPTModel of a model directory (model.yaml), with its newest complete checkpoint loaded,
    and its tokenizer."""
    from megatron_opd.models.gpt import build_gpt_model
    from megatron_opd.models.model_dir import read_model_dir
    from megatron_opd.runtime.checkpoint import load_checkpoint

    md = read_model_dir(model_dir)
    if md.tokenizer is None:
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json; evaluate a model directory written by megatron-opd")
    model = build_gpt_model(md.model, layout)
    load_checkpoint(md.latest_checkpoint(), [model], load_rng=False)
    return model.eval(), md.tokenizer


def greedy_texts(model, prompts, tokenizer, *, max_len: int, max_new_tokens: int, batch_size: int = 256) -> list[str]:
    """Greedy responses to `prompts`, `batch_size` at a time (collective over the TP group)."""
    from megatron_opd.rollout.config import SamplingParams
    from megatron_opd.rollout.embedded import generate, responses

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        out += responses(generate(model, chunk, tokenizer, params, max_len=max_len), tokenizer)
    return out


def evaluate_models(cfg_tree: dict, requests: list[dict]) -> dict[str, dict[str, Any]]:
    """Rank entry: every request in turn (module docstring); {name: result}."""
    import torch

    from megatron_opd.data.sources import prompt_source
    from megatron_opd.rewards.registry import rewards_for
    from megatron_opd.runtime.distributed import init_runtime, shutdown
    from megatron_opd.runtime.layout import ParallelLayout
    from megatron_opd.stages.evaluation import held_out_accuracy

    cfg = build(JobConfig, cfg_tree)
    layout = init_runtime(ParallelLayout(), cfg.run.seed)
    results: dict[str, dict[str, Any]] = {}
    try:
        with torch.no_grad():
            for req in requests:
                model, tokenizer = open_model(req["model_dir"], layout)
                if "sample_indices" in req:
                    source = prompt_source(replace(cfg.data, samples=""))
                    prompts = [source.prompt(i) for i in req["sample_indices"]]
                    foreign = sorted({p.domain for p in prompts} - set(req["domains"]))
                    if foreign:
                        raise ValueError(f"{req['name']}: asked to answer prompts of {foreign}, not its domains {req['domains']}")
                    texts = greedy_texts(
                        model, prompts, tokenizer, max_len=cfg.model.max_seq_len, max_new_tokens=cfg.rollout.max_new_tokens
                    )
                    results[req["name"]] = {
                        "samples": [
                            {"index": i, "domain": p.domain, "prompt": p.text, "response": t}
                            for i, p, t in zip(req["sample_indices"], prompts, texts)
                        ]
                    }
                else:
                    source = prompt_source(replace(cfg.data, domains=list(req["domains"]), samples=""))
                    results[req["name"]] = held_out_accuracy(
                        model,
                        source,
                        tokenizer,
                        rewards_for(source),
                        max_len=cfg.model.max_seq_len,
                        max_new_tokens=cfg.rollout.max_new_tokens,  # a stage's evaluation's batches, too
                    )
                del model
    finally:
        shutdown()
    return results
