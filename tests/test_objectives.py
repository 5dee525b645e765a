"""The math of rlmt.objectives against hand-computed values (arithmetic in the comments) or an independent
numpy / plain-Python formula, plus the split invariants of the loss reductions."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from rlmt.objectives import (
    AGGREGATIONS,
    aggregate_loss,
    approx_kl,
    entropy_from_logits,
    explained_variance,
    gae,
    grape_aggregate,
    group_relative_advantages,
    is_finite_loss,
    kl_k1,
    kl_k3,
    kl_penalized_token_rewards,
    kl_penalty_loss,
    last_token_index,
    loss_normalizer,
    masked_mean,
    masked_sum,
    masked_var,
    nll_loss,
    ppo_clip_loss,
    reinforce_loss,
    return_weights,
    rloo_advantages,
    running_mean_baseline,
    value_loss,
    whiten,
)

T = torch.tensor
NAN = float("nan")


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          atol=tol, rtol=tol, equal_nan=True)


# ---------------------------------------------------------------- aggregate

L = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = T([[1, 1, 0], [1, 0, 0]])


def test_masked_stats_by_hand():
    x = T([1.0, 2.0, 3.0, 100.0])
    m = T([1.0, 1.0, 1.0, 0.0])
    assert close(masked_sum(x, m), 6.0)
    assert close(masked_mean(x, m), 2.0)
    assert close(masked_var(x, m), 2 / 3)  # ((1-2)^2 + 0 + (3-2)^2) / 3
    assert close(masked_var(x, m, unbiased=True), 1.0)  # 2 / (3 - 1)
    assert close(masked_mean(L, M, dim=-1), [1.5, 4.0])  # (1+2)/2, 4/1
    assert close(masked_var(T([5.0, 7.0]), T([1, 0]), unbiased=True), 0.0)  # one sample: 0, not NaN
    assert close(masked_mean(T([NAN, 1.0]), T([0, 1])), 1.0)  # masked NaN does not leak


def test_whiten_has_zero_mean_unit_variance_on_mask():
    x = torch.randn(3, 5) * 4 + 2
    m = T([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]).bool()
    w = whiten(x, m)
    v = x[m].double().numpy()
    assert close(w[m], (v - v.mean()) / np.sqrt(v.var() + 1e-8), 1e-5)
    assert torch.equal(w[~m], torch.zeros_like(w[~m]))
    assert close(masked_mean(whiten(x, m, shift_mean=False), m), masked_mean(x, m), 1e-5)


def test_aggregation_modes_by_hand():
    assert close(aggregate_loss(L, M, "token_mean"), 7 / 3)  # (1 + 2 + 4) / 3 tokens
    assert close(aggregate_loss(L, M, "token_mean", normalizer=7), 1.0)  # 7 / global 7
    assert close(aggregate_loss(L, M, "seq_mean"), 2.75)  # ((1+2)/2 + 4/1) / 2
    assert close(aggregate_loss(L, M, "seq_mean", normalizer=5), 1.1)  # 5.5 / 5
    assert close(aggregate_loss(L, M, "seq_sum"), 3.5)  # ((1+2) + 4) / 2
    assert close(aggregate_loss(L, M, "constant"), 7 / 6)  # 7 / (B * T = 6)
    assert close(aggregate_loss(L, M, "constant", normalizer=10), 0.7)
    assert close(loss_normalizer(M, "token_mean"), 3)
    assert close(loss_normalizer(M, "seq_mean"), 2)
    assert close(loss_normalizer(M, "constant", max_len=16), 32)
    with pytest.raises(ValueError, match="token_mean"):
        aggregate_loss(L, M, "tokenmean")


def test_empty_sequence_is_not_counted_as_a_sequence():
    m = T([[1, 1, 0], [0, 0, 0]])
    assert close(aggregate_loss(L, m, "seq_mean"), 1.5)  # only row 0: (1+2)/2
    assert close(loss_normalizer(m, "seq_sum"), 1)


@pytest.mark.parametrize("mode", sorted(AGGREGATIONS))
@pytest.mark.parametrize("normalizer", [None, 0.0, 12.0])
def test_all_masked_batch_is_finite_zero_with_zero_grad(mode, normalizer):
    theta = torch.zeros(2, 3, requires_grad=True)
    per_token = theta + T([[math.inf, NAN, 1.0], [-math.inf, 2.0, 3.0]])  # garbage under the mask
    loss = aggregate_loss(per_token, torch.zeros(2, 3), mode, normalizer)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(theta.grad, torch.zeros(2, 3))


def test_all_masked_losses_are_finite_zero():
    lp = torch.full((2, 4), -math.inf, requires_grad=True)
    m = torch.zeros(2, 4)
    losses = [
        ppo_clip_loss(lp, torch.zeros(2, 4), T([1.0, -1.0]), m, 0.2)[0],
        reinforce_loss(lp, T([1.0, -1.0]), m)[0],
        kl_penalty_loss(lp, torch.zeros(2, 4), m, 0.1)[0],
        nll_loss(lp, m)[0],
        value_loss(lp, torch.zeros(2, 4), torch.ones(2, 4), m, 0.2)[0],
    ]
    for loss in losses:
        assert is_finite_loss(loss) and loss.item() == 0.0
    sum(losses).backward()
    assert torch.equal(lp.grad, torch.zeros(2, 4))


# Eight sequences of different lengths; a micro-batch is padded only to its own longest sequence.
LENGTHS = [3, 7, 1, 5, 8, 2, 6, 4]
MAX_LEN = 8


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(len(LENGTHS), MAX_LEN, 4, generator=g)
    mask = torch.zeros(len(LENGTHS), MAX_LEN)
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = 1
    return feats, mask


def _per_token_loss(w: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    z = feats @ w  # (B, T)
    return torch.sin(z) + 0.5 * z**2


def _micro(feats, mask, rows):
    t = int(max(LENGTHS[r] for r in rows))
    return feats[rows, :t], mask[rows, :t]


SPLITS = {"1x8": [list(range(8))], "8x1": [[i] for i in range(8)], "2x4": [[0, 1, 2, 3], [4, 5, 6, 7]],
          "uneven": [[4, 1], [0, 2, 3, 5, 6], [7]]}


def _global_normalizer(mask, splits, mode):
    return sum(loss_normalizer(_micro(torch.zeros(8, MAX_LEN, 1), mask, rows)[1], mode, max_len=MAX_LEN)
               for rows in splits)


@pytest.mark.parametrize("mode", sorted(AGGREGATIONS))
@pytest.mark.parametrize("split", sorted(SPLITS))
def test_gradient_accumulation_equals_full_batch(mode, split):
    feats, mask = _batch()
    w0 = torch.randn(4, generator=torch.Generator().manual_seed(1))
    n_global = _global_normalizer(mask, SPLITS[split], mode)

    w = w0.clone().requires_grad_(True)
    full = aggregate_loss(_per_token_loss(w, feats), mask, mode, loss_normalizer(mask, mode, max_len=MAX_LEN))
    (full_grad,) = torch.autograd.grad(full, w)
    if mode != "constant":  # the full batch's own count is the default normalizer
        assert close(full, aggregate_loss(_per_token_loss(w, feats), mask, mode), 1e-6)

    w = w0.clone().requires_grad_(True)
    total = 0.0
    for rows in SPLITS[split]:
        f, m = _micro(feats, mask, rows)
        loss = aggregate_loss(_per_token_loss(w, f), m, mode, n_global)
        loss.backward()
        total = total + loss.detach()
    assert close(total, full.detach(), 1e-6)
    assert close(w.grad, full_grad, 1e-6)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
def test_local_normalizer_breaks_accumulation(mode):
    """The torchtune#2307 failure this API exists to prevent: averaging micro-batch means."""
    feats, mask = _batch()
    w = torch.randn(4, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    (full_grad,) = torch.autograd.grad(aggregate_loss(_per_token_loss(w, feats), mask, mode), w)
    splits = [[2, 5], [0, 1, 3, 4, 6, 7]]
    grads = [torch.autograd.grad(aggregate_loss(_per_token_loss(w, f), m, mode), w)[0] / len(splits)
             for f, m in (_micro(feats, mask, rows) for rows in splits)]
    assert not close(sum(grads), full_grad, 1e-3)


@pytest.mark.parametrize("mode", sorted(AGGREGATIONS))
def test_processes_average_to_the_full_gradient_with_normalizer_over_world_size(mode):
    """DDP averages gradients over W ranks, so each rank passes normalizer = N_global / W."""
    feats, mask = _batch()
    w0 = torch.randn(4, generator=torch.Generator().manual_seed(2))
    ranks = [[0, 3, 5], [1, 2, 4, 6, 7]]  # uneven shards
    n_global = _global_normalizer(mask, ranks, mode)
    w = w0.clone().requires_grad_(True)
    (full_grad,) = torch.autograd.grad(aggregate_loss(_per_token_loss(w, feats), mask, mode, n_global), w)
    rank_grads = []
    for rows in ranks:
        f, m = _micro(feats, mask, rows)
        loss = aggregate_loss(_per_token_loss(w, f), m, mode, n_global / len(ranks))
        rank_grads.append(torch.autograd.grad(loss, w)[0])
    assert close(torch.stack(rank_grads).mean(0), full_grad, 1e-6)  # what all_reduce(AVG) computes


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "constant"])
def test_ppo_loss_accumulates_like_the_full_batch(aggregation):
    feats, mask = _batch()
    adv = torch.randn(8, generator=torch.Generator().manual_seed(3))
    old = -torch.rand(8, MAX_LEN, generator=torch.Generator().manual_seed(4))
    w0 = 0.3 * torch.randn(4, generator=torch.Generator().manual_seed(5))
    n_global = loss_normalizer(mask, aggregation, max_len=MAX_LEN)

    def loss_of(w, rows):
        f, m = _micro(feats, mask, rows)
        return ppo_clip_loss(old[rows, : m.shape[1]] + f @ w, old[rows, : m.shape[1]], adv[rows], m, 0.2,
                             aggregation=aggregation, normalizer=n_global)[0]

    w = w0.clone().requires_grad_(True)
    (full_grad,) = torch.autograd.grad(loss_of(w, list(range(8))), w)
    for rows in SPLITS["2x4"]:
        loss_of(w, rows).backward()
    assert close(w.grad, full_grad, 1e-6)


