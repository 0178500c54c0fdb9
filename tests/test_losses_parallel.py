"""TP=2 (two gloo ranks) equals TP=1 for every loss of the family, values and gradients.

One world runs every check (a world costs seconds of imports); each rank computes the unsplit
result itself and compares it with the vocab-parallel one, and returns the largest differences.
The padded vocabulary is 40 columns (20 per rank) for a real vocabulary of 37, so rank 1 holds
padding; one check uses a vocabulary of 15 so that rank 1 holds nothing but padding.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_opd.runtime.spawn import spawn_world

F64 = torch.float64
PADDED, VOCAB, TP = 40, 37, 2


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    return float(torch.where(both_inf, 0.0, (a - b).abs()).max())


def _shard(x: torch.Tensor, rank: int, dim: int = -1) -> torch.Tensor:
    return x.chunk(TP, dim=dim)[rank]


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def _reverse_kl_checks(rank, group, gen) -> dict[str, float]:
    from megatron_opd.losses import vocab_parallel_reverse_kl

    z = 4 * torch.randn(3, 5, PADDED, generator=gen, dtype=F64)
    u = 4 * torch.randn(3, 5, PADDED, generator=gen, dtype=F64)
    z[0, 0, [3, 30]] = -torch.inf  # masked columns on both ranks
    u[0, 0, [3, 30]] = -torch.inf
    upstream = torch.randn(3, 5, generator=gen, dtype=F64)
    out = {}
    for vocab in (VOCAB, 15):
        full, part = _leaf(z), _leaf(_shard(z, rank))
        kl_1 = vocab_parallel_reverse_kl(full, u, temperature=0.7, vocab_size=vocab)
        kl_2 = vocab_parallel_reverse_kl(
            part, _shard(u, rank), temperature=0.7, vocab_size=vocab, group=group
        )
        kl_1.backward(upstream)
        kl_2.backward(upstream)
        out[f"reverse_kl/vocab{vocab}/value"] = _max_diff(kl_2, kl_1)
        out[f"reverse_kl/vocab{vocab}/grad"] = _max_diff(part.grad, _shard(full.grad, rank))
    return out


def _fused_checks(rank, group, gen) -> dict[str, float]:
    from megatron_opd.losses import fused_linear_reverse_kl, vocab_parallel_reverse_kl

    n, d, d_teacher = 11, 6, 4
    h = torch.randn(n, d, generator=gen, dtype=F64)
    w = torch.randn(PADDED, d, generator=gen, dtype=F64)
    g = torch.randn(n, d_teacher, generator=gen, dtype=F64)
    teachers = [torch.randn(PADDED, d_teacher, generator=gen, dtype=F64) for _ in range(2)]
    teacher_index = torch.randint(0, 2, (n,), generator=gen)
    upstream = torch.randn(n, generator=gen, dtype=F64)
    upstream[4] = 0.0

    h1, w1, h2, w2 = _leaf(h), _leaf(w), _leaf(h), _leaf(_shard(w, rank, 0))
    kwargs = dict(temperature=1.3, vocab_size=VOCAB, chunk_size=4, teacher_index=teacher_index)
    kl_1 = fused_linear_reverse_kl(h1, w1, g, teachers, **kwargs)
    kl_2 = fused_linear_reverse_kl(h2, w2, g, [_shard(t, rank, 0) for t in teachers], group=group, **kwargs)
    kl_1.backward(upstream)
    kl_2.backward(upstream)

    # The unfused TP=2 loss from materialised logit shards, for fused == unfused under TP.
    h3, w3 = _leaf(h), _leaf(_shard(w, rank, 0))
    teacher_logits = torch.stack([g @ _shard(t, rank, 0).T for t in teachers])[teacher_index, torch.arange(n)]
    kl_3 = vocab_parallel_reverse_kl(
        h3 @ w3.T, teacher_logits, temperature=1.3, vocab_size=VOCAB, group=group
    )
    kl_3.backward(upstream)
    # The unfused loss's hidden gradient is this shard's partial sum, as megatron's would be
    # before ColumnParallelLinear's all-reduce.
    dist.all_reduce(h3.grad, group=group)
    return {
        "fused/value": _max_diff(kl_2, kl_1),
        "fused/grad_hidden": _max_diff(h2.grad, h1.grad),
        "fused/grad_weight_shard": _max_diff(w2.grad, _shard(w1.grad, rank, 0)),
        "fused_vs_unfused/value": _max_diff(kl_2, kl_3),
        "fused_vs_unfused/grad_hidden": _max_diff(h2.grad, h3.grad),
        "fused_vs_unfused/grad_weight_shard": _max_diff(w2.grad, w3.grad),
    }


def _topk_and_sampled_checks(rank, group, gen) -> dict[str, float]:
    from megatron_opd.losses import (
        sampled_kl_policy_loss,
        topk_reverse_kl,
        vocab_parallel_logprobs,
        vocab_parallel_reverse_kl,
    )

    n, k = 6, 5
    z = 3 * torch.randn(n, PADDED, generator=gen, dtype=F64)
    u = 3 * torch.randn(n, PADDED, generator=gen, dtype=F64)
    log_q_all = torch.log_softmax(u[:, :VOCAB] / 0.9, -1)
    out = {}
    for name, ids in (
        ("topk", torch.stack([torch.randperm(VOCAB, generator=gen)[:k] for _ in range(n)])),
        ("topk_k_eq_V", torch.stack([torch.randperm(VOCAB, generator=gen) for _ in range(n)])),
    ):
        log_q = log_q_all.gather(-1, ids)
        upstream = torch.randn(n, generator=gen, dtype=F64)
        full, part = _leaf(z), _leaf(_shard(z, rank))
        res_1 = topk_reverse_kl(full, ids, log_q, temperature=0.9, vocab_size=VOCAB)
        res_2 = topk_reverse_kl(part, ids, log_q, temperature=0.9, vocab_size=VOCAB, group=group)
        res_1.kl.backward(upstream)
        res_2.kl.backward(upstream)
        out[f"{name}/value"] = _max_diff(res_2.kl, res_1.kl)
        out[f"{name}/teacher_mass"] = _max_diff(res_2.teacher_mass, res_1.teacher_mass)
        out[f"{name}/grad"] = _max_diff(part.grad, _shard(full.grad, rank))
    full = _leaf(z)
    exact = vocab_parallel_reverse_kl(full, u, temperature=0.9, vocab_size=VOCAB)
    out["topk_k_eq_V/equals_full_kl"] = _max_diff(res_2.kl, exact)

    sampled = torch.randint(0, VOCAB, (n, 1), generator=gen)
    teacher_logprob = log_q_all.gather(-1, sampled).squeeze(-1)
    full, part = _leaf(z), _leaf(_shard(z, rank))
    log_p_1 = vocab_parallel_logprobs(full, sampled, temperature=0.9, vocab_size=VOCAB)
    log_p_2 = vocab_parallel_logprobs(part, sampled, temperature=0.9, vocab_size=VOCAB, group=group)
    loss_1 = sampled_kl_policy_loss(log_p_1.squeeze(-1), teacher_logprob)
    loss_2 = sampled_kl_policy_loss(log_p_2.squeeze(-1), teacher_logprob)
    loss_1.sum().backward()
    loss_2.sum().backward()
    out["sampled/value"] = _max_diff(loss_2, loss_1)
    out["sampled/grad"] = _max_diff(part.grad, _shard(full.grad, rank))
    return out


def _gradcheck_replicated_hidden(rank, group, gen) -> dict[str, float]:
    """gradcheck of the fused loss in the hidden states, which every TP rank holds whole: both
    ranks perturb the same element together, so the numerical Jacobian is that of the TP loss and
    checks the all-reduce of the hidden gradient. (A shard input cannot be gradchecked this way:
    the ranks would perturb different global columns at once.)"""
    from megatron_opd.losses import fused_linear_reverse_kl

    h = _leaf(torch.randn(3, 2, generator=gen, dtype=F64))
    w = _shard(torch.randn(8, 2, generator=gen, dtype=F64), rank, 0)
    g = torch.randn(3, 3, generator=gen, dtype=F64)
    t = _shard(torch.randn(8, 3, generator=gen, dtype=F64), rank, 0)
    ok = torch.autograd.gradcheck(
        lambda h: fused_linear_reverse_kl(h, w, g, t, vocab_size=7, group=group, chunk_size=2), (h,)
    )
    return {"gradcheck/fused_hidden_failed": float(not ok)}


def _dp_mean_checks(rank, group, gen) -> dict[str, float]:
    """The two ranks as data-parallel replicas: per-rank micro-batch gradients, averaged as DDP
    does, equal the gradient of the token mean over everything."""
    from megatron_opd.losses import count_response_tokens, masked_token_mean, vocab_parallel_reverse_kl

    w = torch.randn(9, 4, generator=gen, dtype=F64)
    hidden = torch.randn(TP, 2, 5, 4, generator=gen, dtype=F64)
    teacher = torch.randn(TP, 2, 5, 9, generator=gen, dtype=F64)
    mask = torch.rand(TP, 2, 5, generator=gen) < torch.tensor([[0.9, 0.3], [0.5, 0.1]])[:, :, None]
    total = count_response_tokens(mask[rank].unbind(0), group)
    grad = torch.zeros_like(w)
    for m in range(2):
        wl = _leaf(w)
        kl = vocab_parallel_reverse_kl(hidden[rank, m] @ wl.T, teacher[rank, m])
        masked_token_mean(kl, mask[rank, m], total_tokens=total, dp_size=TP).backward()
        grad += wl.grad
    dist.all_reduce(grad, group=group)
    grad /= TP  # DDP's average over data-parallel ranks
    wl = _leaf(w)
    everything = vocab_parallel_reverse_kl(hidden @ wl.T, teacher)
    big = masked_token_mean(everything, mask, total_tokens=int(mask.sum()))
    big.backward()
    return {"dp_mean/token_count": float(total != int(mask.sum())), "dp_mean/grad": _max_diff(grad, wl.grad)}


def _entropy_checks(rank, group, gen) -> dict[str, float]:
    """The policy entropy (a GRPO metric) against -sum p log p in float64, padding and -inf
    columns excluded; a row of one finite logit has entropy 0."""
    from megatron_opd.losses import vocab_parallel_entropy

    z = 4 * torch.randn(3, 5, PADDED, generator=gen, dtype=F64)
    z[0, 0, [3, 30]] = -torch.inf
    z[1, 1, :] = -torch.inf
    z[1, 1, 25] = 2.0  # all the mass on rank 1's shard
    out = {}
    for vocab in (VOCAB, 15):
        log_p = torch.log_softmax(z[..., :vocab] / 0.7, dim=-1)
        reference = -torch.where(log_p.isinf(), 0.0, log_p.exp() * log_p).sum(-1)
        if vocab == 15:
            reference[1, 1] = float("nan")  # no finite logit left in the real vocabulary
        one = vocab_parallel_entropy(z, temperature=0.7, vocab_size=vocab)
        two = vocab_parallel_entropy(_shard(z, rank), temperature=0.7, vocab_size=vocab, group=group)
        nan_agree = torch.equal(two.isnan(), reference.isnan()) and torch.equal(one.isnan(), reference.isnan())
        out[f"entropy/vocab{vocab}/tp1"] = _max_diff(one.nan_to_num(), reference.nan_to_num())
        out[f"entropy/vocab{vocab}/tp2"] = _max_diff(two.nan_to_num(), reference.nan_to_num()) + (not nan_agree)
    out["entropy/one_token_is_zero"] = abs(float(vocab_parallel_entropy(z, vocab_size=VOCAB)[1, 1]))
    return out


def tp_world_checks() -> dict[str, float]:
    # Plain gloo from spawn_world's torchrun variables: the losses need no megatron state, and
    # importing megatron would double the cost of this world.
    dist.init_process_group("gloo")
    group = dist.group.WORLD
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(1234)  # the same global inputs on both ranks
    out: dict[str, float] = {}
    checks = (
        _reverse_kl_checks,
        _fused_checks,
        _topk_and_sampled_checks,
        _gradcheck_replicated_hidden,
        _dp_mean_checks,
        _entropy_checks,
    )
    for check in checks:
        out.update(check(rank, group, gen))
    return out


def test_tp2_equals_tp1_for_the_whole_family():
    results = spawn_world(tp_world_checks, TP, timeout_s=120)
    expected = {
        "reverse_kl/vocab37/value", "reverse_kl/vocab37/grad", "reverse_kl/vocab15/value",
        "reverse_kl/vocab15/grad", "fused/value", "fused/grad_hidden", "fused/grad_weight_shard",
        "fused_vs_unfused/value", "fused_vs_unfused/grad_hidden", "fused_vs_unfused/grad_weight_shard",
        "topk/value", "topk/teacher_mass", "topk/grad", "topk_k_eq_V/value", "topk_k_eq_V/teacher_mass",
        "topk_k_eq_V/grad", "topk_k_eq_V/equals_full_kl", "sampled/value", "sampled/grad",
        "gradcheck/fused_hidden_failed", "dp_mean/token_count", "dp_mean/grad",
        "entropy/vocab37/tp1", "entropy/vocab37/tp2", "entropy/vocab15/tp1", "entropy/vocab15/tp2",
        "entropy/one_token_is_zero",
    }
    for rank, errors in enumerate(results):
        assert set(errors) == expected
        too_large = {name: err for name, err in errors.items() if not err <= 1e-9}
        assert not too_large, f"rank {rank}: TP=2 differs from TP=1: {too_large}"
