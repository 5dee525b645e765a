"""Policy, value and likelihood losses for the online loop (and SFT's NLL), each ``-> (loss, metrics)``.

Shapes: per-token tensors (B, T) with a 0/1 ``mask`` (B, T) on response tokens; sequence tensors (B,).
``aggregation`` names a reduction of :mod:`rlmt.objectives.aggregate` ("token_mean", "seq_mean",
"seq_sum", "constant") and ``normalizer`` its global unit count (pass it under gradient accumulation or
several processes; see that module). Metrics are detached Python floats over this (micro-)batch: the
loss-valued ones (``policy_loss``, ``value_loss``, ...) are this micro-batch's term of the loss, which sum
over micro-batches to the full-batch loss under a global normalizer; the others are token means that the
trainer averages. Masked positions may hold any value, -inf included:
they are replaced before any arithmetic, so they add nothing to the loss and receive zero gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlmt.objectives.aggregate import Normalizer, aggregate_loss, masked_mean, masked_var
from rlmt.objectives.kl import approx_kl, kl_k1, kl_k3

KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


def _on_mask(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask != 0, x, torch.zeros_like(x))


def _per_token(advantages: Tensor, like: Tensor) -> Tensor:
    """(B,) sequence advantages broadcast to (B, T); (B, T) passed through."""
    return advantages[:, None].expand_as(like) if advantages.ndim == 1 else advantages


def ppo_clip_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float,
                  clip_eps_high: float | None = None, aggregation: str = "token_mean",
                  normalizer: Normalizer | None = None) -> tuple[Tensor, dict[str, float]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise.

    logprobs (with grad), old_logprobs, mask: (B, T); advantages: (B,) (same A on every token, GRPO) or
    (B, T) (GAE). With ratio_t = exp(logprobs_t - old_logprobs_t) and the clip range
    [1 - clip_eps, 1 + clip_eps_high] (``clip_eps_high`` defaults to ``clip_eps``; larger is DAPO's
    clip-higher):

        l_t = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps_low, 1 + eps_high)),  loss = aggregate(l)

    Metrics: ``policy_loss``; ``clip_frac`` = share of tokens where the clipped term is the larger, i.e.
    whose gradient the clip zeroes (``clip_frac_low``: ratio < 1 - eps_low with A < 0; ``clip_frac_high``:
    ratio > 1 + eps_high with A > 0); ``approx_kl`` = KL(pi_old || pi) by k3; ``ratio_mean``, ``ratio_max``.
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    logratio = _on_mask(logprobs - old_logprobs, mask)
    ratio = torch.exp(logratio)
    adv = _on_mask(_per_token(advantages, logprobs).to(ratio.dtype), mask)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high)
    per_token = torch.maximum(unclipped, clipped)
    loss = aggregate_loss(per_token, mask, aggregation, normalizer)
    with torch.no_grad():
        low = (ratio < 1.0 - clip_eps) & (adv < 0)
        high = (ratio > 1.0 + eps_high) & (adv > 0)
        on = mask != 0
        metrics = {
            "policy_loss": float(loss.detach()),
            "clip_frac": float(masked_mean((low | high).float(), mask)),
            "clip_frac_low": float(masked_mean(low.float(), mask)),
            "clip_frac_high": float(masked_mean(high.float(), mask)),
            "approx_kl": float(approx_kl(logprobs, old_logprobs, mask)),
            "ratio_mean": float(masked_mean(ratio, mask)),
            "ratio_max": float(ratio[on].max()) if on.any() else 1.0,
        }
    return loss, metrics


def gspo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float,
              clip_eps_high: float | None = None, aggregation: str = "seq_mean",
              normalizer: Normalizer | None = None) -> tuple[Tensor, dict[str, float]]:
    """GSPO's clipped surrogate with a sequence-level importance ratio (Zheng et al. 2025, eqs. 5-7).

    logprobs (with grad), old_logprobs, mask: (B, T); advantages: (B,) one per sequence (group-relative).
    With n_i the response tokens of sequence i, the ratio is the length-normalized sequence likelihood ratio

        s_i = (pi(y_i | x) / pi_old(y_i | x))^(1 / n_i) = exp( (1/n_i) sum_t (log pi_t - log pi_old_t) )

        l_i = max(-A_i * s_i, -A_i * clip(s_i, 1 - eps_low, 1 + eps_high))

    and ``loss = aggregate(l)`` with l_i on every token of sequence i, so "seq_mean" (the paper's
    1/G sum_i) is ``sum_i l_i / S``, and "token_mean" weighs sequence i by n_i. Every token of a sequence
    shares one ratio and one clip decision: the gradient is ``-A_i s_i / n_i * sum_t grad log pi_t`` while
    unclipped, 0 when clipped. The paper's clip range is small (eps ~ 3e-4 .. 4e-4), since s_i averages
    the token log-ratios. A sequence without response tokens contributes nothing.

    Metrics: ``policy_loss``; ``clip_frac`` = share of sequences whose clipped term is the larger
    (``clip_frac_low``/``clip_frac_high`` as in :func:`ppo_clip_loss`); ``approx_kl`` = token-level k3 of
    KL(pi_old || pi); ``seq_ratio_mean``, ``seq_ratio_max``, ``seq_ratio_min``: of s_i over sequences.
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    on = mask != 0
    n = on.sum(-1)  # (B,)
    logratio = _on_mask(logprobs - old_logprobs, mask).sum(-1) / n.clamp_min(1)  # (B,)
    s = torch.exp(logratio)
    adv = torch.where(n > 0, advantages.to(s.dtype), torch.zeros_like(s))
    per_seq = torch.maximum(-adv * s, -adv * torch.clamp(s, 1.0 - clip_eps, 1.0 + eps_high))  # (B,)
    loss = aggregate_loss(per_seq[:, None].expand_as(logprobs), mask, aggregation, normalizer)
    with torch.no_grad():
        has = n > 0
        low = (s < 1.0 - clip_eps) & (adv < 0) & has
        high = (s > 1.0 + eps_high) & (adv > 0) & has
        count = max(int(has.sum()), 1)
        metrics = {
            "policy_loss": float(loss.detach()),
            "clip_frac": float((low | high).sum()) / count,
            "clip_frac_low": float(low.sum()) / count,
            "clip_frac_high": float(high.sum()) / count,
            "approx_kl": float(approx_kl(logprobs, old_logprobs, mask)),
            "seq_ratio_mean": float(s[has].mean()) if has.any() else 1.0,
            "seq_ratio_max": float(s[has].max()) if has.any() else 1.0,
            "seq_ratio_min": float(s[has].min()) if has.any() else 1.0,
        }
    return loss, metrics