# ---------------------------------------------------------------- advantages


def test_group_relative_advantages_by_hand():
    r = T([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # group 0: mean 0.5, sample std sqrt(4 * 0.25 / 3) = sqrt(1/3); group 1: all equal -> exactly 0
    a = group_relative_advantages(r, 4)
    s = math.sqrt(1 / 3) + 1e-6
    assert close(a[:4], [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s])
    assert torch.equal(a[4:], torch.zeros(4))
    assert close(group_relative_advantages(r, 4, scale="none"), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])


def test_group_relative_advantages_match_numpy():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(5, 6))
    expected = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-6)
    got = group_relative_advantages(torch.from_numpy(r.reshape(-1)).float(), 6)
    assert close(got, expected.reshape(-1), 1e-5)
    assert got.dtype == torch.float32


@pytest.mark.parametrize("value", [0.1, 1 / 3, 0.7, -123.456, 1e6 + 0.1])
@pytest.mark.parametrize("leave_one_out", [False, True])
def test_equal_rewards_give_exactly_zero(value, leave_one_out):
    r = torch.full((7,), value, dtype=torch.float32)  # 0.1 * 7 / 7 != 0.1 in floating point
    for scale in ("std", "none"):
        a = group_relative_advantages(r, 7, scale=scale, leave_one_out=leave_one_out)
        assert torch.equal(a, torch.zeros(7))


