"""Advantage estimators: group-relative (GRPO, RLOO), running-mean baselines (REINFORCE) and GAE (PPO).

Sequence-level rewards are (N * G,), contiguous by prompt: responses ``[p*G, (p+1)*G)`` answer prompt p.
Per-token tensors are (B, T) with a 0/1 ``mask`` (B, T) on response tokens. Everything here is computed
without gradient: advantages and returns are targets, not functions of the parameters being trained.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlmt.objectives.kl import kl_k1, kl_k3


@torch.no_grad()
def group_relative_advantages(rewards: Tensor, group_size: int, scale: str = "std", eps: float = 1e-6,
                              leave_one_out: bool = False) -> Tensor:
    """Group-relative advantages, one per response: (N * G,) -> (N * G,).

    ``A_i = (r_i - b_i) / (std_g + eps)`` (``scale="std"``) or ``A_i = r_i - b_i`` (``scale="none"``), where
    the baseline b_i is the group mean, or with ``leave_one_out`` the mean of the other members
    ``(sum_g r - r_i) / (n - 1)`` (RLOO), so that ``r_i - b_i = n / (n - 1) * (r_i - mean_g)``.

    std_g is the *sample* (unbiased, n - 1) standard deviation of the group, as ``torch.std`` computes it and
    as TRL's GRPOTrainer uses it, so results compare one-to-one with TRL. Non-finite rewards (a response that
    could not be scored) are left out of their group's statistics and get advantage 0; the caller should
    also mask them out of the loss. A group whose present rewards are all equal, or with fewer than two
    present, gets advantages of exactly 0 (not rounding noise divided by eps): it carries no signal.
    """
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.reshape(-1, group_size).to(torch.float64)  # (N, G); float64 so equal rewards stay equal
    present = torch.isfinite(r)
    n = present.sum(-1, keepdim=True).to(r.dtype)  # (N, 1)
    r0 = torch.where(present, r, torch.zeros_like(r))
    mean = r0.sum(-1, keepdim=True) / n.clamp_min(1)
    dev = torch.where(present, r - mean, torch.zeros_like(r))  # (N, G)
    hi = torch.where(present, r, torch.full_like(r, -torch.inf)).amax(-1, keepdim=True)
    lo = torch.where(present, r, torch.full_like(r, torch.inf)).amin(-1, keepdim=True)
    informative = (n >= 2) & (hi > lo)
    adv = dev * n / (n - 1).clamp_min(1) if leave_one_out else dev
    if scale == "std":
        std = ((dev**2).sum(-1, keepdim=True) / (n - 1).clamp_min(1)).sqrt()
        adv = adv / (std + eps)
    adv = torch.where(informative & present, adv, torch.zeros_like(adv))
    return adv.reshape(rewards.shape).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO: ``A_i = r_i - mean_{j != i} r_j`` within each group, unscaled. (N * G,) -> (N * G,)."""
    return group_relative_advantages(rewards, group_size, scale="none", leave_one_out=True)


def running_mean_baseline(prev_mean: float | None, batch_mean: float, momentum: float) -> float:
    """REINFORCE's moving baseline: ``b <- momentum * b + (1 - momentum) * batch_mean``; the first batch sets b."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    if prev_mean is None:
        return float(batch_mean)
    return float(momentum * prev_mean + (1.0 - momentum) * batch_mean)


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over response tokens (Schulman et al. 2016, eq. 16).

    rewards, values, mask: (B, T) -> advantages, returns: (B, T), zero where the mask is 0.
    Over the response tokens t_1 < t_2 < ... < t_n of a row (the mask may start at any offset, e.g. after
    the prompt, and is right-padded; masked positions inside are skipped as if absent):

        delta_k = r_{t_k} + gamma * V_{t_{k+1}} - V_{t_k},   with V_{t_{n+1}} = 0 (the episode ends)
        A_{t_k} = delta_k + gamma * lam * A_{t_{k+1}},        with A_{t_{n+1}} = 0
        returns = A + V
    """
    m = mask != 0
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    adv = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a_t = delta + gamma * lam * next_adv
        adv[:, t] = torch.where(m[:, t], a_t, torch.zeros_like(a_t))
        next_value = torch.where(m[:, t], values[:, t], next_value)
        next_adv = torch.where(m[:, t], a_t, next_adv)
    returns = torch.where(m, adv + values, torch.zeros_like(adv))
    return adv, returns


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last response token of each row, -1 for rows without one. mask: (B, T) -> (B,) long."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask != 0, positions, torch.full_like(positions, -1)).amax(-1)


@torch.no_grad()
def kl_penalized_token_rewards(score: Tensor, logprobs_old: Tensor, logprobs_ref: Tensor, mask: Tensor,
                               beta: float, estimator: str = "k1") -> Tensor:
    """PPO's per-token reward: the KL penalty on every response token plus the score on the last one.

    score: (B,); logprobs_old, logprobs_ref, mask: (B, T) -> (B, T), zero off the mask.

        r_t = -beta * k(log pi_old(y_t), log pi_ref(y_t)) + [t = last response token] * score

    with k the per-token estimator: k1 = log pi_old - log pi_ref (the usual RLHF penalty, whose sum over the
    response is the sampled sequence KL), or k3 (:func:`rlmt.objectives.kl.kl_k3`, >= 0 on every token).

    A row without response tokens gets no reward at all (there is no token to put its score on).
    """
    m = mask != 0
    k = {"k1": kl_k1, "k3": kl_k3}[estimator](logprobs_old, logprobs_ref)
    kl = torch.where(m, k, torch.zeros_like(logprobs_old))
    last = last_token_index(mask)  # (B,)
    positions = torch.arange(mask.shape[-1], device=mask.device)
    at_last = (positions[None, :] == last[:, None]) & (last[:, None] >= 0)  # (B, T)
    return -beta * kl + at_last.to(kl.dtype) * score.to(kl.dtype)[:, None]
