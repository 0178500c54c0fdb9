"""GRPO's token loss, group advantages and aggregation against float64 references.

The references are written token by token from the equations of notes/opd-math.md section 5 with
Python floats (min, clip, exp, log), and their gradients in closed form:
    d policy_it / d log pi = -A_i r_it  where the unclipped side of the min is active, else 0
    d KL_it / d log pi     = r_it (log pi - log pi_ref)      (the ratio not detached)
They share no code with megatron_opd.losses.policy.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from megatron_opd.losses import aggregation_weights, group_advantages, grpo_token_loss

F64 = torch.float64
EPS_LOW, EPS_HIGH = 0.2, 0.28


def reference(logp, old, adv, mask, ref=None, *, eps_low=EPS_LOW, eps_high=EPS_HIGH, kl_coef=0.0, delta=None):
    """(loss, d loss / d logp, dropped sequences, clip_low count, clip_high count, kl sum)."""
    S, T = logp.shape
    loss = [[0.0] * T for _ in range(S)]
    grad = [[0.0] * T for _ in range(S)]
    dropped, low, high, kl_sum = [], 0, 0, 0.0
    for i in range(S):
        a = float(adv[i])
        tokens = [t for t in range(T) if mask[i][t]]
        m_i = 1.0
        if delta is not None and tokens:
            mean_log_ratio = sum(float(old[i][t]) - float(logp[i][t]) for t in tokens) / len(tokens)
            if a < 0 and mean_log_ratio > delta:
                m_i = 0.0
                dropped.append(i)
        for t in tokens:
            lp, lo = float(logp[i][t]), float(old[i][t])
            r = math.exp(lp - lo)
            c = min(max(r, 1 - eps_low), 1 + eps_high)
            policy = -min(r * a, c * a)
            clipped_side = (a > 0 and r > 1 + eps_high) or (a < 0 and r < 1 - eps_low)
            low += a < 0 and r < 1 - eps_low
            high += a > 0 and r > 1 + eps_high
            g = 0.0 if clipped_side else -a * r
            value, dvalue = m_i * policy, m_i * g
            if ref is not None:
                d = float(ref[i][t]) - lp
                kl = r * (math.exp(d) - d - 1)
                kl_sum += kl
                value += kl_coef * kl
                dvalue += kl_coef * r * (lp - float(ref[i][t]))
            loss[i][t], grad[i][t] = value, dvalue
    return torch.tensor(loss, dtype=F64), torch.tensor(grad, dtype=F64), dropped, low, high, kl_sum


def batch(seed: int = 0):
    """Ratios chosen on both sides of both clip bounds (away from the kinks), advantages of both
    signs and zero, ragged masks, and garbage (NaN, -inf) in the padding."""
    gen = torch.Generator().manual_seed(seed)
    S, T = 6, 7
    old = -3 * torch.rand(S, T, generator=gen, dtype=F64) - 0.1
    ratios = torch.tensor([0.5, 0.7, 0.9, 1.0, 1.1, 1.2, 1.5, 2.0], dtype=F64)
    r = ratios[torch.randint(0, len(ratios), (S, T), generator=gen)]
    logp = old + r.log()
    ref = old + 0.5 * torch.randn(S, T, generator=gen, dtype=F64)
    adv = torch.tensor([1.3, -0.7, 0.0, 2.0, -1.5, -0.4], dtype=F64)
    lengths = torch.tensor([7, 5, 3, 6, 4, 1])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = torch.where(mask, old, torch.tensor(float("nan"), dtype=F64))
    ref = torch.where(mask, ref, -math.inf)
    return logp, old, adv, mask, ref


def run(logp, *args, **kwargs):
    leaf = logp.detach().clone().requires_grad_(True)
    loss, metrics = grpo_token_loss(leaf, *args, **kwargs)
    loss.sum().backward()
    return loss.detach(), leaf.grad, metrics


@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
@pytest.mark.parametrize("delta", [None, 0.1])
def test_values_gradients_and_metrics_match_the_equations(kl_coef, delta):
    logp, old, adv, mask, ref = batch()
    # Sequence 1 (A < 0) is far off-policy on its tokens, sequence 3 (A > 0) too, sequence 5
    # (A < 0) only slightly: only sequence 1 may be dropped.
    logp[1, :5] = old[1, :5] - 0.5
    logp[3, :6] = old[3, :6] - 0.5
    logp[5, :1] = old[5, :1] - 0.05
    loss, grad, metrics = run(logp, old, adv, mask, ref_logprobs=ref, eps_low=EPS_LOW, eps_high=EPS_HIGH,
                              kl_coef=kl_coef, opsm_delta=delta)
    ref_loss, ref_grad, dropped, low, high, kl_sum = reference(logp, old, adv, mask, ref, kl_coef=kl_coef, delta=delta)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    assert dropped == ([] if delta is None else [1])
    assert low > 0 and high > 0  # the batch exercises both clip sides
    n = int(mask.sum())
    assert metrics["clip_low"].tolist() == [low, n]
    assert metrics["clip_high"].tolist() == [high, n]
    assert metrics["opsm_masked"].tolist() == [len(dropped), 6]
    ratio_sum = sum(math.exp(logp[i, t] - old[i, t]) for i, t in mask.nonzero().tolist())
    assert metrics["ratio"][0].item() == pytest.approx(ratio_sum, rel=1e-12) and metrics["ratio"][1] == n
    assert metrics["kl"][0].item() == pytest.approx(kl_sum, rel=1e-12) and metrics["kl"][1] == n
    assert all(v.dtype == F64 and v.shape == (2,) and not v.requires_grad for v in metrics.values())


def test_masked_sequence_keeps_its_kl_term_and_loses_its_policy_term():
    logp, old, adv, mask, ref = batch(1)
    # A_1 < 0 and mean(old - logp) = 0.46 > delta; the tokens at r = exp(-0.1) are inside the clip
    # range, so the policy term has a gradient there until the sequence is masked.
    logp[1, :5] = old[1, :5] - torch.tensor([0.1, 0.1, 0.1, 1.0, 1.0], dtype=F64)
    logp[4:6] = old[4:6].nan_to_num(0.0)  # the other A < 0 sequences on-policy: not masked
    on, grad_on, metrics = run(logp, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, opsm_delta=0.3)
    off, grad_off, _ = run(logp, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, opsm_delta=None)
    kl_only, grad_kl, _ = run(logp, old, torch.zeros_like(adv), mask, ref_logprobs=ref, kl_coef=0.1)
    torch.testing.assert_close(on[1], kl_only[1], rtol=0, atol=0)
    torch.testing.assert_close(grad_on[1], grad_kl[1], rtol=0, atol=0)
    assert (grad_off[1] != grad_kl[1]).any() and (off[1] != kl_only[1]).any()  # there without masking
    others = [0, 2, 3, 4, 5]
    torch.testing.assert_close(on[others], off[others], rtol=0, atol=0)
    assert metrics["opsm_masked"].tolist() == [1, 6]


def test_masking_needs_a_negative_advantage_and_a_mean_log_ratio_above_delta():
    S, T = 4, 3
    old = torch.full((S, T), -1.0, dtype=F64)
    shift = torch.tensor([0.5, 0.5, 0.2, 0.5], dtype=F64)  # mean(old - logp) per sequence
    logp = old - shift[:, None]
    adv = torch.tensor([-1.0, 1.0, -1.0, -1.0], dtype=F64)
    mask = torch.ones(S, T, dtype=torch.bool)
    mask[3, 1:] = False
    logp[3, 1:] = old[3, 1:] + 5.0  # off the mask: must not enter sequence 3's mean
    # eps_low=0.5 keeps r = exp(-0.5) inside the clip range: a zero gradient means masked.
    _, grad, metrics = run(logp, old, adv, mask, eps_low=0.5, opsm_delta=0.3)
    dropped = (grad == 0).all(dim=1).tolist()
    assert dropped == [True, False, False, True]  # A > 0 kept; mean 0.2 < delta kept
    assert metrics["opsm_masked"].tolist() == [2, 4]
    _, grad_exact_delta, _ = run(logp, old, adv, mask, eps_low=0.5, opsm_delta=0.5)  # "> delta", not ">="
    assert not (grad_exact_delta == 0).all(dim=1).any()


def test_padding_gets_no_loss_and_no_gradient_whatever_it_holds():
    logp, old, adv, mask, ref = batch(2)
    logp = torch.where(mask, logp, torch.tensor(float("nan"), dtype=F64))
    loss, grad, metrics = run(logp, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, opsm_delta=0.0)
    assert (loss[~mask] == 0).all() and (grad[~mask] == 0).all()
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())
    # a float 0/1 mask is the same mask
    loss_f, grad_f, _ = run(logp, old, adv, mask.to(F64), ref_logprobs=ref, kl_coef=0.1, opsm_delta=0.0)
    torch.testing.assert_close(loss_f, loss, rtol=0, atol=0)
    torch.testing.assert_close(grad_f, grad, rtol=0, atol=0)


def test_unbiased_kl_gradient_closed_form_on_policy():
    """At old == current (r = 1) the KL gradient is log(pi / pi_ref): with A = 0 only it remains."""
    logp, _, adv, mask, ref = batch(3)
    _, grad, _ = run(logp, logp.detach(), torch.zeros_like(adv), mask, ref_logprobs=ref, kl_coef=1.0)
    expected = torch.where(mask, logp - ref, 0.0)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


def test_unbiased_kl_is_unbiased_for_the_kl_and_its_gradient():
    """Averaged over every action under pi_old, the per-token KL term is exactly KL(pi || pi_ref)
    and its gradient in the logits exactly grad KL(pi || pi_ref): what 'ratio not detached' buys."""
    gen = torch.Generator().manual_seed(4)
    V = 9
    theta = torch.randn(V, generator=gen, dtype=F64, requires_grad=True)
    log_old = torch.log_softmax(torch.randn(V, generator=gen, dtype=F64), 0)
    log_ref = torch.log_softmax(torch.randn(V, generator=gen, dtype=F64), 0)

    def expected_term():
        log_pi = torch.log_softmax(theta, 0)
        per_action, _ = grpo_token_loss(
            log_pi[:, None], log_old[:, None], torch.zeros(V, dtype=F64), torch.ones(V, 1, dtype=torch.bool),
            ref_logprobs=log_ref[:, None], kl_coef=1.0,
        )
        return (log_old.exp() * per_action[:, 0]).sum()

    value = expected_term()
    (grad,) = torch.autograd.grad(value, theta)
    log_pi = torch.log_softmax(theta, 0)
    exact = (log_pi.exp() * (log_pi - log_ref)).sum()
    (exact_grad,) = torch.autograd.grad(exact, theta)
    assert value.item() == pytest.approx(exact.item(), rel=1e-12)
    torch.testing.assert_close(grad, exact_grad, rtol=1e-10, atol=1e-12)
    # The same estimator with the ratio detached (plain k3 weighted by a constant r) is biased:
    # the check can tell the difference.
    log_pi = torch.log_softmax(theta, 0)
    d = log_ref - log_pi
    detached = (log_old.exp() * (log_pi - log_old).exp().detach() * (d.exp() - d - 1)).sum()
    (detached_grad,) = torch.autograd.grad(detached, theta)
    assert (detached_grad - exact_grad).abs().max() > 1e-3


def test_gradcheck_float64():
    logp, old, adv, mask, ref = batch(5)
    leaf = logp.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: grpo_token_loss(x, old, adv, mask, ref_logprobs=ref, eps_low=EPS_LOW, eps_high=EPS_HIGH,
                                  kl_coef=0.3, opsm_delta=0.4)[0],
        (leaf,),
    )


def test_metrics_sum_exactly_across_micro_batches():
    logp, old, adv, mask, ref = batch(6)
    kwargs = dict(ref_logprobs=ref, kl_coef=0.1, opsm_delta=0.0)
    _, _, whole = run(logp, old, adv, mask, **kwargs)
    parts = [run(logp[s], old[s], adv[s], mask[s], ref_logprobs=ref[s], kl_coef=0.1, opsm_delta=0.0)[2]
             for s in (slice(0, 1), slice(1, 6))]
    for name, pair in whole.items():
        torch.testing.assert_close(parts[0][name] + parts[1][name], pair, rtol=1e-12, atol=0)


def test_without_reference_no_kl_is_reported_and_kl_coef_needs_one():
    logp, old, adv, mask, ref = batch(7)
    loss, _, metrics = run(logp, old, adv, mask)
    assert "kl" not in metrics
    with_ref, _, _ = run(logp, old, adv, mask, ref_logprobs=ref, kl_coef=0.0)
    torch.testing.assert_close(with_ref, loss, rtol=0, atol=0)  # reported, not added
    with pytest.raises(ValueError, match="kl_coef=0.1 > 0 needs ref_logprobs"):
        grpo_token_loss(logp, old, adv, mask, kl_coef=0.1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(eps_low=1.0), "clip range"),
        (dict(eps_high=-0.1), "clip range"),
        (dict(kl_coef=-1.0), "kl_coef must be"),
        (dict(opsm_delta=math.nan), "opsm_delta must be"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    logp, old, adv, mask, _ = batch(8)
    with pytest.raises(ValueError, match=message):
        grpo_token_loss(logp, old, adv, mask, **kwargs)


def test_bad_inputs_name_the_problem():
    logp, old, adv, mask, ref = batch(9)
    with pytest.raises(ValueError, match=r"old_logprobs \(6, 6\) must have the shape"):
        grpo_token_loss(logp, old[:, :6], adv, mask)
    with pytest.raises(ValueError, match=r"advantages must be \[sequences\] = \[6\]"):
        grpo_token_loss(logp, old, adv[:, None].expand(6, 7), mask)
    bad = old.clone()
    bad[2, 1] = -math.inf
    with pytest.raises(ValueError, match=r"old_logprobs\[2, 1\] is -inf on a response token"):
        grpo_token_loss(logp, bad, adv, mask)
    bad_adv = adv.clone()
    bad_adv[4] = math.nan
    with pytest.raises(ValueError, match="advantage of sequence 4 is nan"):
        grpo_token_loss(logp, old, bad_adv, mask)
    with pytest.raises(ValueError, match="only 0 and 1"):
        grpo_token_loss(logp, old, adv, mask * 0.5)


# --- advantages ---------------------------------------------------------------------------------


def reference_advantages(rewards: list[float], groups: list[int], scale: str, eps: float) -> list[float]:
    out = []
    for r, g in zip(rewards, groups):
        members = [x for x, h in zip(rewards, groups) if h == g]
        a = r - statistics.fmean(members)
        if scale == "std":
            a /= statistics.stdev(members) + eps
        out.append(a)
    return out


@pytest.mark.parametrize("scale", ["none", "std"])
def test_group_advantages_match_the_definition(scale):
    gen = torch.Generator().manual_seed(10)
    rewards = torch.randint(0, 2, (12,), generator=gen).to(F64) + 0.1 * torch.randn(12, generator=gen, dtype=F64)
    rewards[8:12] = 1.0  # a group whose rewards are all equal: A = 0, not 0/0
    contiguous = group_advantages(rewards, group_size=4, scale=scale, eps=1e-6)
    expected = reference_advantages(rewards.tolist(), [i // 4 for i in range(12)], scale, 1e-6)
    torch.testing.assert_close(contiguous, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-12)
    assert (contiguous[8:] == 0).all()
    # the same groups under arbitrary labels, in a shuffled order
    perm = torch.randperm(12, generator=gen)
    labels = torch.tensor([7, 3, 11])[torch.arange(12) // 4]
    shuffled = group_advantages(rewards[perm], group_ids=labels[perm], scale=scale, eps=1e-6)
    torch.testing.assert_close(shuffled, contiguous[perm], rtol=1e-12, atol=1e-12)
    f32 = group_advantages(rewards.float(), group_size=4, scale=scale)
    assert f32.dtype == torch.float32


def test_group_advantages_refuse_bad_groups_and_rewards():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.5])
    with pytest.raises(ValueError, match="exactly one of group_size"):
        group_advantages(rewards)
    with pytest.raises(ValueError, match="exactly one of group_size"):
        group_advantages(rewards, group_size=2, group_ids=torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="group_size=1 must be >= 2"):
        group_advantages(rewards, group_size=1)
    with pytest.raises(ValueError, match="group_size=3 must be >= 2 and divide"):
        group_advantages(rewards, group_size=3)
    with pytest.raises(ValueError, match=r"groups \[5\] have a single sample"):
        group_advantages(rewards, group_ids=torch.tensor([2, 2, 2, 5]))
    with pytest.raises(ValueError, match="reward of sample 2 is nan"):
        group_advantages(torch.tensor([1.0, 0.0, math.nan, 0.5]), group_size=2)
    with pytest.raises(ValueError, match="'none' or 'std'"):
        group_advantages(rewards, group_size=2, scale="mean")


# --- aggregation --------------------------------------------------------------------------------


def test_aggregation_weights_reproduce_token_and_sequence_means_across_micro_batches():
    """The trainer sums (sum(w * loss), count) over micro-batches (and ranks) and divides: that must
    be DAPO's token mean or V3.2's mean over sequences of per-sequence means, however it is split."""
    gen = torch.Generator().manual_seed(11)
    loss = torch.randn(5, 6, generator=gen, dtype=F64)
    lengths = [6, 1, 0, 3, 4]
    mask = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]
    token_mean = sum(float(loss[i, t]) for i in range(5) for t in range(lengths[i])) / sum(lengths)
    seq_mean = statistics.fmean(
        statistics.fmean(float(loss[i, t]) for t in range(lengths[i])) for i in range(5) if lengths[i]
    )
    for rule, expected in (("token", token_mean), ("sequence", seq_mean)):
        total, count = 0.0, 0
        for rows in (slice(0, 2), slice(2, 5)):  # two micro-batches
            w = aggregation_weights(mask[rows], rule, dtype=F64)
            assert (w.weights[~mask[rows]] == 0).all()
            total += float((w.weights * loss[rows]).sum())
            count += int(w.count)
        assert total / count == pytest.approx(expected, rel=1e-12), rule
    assert int(aggregation_weights(mask, "sequence").count) == 4  # the empty sequence is not counted
    with pytest.raises(ValueError, match="'token' \\(DAPO\\) or 'sequence'"):
        aggregation_weights(mask, "group")


def test_only_the_current_log_probs_get_a_gradient():
    logp, old, adv, mask, ref = batch(12)
    consts = [leaf.detach().clone().requires_grad_(True) for leaf in (old.nan_to_num(0.0), adv, ref.nan_to_num(0.0))]
    x = logp.detach().clone().requires_grad_(True)
    loss, _ = grpo_token_loss(x, consts[0], consts[1], mask, ref_logprobs=consts[2], kl_coef=0.1)
    loss.sum().backward()
    assert x.grad is not None and all(c.grad is None for c in consts)