def test_leave_one_out_by_hand():
    # sum 12: baselines 11/3, 10/3, 9/3, 6/3 -> advantages -8/3, -4/3, 0, 4
    r = T([1.0, 2.0, 3.0, 6.0])
    assert close(rloo_advantages(r, 4), [-8 / 3, -4 / 3, 0.0, 4.0], 1e-6)
    loop = [r[i].item() - (r.sum().item() - r[i].item()) / 3 for i in range(4)]
    assert close(rloo_advantages(r, 4), loop, 1e-6)
    std = float(np.std([1, 2, 3, 6], ddof=1))  # sqrt(14/3)
    assert close(group_relative_advantages(r, 4, leave_one_out=True), np.array(loop) / (std + 1e-6), 1e-6)


def test_missing_rewards_are_left_out_of_the_group():
    # present {1, 3}: mean 2, sample std sqrt(2); the missing one gets 0
    a = group_relative_advantages(T([1.0, NAN, 3.0, NAN, NAN, 5.0]), 3)
    s = math.sqrt(2) + 1e-6
    assert close(a, [-1 / s, 0.0, 1 / s, 0.0, 0.0, 0.0])  # group 1 has one present reward: no signal
    with pytest.raises(ValueError):
        group_relative_advantages(T([1.0, 2.0, 3.0]), 2)


