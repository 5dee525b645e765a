"""Offline preference losses (DPO, IPO, conservative DPO; the reward model's Bradley-Terry at the end),
each ``-> (loss, metrics)``.

Inputs are (B,) *sequence* log-probabilities: the sum over a completion's tokens of log pi(y_t | x, y_<t),
for the policy (with grad) and the frozen reference, of the chosen (preferred) and rejected completions.
Every loss is a function of the implicit-reward margin

    h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))        (B,)

IPO uses the same summed log-probs as DPO (as in Azar et al. 2023, eq. 17, where h is a difference of
sequence log-likelihood ratios); it does not average per token.

``normalizer`` is the number of pairs the loss is a mean over; the default is this batch's B. Under
gradient accumulation pass the optimizer step's pair count, so the micro-batch terms sum to the step's mean.
Metrics are detached Python floats over this batch: ``loss`` (this batch's term), ``rewards/chosen`` and
``rewards/rejected`` (mean beta * log-ratio), ``rewards/margin`` (mean beta * h) and ``rewards/accuracy``
(share of pairs with h > 0).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def log_ratio_margin(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                     ref_rejected: Tensor) -> Tensor:
    """h (B,): the chosen log-ratio minus the rejected log-ratio."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def _metrics(loss: Tensor, policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
             ref_rejected: Tensor, beta: float) -> dict[str, float]:
    with torch.no_grad():
        r_w = beta * (policy_chosen - ref_chosen)  # (B,)
        r_l = beta * (policy_rejected - ref_rejected)
        return {
            "loss": float(loss.detach()),
            "rewards/chosen": float(r_w.mean()),
            "rewards/rejected": float(r_l.mean()),
            "rewards/margin": float((r_w - r_l).mean()),
            "rewards/accuracy": float((r_w > r_l).float().mean()),
        }


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float, normalizer: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """DPO (Rafailov et al. 2023, eq. 7): loss = sum_i -log sigmoid(beta * h_i) / normalizer."""
    h = log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    loss = -F.logsigmoid(beta * h).sum() / (normalizer or h.shape[0])
    return loss, _metrics(loss, policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


def ipo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float, normalizer: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """IPO (Azar et al. 2023, eq. 17, with tau = beta): loss = sum_i (h_i - 1 / (2 beta))^2 / normalizer.

    h is built from summed (not per-token averaged) log-probs; it regresses to the target margin 1/(2 beta).
    """
    h = log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    loss = ((h - 1.0 / (2.0 * beta)) ** 2).sum() / (normalizer or h.shape[0])
    return loss, _metrics(loss, policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


def cdpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
              beta: float, label_smoothing: float = 0.0, normalizer: float | None = None,
              ) -> tuple[Tensor, dict[str, float]]:
    """Conservative DPO (Mitchell 2023): the labels are flipped with probability eps = ``label_smoothing``,

        loss = sum_i [-(1 - eps) log sigmoid(beta h_i) - eps log sigmoid(-beta h_i)] / normalizer

    eps = 0 is DPO.
    """
    h = log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    per_pair = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    loss = per_pair.sum() / (normalizer or h.shape[0])
    return loss, _metrics(loss, policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, normalizer: float | None = None,
                       ) -> tuple[Tensor, dict[str, float]]:
    """Bradley-Terry reward-model loss (Ouyang et al. 2022, eq. 1): with scalar rewards r (B,) of the chosen
    and rejected completions,

        loss = sum_i -log sigmoid(r_w,i - r_l,i) / normalizer

    Metrics: ``loss``, ``rewards/accuracy`` (share with r_w > r_l; ties count as wrong), ``rewards/margin``
    (mean r_w - r_l), ``rewards/chosen`` and ``rewards/rejected`` (mean rewards).
    """
    d = r_chosen - r_rejected  # (B,)
    loss = -F.logsigmoid(d).sum() / (normalizer or d.shape[0])
    with torch.no_grad():
        return loss, {"loss": float(loss.detach()), "rewards/accuracy": float((d > 0).float().mean()),
                      "rewards/margin": float(d.mean()), "rewards/chosen": float(r_chosen.mean()),
                      "rewards/rejected": float(r_rejected.mean())}


PreferenceLoss = Callable[..., tuple[Tensor, dict[str, float]]]

LOSSES: dict[str, PreferenceLoss] = {"dpo": dpo_loss, "ipo": ipo_loss, "cdpo": cdpo_loss}