def reinforce_loss(logprobs: Tensor, advantages: Tensor, mask: Tensor, aggregation: str = "seq_sum",
                   normalizer: Normalizer | None = None) -> tuple[Tensor, dict[str, float]]:
    """REINFORCE (Williams 1992): ``loss = -(r - b) * sum_t log pi(y_t | x, y_<t)``, averaged over sequences.

    logprobs, mask: (B, T); advantages (B,) = r - b (any baseline: :mod:`rlmt.objectives.advantages`). The
    per-token loss is ``-A_b * log pi_t``; the default "seq_sum" reduction sums it over each sequence's
    tokens and averages over sequences, exactly the estimator above. Other reductions are allowed
    ("token_mean" divides each sequence's term by the batch's token count instead).
    Metrics: ``policy_loss``, ``logprob_mean`` (mean token log-prob).
    """
    lp = _on_mask(logprobs, mask)
    per_token = -_per_token(advantages, lp).to(lp.dtype) * lp
    loss = aggregate_loss(per_token, mask, aggregation, normalizer)
    return loss, {"policy_loss": float(loss.detach()), "logprob_mean": float(masked_mean(lp.detach(), mask))}


def kl_penalty_loss(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, beta: float, estimator: str = "k3",
                    aggregation: str = "token_mean", normalizer: Normalizer | None = None
                    ) -> tuple[Tensor, dict[str, float]]:
    """The KL term of GRPO and GRAPE: ``loss = beta * aggregate(k_t)``, k_t estimating KL(pi || pi_ref).

    logprobs (with grad), ref_logprobs, mask: (B, T). ``estimator`` is "k3" (default, non-negative) or "k1"
    (see :mod:`rlmt.objectives.kl`). Metrics: ``kl`` (token mean of the estimate), ``kl_loss``.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; known: {sorted(KL_ESTIMATORS)}")
    k = KL_ESTIMATORS[estimator](_on_mask(logprobs, mask), _on_mask(ref_logprobs, mask))
    loss = beta * aggregate_loss(k, mask, aggregation, normalizer)
    return loss, {"kl": float(masked_mean(k.detach(), mask)), "kl_loss": float(loss.detach())}


@torch.no_grad()
def explained_variance(pred: Tensor, target: Tensor, mask: Tensor) -> float:
    """``1 - Var[target - pred] / Var[target]`` over the masked elements (population variances).

    1 is a perfect value function, 0 no better than a constant, negative worse. NaN when Var[target] = 0
    (undefined), as in CleanRL.
    """
    var_target = masked_var(target, mask)
    if float(var_target) == 0.0:
        return float("nan")
    return float(1.0 - masked_var(target - pred, mask) / var_target)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps_value: float | None,
               aggregation: str = "token_mean", normalizer: Normalizer | None = None
               ) -> tuple[Tensor, dict[str, float]]:
    """PPO's clipped value loss (the PPO2 / CleanRL form). values (with grad), old_values, returns, mask: (B, T).

        v_clip = old_values + clip(values - old_values, -eps_v, eps_v)
        l_t    = 1/2 * max((values - returns)^2, (v_clip - returns)^2),  loss = aggregate(l)

    ``clip_eps_value=None`` gives the unclipped ``1/2 (values - returns)^2``. Metrics: ``value_loss``,
    ``explained_variance`` (of the returns by the old values), ``clipfrac_value`` (share of tokens where the
    clipped error is the larger, so the clip zeroes the gradient).
    """
    v = _on_mask(values, mask)
    old = _on_mask(old_values, mask)
    ret = _on_mask(returns, mask)
    err = (v - ret) ** 2
    if clip_eps_value is None:
        per_token, clipped_active = 0.5 * err, torch.zeros_like(err, dtype=torch.bool)
    else:
        v_clip = old + torch.clamp(v - old, -clip_eps_value, clip_eps_value)
        err_clip = (v_clip - ret) ** 2
        per_token, clipped_active = 0.5 * torch.maximum(err, err_clip), err_clip > err
    loss = aggregate_loss(per_token, mask, aggregation, normalizer)
    return loss, {
        "value_loss": float(loss.detach()),
        "explained_variance": explained_variance(old, ret, mask),
        "clipfrac_value": float(masked_mean(clipped_active.float(), mask)),
    }


@torch.no_grad()
def return_weights(returns: Tensor, tau: float) -> Tensor:
    """Return-weighted optimisation weights ``w_b = exp(R_b / tau)``, normalised to mean 1: (B,) -> (B,).

    ``w = B * softmax(R / tau)``: computed stably for any scale, and with mean 1 a weighted NLL keeps the
    size of the unweighted one (the learning rate means the same with or without weighting; tau only
    shifts weight between samples). tau -> inf gives uniform weights, small tau approaches arg-max.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    return torch.softmax(returns.float() / tau, dim=0) * returns.shape[0]


def nll_loss(logprobs: Tensor, mask: Tensor, weights: Tensor | None = None, aggregation: str = "token_mean",
             normalizer: Normalizer | None = None) -> tuple[Tensor, dict[str, float]]:
    """Negative log-likelihood of the masked tokens (SFT; demonstrations in return-weighted optimisation).

    logprobs, mask: (B, T); weights (B,) optional, e.g. :func:`return_weights`.

        l_bt = -w_b * log pi(y_bt | x_b, y_b,<t),  loss = aggregate(l)

    Metrics: ``nll`` (unweighted token mean: the number to compare across runs), ``nll_loss``.
    """
    lp = _on_mask(logprobs, mask)
    per_token = -lp if weights is None else -weights.to(lp.dtype)[:, None] * lp
    loss = aggregate_loss(per_token, mask, aggregation, normalizer)
    return loss, {"nll": float(masked_mean(-lp.detach(), mask)), "nll_loss": float(loss.detach())}


def is_finite_loss(loss: Tensor) -> bool:
    """True when every element of ``loss`` is finite: the step guard skips the update otherwise."""
    return bool(torch.isfinite(loss).all())
