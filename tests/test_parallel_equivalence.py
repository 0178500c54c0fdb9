"""The same weights give the same numbers under every parallel layout (real gloo worlds).

TP=2 vs TP=1 logits, PP=2 vs PP=1 loss and gradients, EP=2 vs EP=1 MoE forward and backward,
and DP=2 training that reduces the loss with identical replicas. Weights are shared across
layouts through a real dist checkpoint saved by the reference run (megatron reshards on load).
"""

from __future__ import annotations

import re

import torch

from megatron_opd.runtime.spawn import spawn_world

DENSE = [
    "model.vocab_size=51",
    "model.hidden_size=64",
    "model.num_layers=4",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.ffn_hidden_size=96",
    "model.max_seq_len=32",
    "model.make_vocab_size_divisible_by=8",
    "model.tie_embeddings=false",
    "train.micro_batch_size=4",
    "train.global_batch_size=16",
    "run.progress=none",
]
MOE = DENSE + [
    "model.num_layers=2",
    "model.num_experts=4",
    "model.moe_topk=2",
    "model.moe_ffn_hidden_size=48",
    "model.moe_shared_expert_size=32",
]


def _setup(overrides: list[str], run_dir: str):
    from megatron_opd.config import load_config
    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.stages.trainer import Trainer

    cfg = load_config(None, overrides + [f"run.output_dir={run_dir}", "run.name=t"])
    layout = init_runtime(cfg.parallel, cfg.run.seed)
    return cfg, Trainer(cfg, layout)


def _sft_micro_batches(cfg, trainer, step: int = 0):
    from megatron_opd.data.tokenizer import CharTokenizer
    from megatron_opd.stages.sft import SFTStage

    stage = SFTStage(cfg, trainer, CharTokenizer())
    return stage, stage.make_batch(step).micro_batches