def test_running_mean_baseline():
    assert running_mean_baseline(None, 5.0, 0.9) == 5.0
    assert close(running_mean_baseline(5.0, 1.0, 0.9), 4.6)  # 0.9 * 5 + 0.1 * 1


def _gae_loop(rewards, values, mask, gamma, lam):
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
        last_adv, next_v = 0.0, 0.0
        for t in reversed(idx):
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            last_adv = delta + gamma * lam * last_adv
            adv[b, t], next_v = last_adv, values[b, t]
    return adv, (adv + values) * mask


def test_gae_by_hand():
    # delta_1 = 1 + 0 - 0.4 = 0.6 = A_1;  delta_0 = 0 + 0.9 * 0.4 - 0.2 = 0.16; A_0 = 0.16 + 0.72 * 0.6 = 0.592
    adv, ret = gae(T([[0.0, 1.0, 9.0]]), T([[0.2, 0.4, 9.0]]), T([[1, 1, 0]]), gamma=0.9, lam=0.8)
    assert close(adv, [[0.592, 0.6, 0.0]]) and close(ret, [[0.792, 1.0, 0.0]])
    # gamma = lam = 1: A_t = sum of future rewards - V_t
    adv, _ = gae(T([[0.0, 0.0, 1.0]]), T([[0.5, 0.5, 0.5]]), T([[1, 1, 1]]), 1.0, 1.0)
    assert close(adv, [[0.5, 0.5, 0.5]])


def test_gae_matches_python_loop_with_offsets_and_padding():
    rng = np.random.default_rng(1)
    rewards, values = rng.normal(size=(4, 9)), rng.normal(size=(4, 9))
    mask = np.zeros((4, 9))
    mask[0, 0:9] = 1  # full row
    mask[1, 3:7] = 1  # prompt offset and right padding
    mask[2, 5:6] = 1  # a single response token
    mask[3, [1, 2, 5, 6]] = 1  # a masked gap inside is skipped
    exp_adv, exp_ret = _gae_loop(rewards, values, mask, 0.95, 0.9)
    adv, ret = gae(torch.from_numpy(rewards), torch.from_numpy(values), torch.from_numpy(mask).bool(), 0.95, 0.9)
    assert close(adv, exp_adv, 1e-9) and close(ret, exp_ret, 1e-9)


def test_kl_penalized_token_rewards_by_hand():
    old = T([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0], [0.0, 0.0, 0.0]])
    ref = T([[-1.5, -2.0, -2.0], [-0.5, -2.0, -1.0], [0.0, 0.0, 0.0]])
    mask = T([[1, 1, 0], [0, 1, 1], [0, 0, 0]])
    r = kl_penalized_token_rewards(T([2.0, 5.0, 7.0]), old, ref, mask, beta=0.1)
    # row 0: kl (0.5, 0); score 2 at t=1.  row 1: kl (1, 0) on t=1,2; score 5 at t=2.  row 2: no tokens.
    assert close(r, [[-0.05, 2.0, 0.0], [0.0, -0.1, 5.0], [0.0, 0.0, 0.0]])
    assert last_token_index(mask).tolist() == [1, 2, -1]


# ---------------------------------------------------------------- KL, entropy


def test_kl_estimators_by_hand():
    logp, ref = T([-1.0, -2.0, -1.0]), T([-2.0, -1.0, -1.0])
    assert close(kl_k1(logp, ref), [1.0, -1.0, 0.0])
    # d = ref - logp = (-1, 1, 0): e^d - d - 1 = (e^-1, e - 2, 0)
    assert close(kl_k3(logp, ref), [math.exp(-1), math.e - 2, 0.0])
    x, y = torch.randn(1000) * 3, torch.randn(1000) * 3
    assert (kl_k3(x, y) >= 0).all()


