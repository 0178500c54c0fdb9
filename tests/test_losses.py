"""The reverse-KL family against straightforward float64 references, on one rank (no vocab split).

The references are independent of the code under test: log_softmax on both sides (padding
columns set to -inf first), then sum p (log p - log q), differentiated by autograd.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_opd.losses import (
    count_response_tokens,
    fused_linear_reverse_kl,
    masked_token_mean,
    sampled_kl_policy_loss,
    sampled_reverse_kl,
    topk_reverse_kl,
    vocab_parallel_logprobs,
    vocab_parallel_reverse_kl,
)

F64 = torch.float64


def exclude_padding(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    if vocab_size is None:
        return logits
    column = torch.arange(logits.shape[-1], device=logits.device)
    return torch.where(column < vocab_size, logits, -math.inf)


def reference_log_softmax(logits: torch.Tensor, temperature: float, vocab_size: int | None) -> torch.Tensor:
    return torch.log_softmax(exclude_padding(logits.to(F64), vocab_size) / temperature, dim=-1)


def reference_reverse_kl(z, u, temperature=1.0, vocab_size=None) -> torch.Tensor:
    log_p = reference_log_softmax(z, temperature, vocab_size)
    log_q = reference_log_softmax(u, temperature, vocab_size)
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(dim=-1)


def grad_of(output: torch.Tensor, inputs, upstream: torch.Tensor):
    return torch.autograd.grad(output, inputs, upstream)


def logit_pair(case: str, shape=(2, 3, 11), seed=0):
    """Student/teacher logits for a named situation, float64."""
    gen = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(shape, generator=gen, dtype=F64)
    u = 3 * torch.randn(shape, generator=gen, dtype=F64)
    if case == "huge":
        z, u = z * 3e3, u * 3e3  # logits of about +-1e4
    elif case == "huge_close":  # large logits, small KL: tests cancellation
        u = z * 3e3 + torch.randn(shape, generator=gen, dtype=F64)
        z = z * 3e3
    elif case == "minus_inf":
        z[..., 0] = -math.inf  # masked on both sides
        u[..., 0] = -math.inf
        z[..., 1] = -math.inf  # masked for the student only
        z[0, 0, 5] = -math.inf  # masked for one token only
        u[0, 0, 5] = -math.inf
    return z, u


CASES = [
    # case, temperature, vocab_size
    ("plain", 1.0, None),
    ("plain", 0.5, None),
    ("plain", 2.5, None),
    ("huge", 1.0, None),
    ("huge_close", 1.0, None),
    ("minus_inf", 0.8, None),
    ("plain", 1.0, 8),  # columns 8..10 are padding: random values there must be ignored
    ("minus_inf", 1.7, 9),
]


@pytest.mark.parametrize("case,temperature,vocab_size", CASES)
def test_reverse_kl_matches_float64_reference(case, temperature, vocab_size):
    z, u = logit_pair(case)
    z.requires_grad_(True)
    upstream = torch.randn(z.shape[:-1], dtype=F64)
    kl = vocab_parallel_reverse_kl(z, u, temperature=temperature, vocab_size=vocab_size)
    ref = reference_reverse_kl(z, u, temperature, vocab_size)
    assert kl.shape == z.shape[:-1]
    torch.testing.assert_close(kl, ref, rtol=1e-9, atol=1e-9)
    (grad,) = grad_of(kl, z, upstream)
    (ref_grad,) = grad_of(ref, z, upstream)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-9)
    if vocab_size is not None:
        assert (grad[..., vocab_size:] == 0).all()


@pytest.mark.parametrize("case,temperature,vocab_size", CASES)
def test_float32_inputs_match_float64_reference(case, temperature, vocab_size):
    z, u = logit_pair(case)
    z32 = z.float().requires_grad_(True)
    kl = vocab_parallel_reverse_kl(z32, u.float(), temperature=temperature, vocab_size=vocab_size)
    assert kl.dtype == torch.float32
    # Reference on the same (float32-rounded) inputs: what is left is our float32 arithmetic,
    # whose error scales with the logits' magnitude.
    ref = reference_reverse_kl(z.float(), u.float(), temperature, vocab_size)
    scale = max(1.0, float(z[torch.isfinite(z)].abs().max()) / temperature)
    torch.testing.assert_close(kl.double(), ref, rtol=1e-5, atol=2e-6 * scale)
    (grad,) = grad_of(kl.sum(), z32, None)
    z64 = z.float().double().requires_grad_(True)
    (ref_grad,) = grad_of(reference_reverse_kl(z64, u.float(), temperature, vocab_size).sum(), z64, None)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-5 * scale)


def test_teacher_minus_inf_under_student_mass_is_infinite():
    z, u = logit_pair("plain", shape=(3, 6))
    u[1, 2] = -math.inf  # the student has mass on a column the teacher forbids
    u[2] = -math.inf  # the teacher forbids everything
    kl = vocab_parallel_reverse_kl(z, u)
    assert math.isinf(kl[1]) and kl[1] > 0
    assert math.isinf(kl[2]) and kl[2] > 0
    assert math.isfinite(kl[0])


def test_gradcheck_custom_functions():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(3, 7, generator=gen, dtype=F64, requires_grad=True)
    u = torch.randn(3, 7, generator=gen, dtype=F64)
    z.data[0, 3] = -math.inf
    u.data[0, 3] = -math.inf
    assert torch.autograd.gradcheck(
        lambda z: vocab_parallel_reverse_kl(z, u, temperature=1.3, vocab_size=6), (z,)
    )
    ids = torch.tensor([[0, 5], [2, 1], [4, 4]])
    assert torch.autograd.gradcheck(
        lambda z: vocab_parallel_logprobs(z, ids, temperature=0.7, vocab_size=6), (z,)
    )
    h = torch.randn(5, 4, generator=gen, dtype=F64, requires_grad=True)
    w = torch.randn(7, 4, generator=gen, dtype=F64, requires_grad=True)
    g = torch.randn(5, 3, generator=gen, dtype=F64)
    teachers = [torch.randn(7, 3, generator=gen, dtype=F64) for _ in range(2)]
    teacher_index = torch.tensor([1, 0, 1, 1, 0])
    assert torch.autograd.gradcheck(
        lambda h, w: fused_linear_reverse_kl(
            h, w, g, teachers, teacher_index=teacher_index, temperature=0.9, vocab_size=6, chunk_size=2
        ),
        (h, w),
    )


@pytest.mark.parametrize(
    "chunk_size,upstream_kind",
    [(1, "random"), (3, "random"), (64, "random"), (3, "masked_mean"), (4, "mean")],
)
def test_fused_equals_unfused_with_mixed_teachers(chunk_size, upstream_kind):
    """Every path of the fused backward: per-token gradients that are all different (most rows
    recomputed), a masked mean (only the masked rows corrected), a plain mean (nothing
    recomputed), and a second backward through the same graph (everything recomputed)."""
    gen = torch.Generator().manual_seed(2)
    n, d, d_teacher, padded, vocab = 10, 6, 4, 13, 11
    h = torch.randn(n, d, generator=gen, dtype=F64, requires_grad=True)
    w = torch.randn(padded, d, generator=gen, dtype=F64, requires_grad=True)
    g = torch.randn(n, d_teacher, generator=gen, dtype=F64)
    teachers = [torch.randn(padded, d_teacher, generator=gen, dtype=F64) for _ in range(3)]
    teacher_index = torch.randint(0, 3, (n,), generator=gen)
    upstream = {
        "random": torch.randn(n, generator=gen, dtype=F64),
        "masked_mean": (torch.arange(n) % 4 != 2).to(F64) / 7,
        "mean": torch.full((n,), 1 / n, dtype=F64),
    }[upstream_kind]
    upstream[2] = 0  # a masked row: its gradient is exactly zero

    kl = fused_linear_reverse_kl(
        h, w, g, teachers,
        teacher_index=teacher_index, temperature=1.4, vocab_size=vocab, chunk_size=chunk_size,
    )
    grads = torch.autograd.grad(kl, (h, w), upstream, retain_graph=True)
    again = grad_of(kl, (h, w), upstream)

    teacher_logits = torch.stack([g @ t.T for t in teachers])[teacher_index, torch.arange(n)]
    unfused = vocab_parallel_reverse_kl(h @ w.T, teacher_logits, temperature=1.4, vocab_size=vocab)
    unfused_grads = grad_of(unfused, (h, w), upstream)
    ref = reference_reverse_kl(h @ w.T, teacher_logits, 1.4, vocab)

    torch.testing.assert_close(kl, unfused, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kl, ref, rtol=1e-10, atol=1e-12)
    for got, got_again, want in zip(grads, again, unfused_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_again, want, rtol=1e-10, atol=1e-12)
    assert (grads[0][2] == 0).all()
    assert (grads[1][vocab:] == 0).all()


def test_fused_backward_recomputes_only_rows_off_the_common_gradient(monkeypatch):
    import megatron_opd.losses.fused as fused

    recomputed = []
    kl_grad = fused.kl_grad_

    def counting_kl_grad(a, b, norms, *rest):
        recomputed.append(len(norms))
        return kl_grad(a, b, norms, *rest)

    monkeypatch.setattr(fused, "kl_grad_", counting_kl_grad)
    gen = torch.Generator().manual_seed(9)
    h = torch.randn(12, 5, generator=gen, dtype=F64, requires_grad=True)
    w = torch.randn(9, 5, generator=gen, dtype=F64, requires_grad=True)
    g, t = torch.randn(12, 3, generator=gen, dtype=F64), torch.randn(9, 3, generator=gen, dtype=F64)
    mask = torch.ones(12, dtype=torch.bool)
    mask[[1, 7, 8]] = False
    for expected_rows, per_token_weights in ((0, torch.ones(12)), (3, mask)):
        recomputed.clear()
        kl = fused_linear_reverse_kl(h, w, g, t, chunk_size=4)
        masked_token_mean(kl, per_token_weights.bool(), total_tokens=int(per_token_weights.sum())).backward()
        assert sum(recomputed) == expected_rows


def test_fused_forward_skips_gradient_work_without_autograd(monkeypatch):
    import megatron_opd.losses.fused as fused

    calls = []
    unit_grad = fused.unit_kl_grad_from_statistics_

    def counting_unit_grad(*args):
        calls.append(1)
        return unit_grad(*args)

    monkeypatch.setattr(fused, "unit_kl_grad_from_statistics_", counting_unit_grad)
    gen = torch.Generator().manual_seed(10)
    h = torch.randn(6, 4, generator=gen, dtype=F64, requires_grad=True)
    w = torch.randn(7, 4, generator=gen, dtype=F64, requires_grad=True)
    g, t = torch.randn(6, 3, generator=gen, dtype=F64), torch.randn(7, 3, generator=gen, dtype=F64)
    with torch.no_grad():
        evaluated = fused_linear_reverse_kl(h, w, g, t, chunk_size=4)
    assert calls == []
    trained = fused_linear_reverse_kl(h, w, g, t, chunk_size=4)
    assert len(calls) == 2  # two chunks
    torch.testing.assert_close(evaluated, trained.detach())


def reference_topk(z, ids, log_q, temperature, vocab_size, tail_floor=1e-6):
    log_p = reference_log_softmax(z, temperature, vocab_size).gather(-1, ids)
    p, q = log_p.exp(), log_q.exp()
    p_tail = 1 - p.sum(-1)
    q_tail = (1 - q.sum(-1)).clamp_min(tail_floor)
    return (p * (log_p - log_q)).sum(-1) + p_tail * (p_tail.log() - q_tail.log()), q.sum(-1)


def distinct_ids(rows: int, k: int, vocab: int, gen) -> torch.Tensor:
    return torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(rows)])


def test_topk_matches_reference_and_bounds_the_full_kl():
    gen = torch.Generator().manual_seed(3)
    z, u = logit_pair("plain", shape=(6, 12), seed=3)
    z.requires_grad_(True)
    vocab, temperature = 10, 0.8
    ids = distinct_ids(6, 4, vocab, gen)
    log_q = reference_log_softmax(u, temperature, vocab).gather(-1, ids)
    result = topk_reverse_kl(z, ids, log_q, temperature=temperature, vocab_size=vocab)
    ref_kl, ref_mass = reference_topk(z, ids, log_q, temperature, vocab)
    torch.testing.assert_close(result.kl, ref_kl, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result.teacher_mass, ref_mass, rtol=1e-12, atol=1e-12)
    assert (result.kl <= reference_reverse_kl(z, u, temperature, vocab) + 1e-12).all()
    upstream = torch.randn(6, generator=gen, dtype=F64)
    (grad,) = grad_of(result.kl, z, upstream)
    (ref_grad,) = grad_of(ref_kl, z, upstream)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_topk_with_k_equal_to_vocab_is_the_full_kl():
    gen = torch.Generator().manual_seed(4)
    z, u = logit_pair("plain", shape=(5, 9), seed=4)
    z.requires_grad_(True)
    vocab, temperature = 7, 1.6
    ids = distinct_ids(5, vocab, vocab, gen)
    log_q = reference_log_softmax(u, temperature, vocab).gather(-1, ids)
    result = topk_reverse_kl(z, ids, log_q, temperature=temperature, vocab_size=vocab)
    full = vocab_parallel_reverse_kl(z, u, temperature=temperature, vocab_size=vocab)
    torch.testing.assert_close(result.kl, full, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(result.teacher_mass, torch.ones(5, dtype=F64))
    upstream = torch.randn(5, generator=gen, dtype=F64)
    (grad,) = grad_of(result.kl, z, upstream)
    (full_grad,) = grad_of(full, z, upstream)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, full_grad, rtol=1e-7, atol=1e-10)


def test_sampled_k1_and_its_policy_gradient():
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(4, 6, generator=gen, dtype=F64, requires_grad=True)
    u = torch.randn(4, 6, generator=gen, dtype=F64)
    sampled = torch.randint(0, 6, (4, 1), generator=gen)
    log_p = vocab_parallel_logprobs(z, sampled).squeeze(-1)
    log_q = torch.log_softmax(u, -1).gather(-1, sampled).squeeze(-1)
    k1 = sampled_reverse_kl(log_p, log_q)
    torch.testing.assert_close(k1, torch.log_softmax(z, -1).gather(-1, sampled).squeeze(-1) - log_q)
    surrogate = sampled_kl_policy_loss(log_p, log_q)
    (grad,) = grad_of(surrogate.sum(), z, None)
    # The surrogate's gradient is k1 * grad log p(y): advantage -k1, minimised.
    (score,) = grad_of(vocab_parallel_logprobs(z, sampled).squeeze(-1), z, k1.detach())
    torch.testing.assert_close(grad, score)
    # The expectation of k1 under the student is the exact reverse KL: enumerate every token as
    # the sample, through the package's own logprobs and k1, and weight by p.
    every = torch.arange(6).expand(4, 6)
    k1_all = sampled_reverse_kl(vocab_parallel_logprobs(z, every), torch.log_softmax(u, -1))
    expected_k1 = (torch.softmax(z, -1) * k1_all).sum(-1)
    torch.testing.assert_close(expected_k1, vocab_parallel_reverse_kl(z, u))
    torch.testing.assert_close(expected_k1, reference_reverse_kl(z, u))


def test_bf16_inputs_within_bf16_tolerance():
    gen = torch.Generator().manual_seed(6)
    n, d, padded, vocab = 12, 16, 40, 37
    h = torch.randn(n, d, generator=gen).bfloat16().requires_grad_(True)
    w = (torch.randn(padded, d, generator=gen) / 2).bfloat16().requires_grad_(True)
    g = torch.randn(n, 8, generator=gen).bfloat16()
    t = (torch.randn(padded, 8, generator=gen) / 2).bfloat16()
    upstream = torch.rand(n, generator=gen, dtype=F64)

    h64, w64 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    u64 = g.double() @ t.double().T
    ref = reference_reverse_kl(h64 @ w64.T, u64, 1.2, vocab)
    ref_h, ref_w = grad_of(ref, (h64, w64), upstream)

    kl = fused_linear_reverse_kl(h, w, g, t, temperature=1.2, vocab_size=vocab, chunk_size=5)
    assert kl.dtype == torch.float32
    grad_h, grad_w = grad_of(kl, (h, w), upstream.float())
    assert grad_h.dtype == grad_w.dtype == torch.bfloat16
    # bf16 logits carry ~3 significant digits: the KL and gradients agree to that.
    torch.testing.assert_close(kl.double(), ref, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(grad_h.double(), ref_h, rtol=5e-2, atol=2e-2)
    torch.testing.assert_close(grad_w.double(), ref_w, rtol=5e-2, atol=2e-2)

    z, u = (h.detach() @ w.detach().T).requires_grad_(True), g @ t.T  # bf16 logits
    kl_logits = vocab_parallel_reverse_kl(z, u, temperature=1.2, vocab_size=vocab)
    (grad_z,) = grad_of(kl_logits, z, upstream.float())
    z64 = z.detach().double().requires_grad_(True)
    ref_logits = reference_reverse_kl(z64, u.double(), 1.2, vocab)
    (ref_z,) = grad_of(ref_logits, z64, upstream)
    # Same bf16 inputs on both sides: only our float32 accumulation and the bf16 output differ.
    torch.testing.assert_close(kl_logits.double(), ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_z.double(), ref_z, rtol=1e-2, atol=1e-4)


def test_masked_rows_give_zero_loss_and_zero_gradients():
    gen = torch.Generator().manual_seed(7)
    batch, seq, vocab = 3, 4, 8
    z = torch.randn(batch, seq, vocab, generator=gen, dtype=F64)
    u = torch.randn(batch, seq, vocab, generator=gen, dtype=F64)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[1] = False  # a sequence with no response tokens
    z[1, 0] = -math.inf  # ... whose positions hold no distribution at all
    u[1, 1] = -math.inf
    mask[2, 3] = False
    u[2, 3, 0] = -math.inf  # a masked position with an infinite KL
    z.requires_grad_(True)
    per_token = vocab_parallel_reverse_kl(z, u)
    values = per_token.detach()
    assert not torch.isfinite(values[1, :2]).any() and math.isinf(values[2, 3])
    loss = masked_token_mean(per_token, mask, total_tokens=count_response_tokens([mask]))
    (grad,) = grad_of(loss, z, None)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[1] == 0).all() and (grad[2, 3] == 0).all()
    assert (grad[0] != 0).any()
    torch.testing.assert_close(loss.detach(), values[mask].mean())

    # A step without any response token: zero loss and zero gradients, not 0/0.
    empty = torch.zeros_like(mask)
    per_token = vocab_parallel_reverse_kl(z, u)
    loss = masked_token_mean(per_token, empty, total_tokens=count_response_tokens([empty]))
    (grad,) = grad_of(loss, z, None)
    assert loss == 0 and (grad == 0).all()


def test_masked_token_mean_over_microbatches_and_dp_equals_one_big_batch():
    """Simulate megatron: per-rank gradients summed over micro-batches, then DDP's mean over DP,
    with and without the schedule dividing each micro-batch loss by num_microbatches."""
    gen = torch.Generator().manual_seed(8)
    dp, microbatches, rows, vocab, d = 2, 3, 4, 9, 5
    w = torch.randn(vocab, d, generator=gen, dtype=F64, requires_grad=True)
    hidden = torch.randn(dp, microbatches, rows, d, generator=gen, dtype=F64)
    teacher = torch.randn(dp, microbatches, rows, vocab, generator=gen, dtype=F64)
    # Very uneven token counts, including an empty micro-batch.
    mask = torch.rand(dp, microbatches, rows, generator=gen) < torch.tensor([0.9, 0.2, 0.6])[:, None]
    mask[1, 2] = False
    total = count_response_tokens(mask.unbind(0))

    (big,) = grad_of(
        masked_token_mean(
            vocab_parallel_reverse_kl(hidden @ w.T, teacher), mask, total_tokens=total
        ),
        w,
        None,
    )
    for schedule_divides_by_m in (False, True):
        per_rank = []
        for r in range(dp):
            grad_sum = torch.zeros_like(w)
            for m in range(microbatches):
                kl = vocab_parallel_reverse_kl(hidden[r, m] @ w.T, teacher[r, m])
                loss = masked_token_mean(
                    kl, mask[r, m], total_tokens=total, dp_size=dp,
                    num_microbatches=microbatches if schedule_divides_by_m else 1,
                )
                if schedule_divides_by_m:
                    loss = loss / microbatches
                grad_sum += grad_of(loss, w, None)[0]
            per_rank.append(grad_sum)
        ddp_grad = torch.stack(per_rank).mean(0)  # DDP: average over data-parallel ranks
        torch.testing.assert_close(ddp_grad, big, rtol=1e-10, atol=1e-12)
    # The mean of per-micro-batch means is a different (biased) objective here.
    biased = sum(
        grad_of(
            masked_token_mean(
                vocab_parallel_reverse_kl(hidden[r, m] @ w.T, teacher[r, m]),
                mask[r, m], total_tokens=int(mask[r, m].sum()),
            ),
            w,
            None,
        )[0]
        for r in range(dp)
        for m in range(microbatches)
    ) / (dp * microbatches)
    assert not torch.allclose(biased, big)


def test_bad_inputs_are_named():
    z = torch.randn(2, 5)
    with pytest.raises(ValueError, match="differ in shape"):
        vocab_parallel_reverse_kl(z, torch.randn(2, 6))
    with pytest.raises(ValueError, match="vocab_size=6"):
        vocab_parallel_reverse_kl(z, z, vocab_size=6)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_reverse_kl(z, z, temperature=0.0)
    with pytest.raises(ValueError, match="student_weight"):
        fused_linear_reverse_kl(torch.randn(2, 3), torch.randn(5, 4), torch.randn(2, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="teacher 0's output-layer shard"):
        fused_linear_reverse_kl(torch.randn(2, 3), torch.randn(5, 3), torch.randn(2, 4), torch.randn(6, 4))
    with pytest.raises(ValueError, match="teacher_index"):
        fused_linear_reverse_kl(
            torch.randn(2, 3), torch.randn(5, 3), torch.randn(2, 4), [torch.randn(5, 4)] * 2
        )
    with pytest.raises(ValueError, match=r"teacher_index values must lie in \[0, 2\)"):
        fused_linear_reverse_kl(
            torch.randn(2, 3), torch.randn(5, 3), torch.randn(2, 4), [torch.randn(5, 4)] * 2,
            teacher_index=torch.tensor([0, 2]),
        )
    with pytest.raises(ValueError, match="distinct"):
        topk_reverse_kl(z, torch.tensor([[1, 1], [0, 2]]), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"\[0, vocab_size=4\)"):
        vocab_parallel_logprobs(z, torch.tensor([[4], [0]]), vocab_size=4)
    with pytest.raises(ValueError, match="differ in shape"):
        sampled_reverse_kl(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="same shape"):
        masked_token_mean(torch.zeros(3), torch.ones(4), total_tokens=4)
