"""Keep sampling mask, loss side: `vocab_parallel_logprobs(..., kept_ids=...)`.

The reference renormalises in float64 over each position's kept set with a dense mask (the very
thing the implementation must never build): logits outside the set -> -inf, log_softmax, gather,
differentiated by autograd. TP=2 runs in a real 2-rank gloo world with megatron's parallel state
and its tensor-parallel group, against TP=1 and the reference, gradients included.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_opd.losses import grpo_token_loss, vocab_parallel_logprobs
from megatron_opd.runtime.spawn import spawn_world

F64 = torch.float64
PADDED, VOCAB, TP = 40, 37, 2


def reference_kept_logprobs(z, ids, kept, temperature=1.0):
    """log p~(ids) with p~ = softmax(z/T) restricted to the kept ids and renormalised."""
    dense = torch.zeros(z.shape, dtype=torch.bool)
    rows = torch.arange(z.shape[0])[:, None].expand_as(kept)
    dense[rows[kept >= 0], kept[kept >= 0]] = True
    logits = torch.where(dense, z.to(F64) / temperature, -math.inf)
    return torch.log_softmax(logits, dim=-1).gather(-1, ids)


def kept_sets(gen, n: int, k_max: int, vocab: int, targets: torch.Tensor, lo: int = 0, hi: int | None = None):
    """[n, k_max] kept ids: each row the target(s) plus a random number of other ids from [lo, hi),
    in random slots, the rest -1."""
    hi = vocab if hi is None else hi
    kept = torch.full((n, k_max), -1, dtype=torch.long)
    for i in range(n):
        size = int(torch.randint(targets.shape[1], k_max + 1, (1,), generator=gen))
        own = list(dict.fromkeys(targets[i].tolist()))
        others = [v for v in (lo + torch.randperm(hi - lo, generator=gen)).tolist() if v not in own]
        row = (own + others)[: max(size, len(own))]
        slots = torch.randperm(k_max, generator=gen)[: len(row)]
        kept[i, slots] = torch.tensor(row)
    return kept


def leaf(x):
    return x.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kept_set_logprobs_match_the_renormalised_reference(temperature):
    gen = torch.Generator().manual_seed(0)
    n, k_max = 9, 6
    z = 3 * torch.randn(n, PADDED, generator=gen, dtype=F64)
    ids = torch.randint(0, VOCAB, (n, 2), generator=gen)
    kept = kept_sets(gen, n, k_max, VOCAB, ids)
    ids[0] = torch.tensor([4, 9])
    kept[0] = torch.tensor([-1, 4, 36, -1, 9, 35])
    z[0, 35] = -math.inf  # a kept column with no mass
    upstream = torch.randn(n, 2, generator=gen, dtype=F64)
    got_z, ref_z = leaf(z), leaf(z)
    got = vocab_parallel_logprobs(got_z, ids, temperature=temperature, vocab_size=VOCAB, kept_ids=kept)
    ref = reference_kept_logprobs(ref_z, ids, kept, temperature)
    got.backward(upstream)
    ref.backward(upstream)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_z.grad, ref_z.grad, rtol=1e-12, atol=1e-12)
    kept_mask = torch.zeros(n, PADDED, dtype=torch.bool)
    kept_mask[torch.arange(n)[:, None].expand_as(kept)[kept >= 0], kept[kept >= 0]] = True
    assert (got_z.grad[~kept_mask] == 0).all()  # nothing outside the kept sets moves
    # renormalised: the kept set's probabilities sum to one
    every = torch.where(kept >= 0, kept, ids[:, :1])
    mass = vocab_parallel_logprobs(z, every, temperature=temperature, vocab_size=VOCAB, kept_ids=kept).exp()
    torch.testing.assert_close(torch.where(kept >= 0, mass, 0.0).sum(-1), torch.ones(n, dtype=F64))


def test_gradcheck_and_leading_dims():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 8, generator=gen, dtype=F64)
    ids = torch.randint(0, 7, (2, 3, 1), generator=gen)
    kept = kept_sets(gen, 6, 4, 7, ids.reshape(6, 1)).reshape(2, 3, 4)
    got = vocab_parallel_logprobs(z, ids, vocab_size=7, kept_ids=kept)
    assert got.shape == (2, 3, 1)
    ref = reference_kept_logprobs(z.reshape(6, 8), ids.reshape(6, 1), kept.reshape(6, 4)).reshape(2, 3, 1)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x: vocab_parallel_logprobs(x, ids, temperature=1.3, vocab_size=7, kept_ids=kept), (leaf(z),)
    )


def test_a_kept_set_of_the_whole_vocabulary_is_the_plain_log_prob():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(5, PADDED, generator=gen, dtype=F64)
    ids = torch.randint(0, VOCAB, (5, 1), generator=gen)
    kept = torch.stack([torch.randperm(VOCAB, generator=gen) for _ in range(5)])
    a, b = leaf(z), leaf(z)
    full = vocab_parallel_logprobs(a, ids, vocab_size=VOCAB)
    masked = vocab_parallel_logprobs(b, ids, vocab_size=VOCAB, kept_ids=kept)
    full.sum().backward()
    masked.sum().backward()
    torch.testing.assert_close(masked, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-12)


def test_float32_and_bfloat16_logits():
    gen = torch.Generator().manual_seed(3)
    z = 2 * torch.randn(6, PADDED, generator=gen)
    ids = torch.randint(0, VOCAB, (6, 1), generator=gen)
    kept = kept_sets(gen, 6, 5, VOCAB, ids)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        x = leaf(z.to(dtype))
        got = vocab_parallel_logprobs(x, ids, vocab_size=VOCAB, kept_ids=kept)
        got.sum().backward()
        ref_z = leaf(z.to(dtype).to(F64))
        ref = reference_kept_logprobs(ref_z, ids, kept)
        ref.sum().backward()
        assert got.dtype == torch.float32 and x.grad.dtype == dtype
        torch.testing.assert_close(got.to(F64), ref, rtol=tol, atol=tol)
        torch.testing.assert_close(x.grad.to(F64), ref_z.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda kept, ids: kept.__setitem__((2, 3), 38), r"kept id 38 at position \(2,\) is in megatron's vocabulary padding \[vocab_size=37, 40\)"),
        (lambda kept, ids: kept.__setitem__((1, 3), 40), r"kept id 40 at position \(1,\) is outside the padded vocabulary \[0, 40\)"),
        (lambda kept, ids: kept.__setitem__((0, 3), -2), r"kept id -2 at position \(0,\) is outside"),
        (lambda kept, ids: kept.__setitem__((3, slice(None)), -1), r"target id \d+ at position \(3,\) is not in that position's kept set"),
        (lambda kept, ids: kept.__setitem__((2, slice(0, 2)), ids[2, 0]), r"kept id \d+ appears twice in the kept set at position \(2,\)"),
    ],
)
def test_bad_kept_sets_name_the_id_or_position(edit, message):
    ids = torch.tensor([[0], [5], [9], [36]])
    kept = torch.full((4, 4), -1, dtype=torch.long)
    kept[:, 0] = ids[:, 0]
    kept[:, 1] = torch.tensor([1, 2, 3, 4])
    edit(kept, ids)
    with pytest.raises(ValueError, match=message):
        vocab_parallel_logprobs(torch.randn(4, PADDED), ids, vocab_size=VOCAB, kept_ids=kept)


def test_kept_ids_shape_and_dtype_are_checked():
    z, ids = torch.randn(4, PADDED), torch.zeros(4, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="kept_ids must be int64"):
        vocab_parallel_logprobs(z, ids, kept_ids=torch.zeros(4, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"padded id lists, never a dense \[\.\.\., V\] mask"):
        vocab_parallel_logprobs(z, ids, kept_ids=torch.zeros(3, 3, dtype=torch.long))


# --- TP = 2 ------------------------------------------------------------------------------------


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    return float(torch.where(both_inf, 0.0, (a - b).abs()).max())


def tp_kept_world() -> dict[str, float]:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.runtime.layout import ParallelLayout

    init_runtime(ParallelLayout(tp=TP), seed=0)
    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    gen = torch.Generator().manual_seed(7)  # the same global inputs on both ranks
    out: dict[str, float] = {}

    calls = {"all_reduce": 0, "other": 0}
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls["all_reduce"] += 1
        return real_all_reduce(*args, **kwargs)

    n, k_max = 12, 7
    for vocab in (VOCAB, 15):  # with 15, rank 1's shard is all padding
        z = 3 * torch.randn(n, PADDED, generator=gen, dtype=F64)
        ids = torch.randint(0, vocab, (n, 1), generator=gen)
        kept = kept_sets(gen, n, k_max, vocab, ids)
        # rows whose kept ids all sit on one rank's shard
        kept[0] = kept_sets(gen, 1, k_max, vocab, torch.tensor([[3]]), 0, min(vocab, PADDED // TP))
        ids[0] = 3
        if vocab > PADDED // TP:
            kept[1] = kept_sets(gen, 1, k_max, vocab, torch.tensor([[25]]), PADDED // TP, vocab)
            ids[1] = 25
        upstream = torch.randn(n, 1, generator=gen, dtype=F64)
        full, part, ref_z = leaf(z), leaf(z.chunk(TP, -1)[rank]), leaf(z)
        lp_1 = vocab_parallel_logprobs(full, ids, temperature=0.8, vocab_size=vocab, kept_ids=kept)
        dist.all_reduce = counting_all_reduce
        try:
            lp_2 = vocab_parallel_logprobs(part, ids, temperature=0.8, vocab_size=vocab, group=group, kept_ids=kept)
        finally:
            dist.all_reduce = real_all_reduce
        ref = reference_kept_logprobs(ref_z, ids, kept, 0.8)
        for x, y in ((lp_1, upstream), (lp_2, upstream), (ref, upstream)):
            x.backward(y)
        out[f"vocab{vocab}/value_tp2_vs_tp1"] = _max_diff(lp_2, lp_1)
        out[f"vocab{vocab}/value_tp2_vs_reference"] = _max_diff(lp_2, ref)
        out[f"vocab{vocab}/grad_tp2_vs_tp1"] = _max_diff(part.grad, full.grad.chunk(TP, -1)[rank])
        out[f"vocab{vocab}/grad_tp2_vs_reference"] = _max_diff(part.grad, ref_z.grad.chunk(TP, -1)[rank])
    out["all_reduces_per_call"] = calls["all_reduce"] / 2

    # GRPO on kept-set log-probs: the loss's gradient in the logit shards at TP=2 equals TP=1's.
    S, T = 3, 4
    z = 2 * torch.randn(S, T, PADDED, generator=gen, dtype=F64)
    tokens = torch.randint(0, VOCAB, (S, T, 1), generator=gen)
    kept = kept_sets(gen, S * T, 5, VOCAB, tokens.reshape(-1, 1)).reshape(S, T, 5)
    old = reference_kept_logprobs(z.reshape(-1, PADDED), tokens.reshape(-1, 1), kept.reshape(-1, 5)).reshape(S, T)
    old = old + 0.3 * torch.randn(S, T, generator=gen, dtype=F64)
    ref_lp = old - 0.2
    adv = torch.tensor([1.0, -0.5, 0.3], dtype=F64)
    mask = torch.ones(S, T, dtype=torch.bool)
    mask[2, 2:] = False
    grads = []
    for logits, g in ((leaf(z), None), (leaf(z.chunk(TP, -1)[rank]), group)):
        lp = vocab_parallel_logprobs(logits, tokens, vocab_size=VOCAB, group=g, kept_ids=kept).squeeze(-1)
        loss, _ = grpo_token_loss(lp, old, adv, mask, ref_logprobs=ref_lp, kl_coef=0.1, opsm_delta=0.2)
        loss.sum().backward()
        grads.append(logits.grad)
    out["grpo/grad_tp2_vs_tp1"] = _max_diff(grads[1], grads[0].chunk(TP, -1)[rank])

    # A kept id in the padding is refused on every rank, before any collective.
    kept_bad = kept.reshape(-1, 5).clone()
    kept_bad[4, 4] = VOCAB + 1
    try:
        vocab_parallel_logprobs(leaf(z.reshape(-1, PADDED).chunk(TP, -1)[rank]), tokens.reshape(-1, 1),
                                vocab_size=VOCAB, group=group, kept_ids=kept_bad)
        out["padding_id_refused"] = 0.0
    except ValueError as e:
        out["padding_id_refused"] = float(f"kept id {VOCAB + 1}" in str(e) and "padding" in str(e))
    parallel_state.destroy_model_parallel()
    return out


def test_tp2_kept_set_logprobs_equal_tp1_and_the_reference():
    results = spawn_world(tp_kept_world, TP, timeout_s=180)
    for rank, got in enumerate(results):
        assert got.pop("all_reduces_per_call") == 1.0, f"rank {rank}: one all-reduce per call"
        assert got.pop("padding_id_refused") == 1.0, f"rank {rank}: a padding id must be refused, naming it"
        assert len(got) == 9
        too_large = {name: err for name, err in got.items() if not err <= 1e-12}
        assert not too_large, f"rank {rank}: TP=2 differs: {too_large}"