def test_k1_and_k3_estimate_the_exact_kl():
    rng = np.random.default_rng(0)
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.3, 0.3, 0.4])
    exact = float(np.sum(p * np.log(p / q)))
    y = rng.choice(3, size=400_000, p=p)
    logp, logq = torch.from_numpy(np.log(p)[y]), torch.from_numpy(np.log(q)[y])
    assert abs(kl_k3(logp, logq).mean().item() - exact) < 3e-3
    assert abs(kl_k1(logp, logq).mean().item() - exact) < 3e-3


def test_approx_kl_by_hand():
    # ratio 2 on one token: (2 - 1) - ln 2; the masked token is ignored
    got = approx_kl(T([[math.log(2), 5.0]]), T([[0.0, 0.0]]), T([[1, 0]]))
    assert close(got, 1 - math.log(2))


def test_entropy_from_logits():
    p = np.array([0.5, 0.25, 0.25])
    assert close(entropy_from_logits(torch.log(torch.from_numpy(p))), 1.5 * math.log(2))  # -sum p ln p
    assert close(entropy_from_logits(torch.zeros(2, 3, 7)), torch.full((2, 3), math.log(7)))
    assert close(entropy_from_logits(T([0.0, 0.0, -math.inf])), math.log(2))
    assert close(entropy_from_logits(T([1000.0, 0.0, -1000.0])), 0.0)
    logits = torch.randn(3, 5, 11)
    ref = -(torch.softmax(logits.double(), -1) * torch.log_softmax(logits.double(), -1)).sum(-1)
    assert close(entropy_from_logits(logits, chunk_size=4), ref, 1e-5)
    half = entropy_from_logits(logits.bfloat16(), chunk_size=2)
    assert half.dtype == torch.float32 and half.shape == (3, 5)


# ---------------------------------------------------------------- policy losses


def _ppo_case():
    ratios = T([[1.1, 1.5, 0.5, 1.0], [0.9, 0.5, 1.5, 1.0]])
    logprobs = torch.log(ratios).requires_grad_(True)
    mask = T([[1, 1, 1, 0], [1, 1, 1, 0]])
    return logprobs, torch.zeros(2, 4), T([1.0, -2.0]), mask


def test_ppo_clip_loss_by_hand_with_gradients():
    logprobs, old, adv, mask = _ppo_case()
    loss, metrics = ppo_clip_loss(logprobs, old, adv, mask, clip_eps=0.2)
    # A = +1: r 1.1 -> -1.1 (inside);  r 1.5 -> max(-1.5, -1.2) = -1.2 (clipped);  r 0.5 -> max(-0.5, -0.8) = -0.5
    # A = -2: r 0.9 -> 1.8 (inside);   r 0.5 -> max(1.0, 1.6) = 1.6 (clipped);     r 1.5 -> max(3.0, 2.4) = 3.0
    # token mean over 6: (-1.1 - 1.2 - 0.5 + 1.8 + 1.6 + 3.0) / 6 = 0.6
    assert close(loss, 0.6)
    loss.backward()
    # d l / d logp = -A * ratio where unclipped, 0 where the clip binds; / 6 tokens
    assert close(logprobs.grad, T([[-1.1, 0.0, -0.5, 0.0], [1.8, 0.0, 3.0, 0.0]]) / 6)
    assert close(metrics["clip_frac"], 2 / 6) and close(metrics["clip_frac_low"], 1 / 6)
    assert close(metrics["clip_frac_high"], 1 / 6)
    assert close(metrics["ratio_mean"], 1.0) and close(metrics["ratio_max"], 1.5)  # (1.1+1.5+.5+.9+.5+1.5)/6
    r = np.array([1.1, 1.5, 0.5, 0.9, 0.5, 1.5])
    assert close(metrics["approx_kl"], np.mean(r - 1 - np.log(r)))
    assert all(isinstance(v, float) for v in metrics.values())


def test_ppo_clip_loss_asymmetric_and_per_token_advantages():
    logprobs, old, adv, mask = _ppo_case()
    loss, metrics = ppo_clip_loss(logprobs, old, adv, mask, clip_eps=0.2, clip_eps_high=0.6)
    # r 1.5 with A = +1 is now inside [0.8, 1.6]: -1.5 instead of -1.2 -> (3.6 - 0.3) / 6 = 0.55
    assert close(loss, 0.55) and close(metrics["clip_frac_high"], 0.0)
    loss.backward()
    assert close(logprobs.grad, T([[-1.1, -1.5, -0.5, 0.0], [1.8, 0.0, 3.0, 0.0]]) / 6)
    per_token_adv = adv[:, None].expand(2, 4).clone()
    assert close(ppo_clip_loss(logprobs, old, per_token_adv, mask, 0.2)[0], 0.6)