def _global_name(name: str, layer_offset: int, expert_offset: int) -> str:
    name = name.removeprefix("module.")
    name = re.sub(r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", name)
    return re.sub(r"local_experts\.(\d+)\.", lambda m: f"local_experts.{int(m.group(1)) + expert_offset}.", name)


def _grads(trainer, num_layers: int, num_experts: int) -> dict[str, torch.Tensor]:
    """This rank's gradients by global parameter name (layer and expert indices made global)."""
    from megatron.core import parallel_state as ps

    layer_offset = ps.get_pipeline_model_parallel_rank() * num_layers // ps.get_pipeline_model_parallel_world_size()
    ep = ps.get_expert_model_parallel_world_size()
    expert_offset = ps.get_expert_model_parallel_rank() * (num_experts // ep) if num_experts else 0
    return {
        _global_name(n, layer_offset, expert_offset): p.main_grad.detach().clone()
        for n, p in trainer.module.named_parameters()
    }


# ---------------------------------------------------------------------------------------------


def _tp_worker(tp: int, run_dir: str, ckpt_root: str, save: bool):
    from megatron.core import tensor_parallel

    from megatron_opd.runtime import checkpoint as ckpt

    cfg, trainer = _setup(DENSE + [f"parallel.tp={tp}"], run_dir)
    if save:
        ckpt.save_checkpoint(ckpt_root, 0, trainer.model)
    else:
        ckpt.load_checkpoint(ckpt.latest_complete(ckpt_root), trainer.model, load_rng=False)
    tokens = torch.randint(0, 51, (3, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).expand(3, 16)
    with torch.no_grad():
        logits = trainer.module(tokens, positions, None)
        full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return full[..., : cfg.model.vocab_size]


def test_tp2_logits_equal_tp1(tmp_path):
    ref = spawn_world(_tp_worker, 1, (1, str(tmp_path / "a"), str(tmp_path / "ck"), True))[0]
    out = spawn_world(_tp_worker, 2, (2, str(tmp_path / "b"), str(tmp_path / "ck"), False))
    assert ref.shape == out[0].shape == (3, 16, 51)
    assert torch.equal(out[0], out[1]), "TP ranks disagree on the gathered logits"
    err = (ref - out[0]).abs().max().item()
    assert err <= 1e-5, f"TP=2 logits differ from TP=1 by {err}"
    assert ref.std() > 0.1  # a model that outputs constants would pass trivially


# ---------------------------------------------------------------------------------------------


def _pp_worker(pp: int, overrides: list[str], run_dir: str, ckpt_root: str, save: bool, num_experts: int):
    from megatron_opd.runtime import checkpoint as ckpt

    cfg, trainer = _setup(overrides, run_dir)
    if save:
        ckpt.save_checkpoint(ckpt_root, 0, trainer.model)
    else:
        ckpt.load_checkpoint(ckpt.latest_complete(ckpt_root), trainer.model, load_rng=False)
    stage, micro_batches = _sft_micro_batches(cfg, trainer)
    metrics = trainer.forward_backward(micro_batches, stage.loss)
    return metrics["loss"], _grads(trainer, cfg.model.num_layers, num_experts)


def _merge(results) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for _, grads in results:
        for k, g in grads.items():
            if k in merged:  # replicas (DP, or tied copies) must agree exactly
                assert torch.allclose(merged[k], g, atol=1e-7), f"replicas disagree on the gradient of {k}"
            merged[k] = g
    return merged


def _assert_same_grads(ref: dict, got: dict, tol: float):
    assert set(ref) == set(got), f"parameter sets differ: {set(ref) ^ set(got)}"
    worst = max(((ref[k] - got[k]).abs().max().item(), k) for k in ref)
    assert worst[0] <= tol, f"gradient of {worst[1]} differs by {worst[0]}"
    assert sum(g.abs().sum().item() for g in ref.values()) > 0


def test_pp2_loss_and_grads_equal_pp1(tmp_path):
    ck = str(tmp_path / "ck")
    ref = spawn_world(_pp_worker, 1, (1, DENSE, str(tmp_path / "a"), ck, True, 0))
    # 16 sequences over 4 micro-batches: the 1F1B schedule with warm-up and cool-down phases.
    out = spawn_world(_pp_worker, 2, (2, DENSE + ["parallel.pp=2"], str(tmp_path / "b"), ck, False, 0))
    assert abs(ref[0][0] - out[0][0]) <= 1e-6 and out[0][0] == out[1][0]
    _assert_same_grads(_merge(ref), _merge(out), 1e-6)


def test_ep2_moe_forward_backward_equal_ep1(tmp_path):
    ck = str(tmp_path / "ck")
    # EP=2 on 2 ranks is also DP=2: each rank holds 8 of the 16 sequences and 2 of the 4 experts.
    # The reference sees all 16 sequences on one rank with all experts; per-token loss
    # normalisation makes the two gradients the same quantity.
    ref = spawn_world(_pp_worker, 1, (1, MOE, str(tmp_path / "a"), ck, True, 4))
    out = spawn_world(_pp_worker, 2, (2, MOE + ["parallel.ep=2"], str(tmp_path / "b"), ck, False, 4))
    assert abs(ref[0][0] - out[0][0]) <= 1e-6
    merged = _merge(out)
    assert any("local_experts.3." in k for k in merged)
    _assert_same_grads(_merge(ref), merged, 1e-6)


# ---------------------------------------------------------------------------------------------


def _dp_worker(run_dir: str):
    cfg, trainer = _setup(DENSE + ["train.optim.lr=2e-3", "train.optim.decay=constant", "train.steps=8"], run_dir)
    stage, _ = _sft_micro_batches(cfg, trainer)
    losses, weights = [], []
    for step in range(8):
        losses.append(trainer.train_step(stage.make_batch(step).micro_batches, stage.loss)["loss"])
        weights.append(torch.cat([p.detach().flatten() for p in trainer.module.parameters()]))
    return losses, weights, trainer.dp_size


def test_dp2_training_reduces_loss_with_identical_replicas(tmp_path):
    out = spawn_world(_dp_worker, 2, (str(tmp_path),))
    (losses0, w0, dp), (losses1, w1, _) = out
    assert dp == 2
    assert losses0 == losses1  # the reported loss is the global token mean
    assert max(losses0[-3:]) < losses0[0] * 0.9, f"loss did not fall: {losses0}"
    for step, (a, b) in enumerate(zip(w0, w1)):
        assert torch.equal(a, b), f"replicas diverged after step {step}"
    assert not torch.equal(w0[0], w0[-1])