def test_reinforce_loss_by_hand():
    logprobs = T([[-1.0, -2.0], [-0.5, -math.inf]]).requires_grad_(True)
    mask = T([[1, 1], [1, 0]])
    loss, _ = reinforce_loss(logprobs, T([2.0, -1.0]), mask)
    # -(2) * (-3) = 6 and -(-1) * (-0.5) = -0.5; mean over 2 sequences = 2.75
    assert close(loss, 2.75)
    loss.backward()
    assert close(logprobs.grad, [[-1.0, -1.0], [0.5, 0.0]])  # -A / 2


def test_kl_penalty_loss_by_hand():
    logp, ref, mask = T([[-1.0, -2.0, 0.0]]), T([[-2.0, -1.0, 9.0]]), T([[1, 1, 0]])
    loss, metrics = kl_penalty_loss(logp, ref, mask, beta=0.5)
    k3 = (math.exp(-1) + math.e - 2) / 2  # token mean of (e^-1, e - 2)
    assert close(loss, 0.5 * k3) and close(metrics["kl"], k3)
    assert close(kl_penalty_loss(logp, ref, mask, beta=0.5, estimator="k1")[0], 0.0)  # (1 - 1) / 2
    with pytest.raises(ValueError):
        kl_penalty_loss(logp, ref, mask, 0.5, estimator="k2")


def test_value_loss_clipping_by_hand():
    values = T([[1.0, 2.0, 0.0, 7.0]]).requires_grad_(True)
    old, ret, mask = T([[0.5, 2.0, 0.3, 0.0]]), T([[2.0, 1.0, 0.0, 0.0]]), T([[1, 1, 1, 0]])
    loss, metrics = value_loss(values, old, ret, mask, clip_eps_value=0.2)
    # t0: v_clip = 0.5 + 0.2 = 0.7: max((1-2)^2, (0.7-2)^2) = 1.69 (clipped);  t1: v = old: max(1, 1) = 1
    # t2: v_clip = 0.3 - 0.2 = 0.1: max(0, 0.01) = 0.01 (clipped);  loss = 0.5 * (1.69 + 1 + 0.01) / 3 = 0.45
    assert close(loss, 0.45) and close(metrics["clipfrac_value"], 2 / 3)
    loss.backward()
    assert close(values.grad, [[0.0, 1 / 3, 0.0, 0.0]])  # 0.5 * 2 (v - R) / 3 on t1 only
    o, r = np.array([0.5, 2.0, 0.3]), np.array([2.0, 1.0, 0.0])
    assert close(metrics["explained_variance"], 1 - np.var(r - o) / np.var(r))
    assert close(value_loss(values, old, ret, mask, None)[0], 1 / 3)  # 0.5 * (1 + 1 + 0) / 3


def test_explained_variance_by_hand():
    target, mask = T([1.0, 2.0, 3.0, 50.0]), T([1, 1, 1, 0])
    assert close(explained_variance(target, target, mask), 1.0)
    assert close(explained_variance(T([2.0, 2.0, 2.0, 0.0]), target, mask), 0.0)  # 1 - (2/3) / (2/3)
    assert close(explained_variance(T([3.0, 2.0, 1.0, 0.0]), target, mask), -3.0)  # 1 - (8/3) / (2/3)
    assert math.isnan(explained_variance(target, T([4.0, 4.0, 4.0, 1.0]), mask))


def test_nll_loss_and_return_weights_by_hand():
    logprobs, mask = T([[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]]), T([[1, 1, 0], [1, 0, 0]])
    loss, metrics = nll_loss(logprobs, mask)
    assert close(loss, 2.0) and close(metrics["nll"], 2.0)  # (1 + 2 + 3) / 3
    loss, metrics = nll_loss(logprobs, mask, weights=T([2.0, 0.5]))
    assert close(loss, 2.5) and close(metrics["nll"], 2.0)  # (2*1 + 2*2 + 0.5*3) / 3
    assert close(return_weights(T([0.0, math.log(2)]), tau=1.0), [2 / 3, 4 / 3])  # exp: 1, 2; mean 1.5
    w = return_weights(T([1000.0, 0.0, -1000.0, 500.0]), tau=0.5)
    assert torch.isfinite(w).all() and close(w.mean(), 1.0)
    assert close(return_weights(T([1.0, 5.0]), tau=1e9), [1.0, 1.0])


def test_is_finite_loss():
    assert is_finite_loss(T(1.0)) and not is_finite_loss(T(NAN)) and not is_finite_loss(T(math.inf))


# ---------------------------------------------------------------- GRAPE

S = T([[1.0, 0.5, 0.0], [0.0, NAN, 1.0], [1.0, 1.0, 0.5], [NAN, NAN, 1.0]])
C = T([[1.0, 0.8, 0.0], [1.0, NAN, 0.0], [1.0, 0.4, 0.0], [NAN, NAN, 0.0]])
W = T([1.0, 2.0, 1.0])


def test_grape_aggregate_by_hand():
    reward, phi = grape_aggregate(S, C, W)
    # phi = (1, (0.8 + 0.4) / 2 = 0.6, 0): item 1 is missing for response 1; item 2 has confidence 0 everywhere
    assert close(phi, [[1.0, 0.6, 0.0]])
    # R0 = (1*1*1 + 2*0.6*0.5) / (1 + 2*0.6) = 1.6 / 2.2;  R1 = (1*1*0) / 1 = 0 (item 1 missing)
    # R2 = (1 + 2*0.6*1) / 2.2 = 1;  R3: only item 2 (phi 0) -> denominator 0 -> NaN (missing, not 0)
    assert close(reward, [1.6 / 2.2, 0.0, 1.0, NAN])
    assert torch.isnan(reward[3])


def test_grape_groups_use_their_own_confidences():
    s2, c2 = torch.cat([S, S]), torch.cat([C, C])
    c2[4:, 1] = T([0.2, NAN, 0.2, NAN])  # group 1: phi_1 = 0.2
    by_ids, phi = grape_aggregate(s2, c2, W, groups=T([5, 5, 5, 5, 9, 9, 9, 9]))
    by_list, _ = grape_aggregate(s2, c2, W, groups=[[0, 1, 2, 3], [4, 5, 6, 7]])
    assert close(phi, [[1.0, 0.6, 0.0], [1.0, 0.2, 0.0]])
    # group 1: R4 = (1 + 2*0.2*0.5) / (1 + 0.4) = 1.2 / 1.4;  R6 = (1 + 0.4) / 1.4 = 1
    assert close(by_ids, [1.6 / 2.2, 0.0, 1.0, NAN, 1.2 / 1.4, 0.0, 1.0, NAN])
    assert close(by_list, by_ids)
    with pytest.raises(ValueError):
        grape_aggregate(s2, c2, W, groups=[[0, 1, 2, 3], [3, 4, 5, 6, 7]])
    with pytest.raises(ValueError):
        grape_aggregate(s2, c2, W, groups=[[0, 1, 2, 3]])


def test_grape_matches_a_python_loop():
    rng = np.random.default_rng(3)
    s, c = rng.uniform(size=(6, 4)), rng.uniform(size=(6, 4))
    s[rng.uniform(size=(6, 4)) < 0.3] = np.nan
    c[np.isnan(s)] = np.nan
    w = rng.uniform(0.5, 2, size=4)
    groups = [[0, 2, 4], [1, 3, 5]]
    expected = np.full(6, np.nan)
    for members in groups:
        phi = [np.nanmean(c[members, j]) if np.isfinite(c[members, j]).any() else 0.0 for j in range(4)]
        for i in members:
            js = [j for j in range(4) if np.isfinite(s[i, j])]
            den = sum(w[j] * phi[j] for j in js)
            if den > 0:
                expected[i] = sum(w[j] * phi[j] * s[i, j] for j in js) / den
    got, _ = grape_aggregate(torch.from_numpy(s), torch.from_numpy(c), torch.from_numpy(w), groups)
    assert close(got, expected, 1e-9)


def test_objectives_import_nothing_heavy():
    code = "import sys, rlmt.objectives; print([m for m in ('transformers', 'yaml', 'peft') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
