"""The math of rlmt: losses, advantage estimators and reductions as pure functions of torch tensors.

Nothing here imports more than torch. Per-token tensors are (B, T) with a response-token ``mask`` (B, T);
sequence tensors are (B,); groups of G responses are contiguous by prompt. Losses return
``(loss, metrics)`` with metrics a dict of named, detached Python floats.
"""

from rlmt.objectives.advantages import (
    gae,
    group_relative_advantages,
    kl_penalized_token_rewards,
    last_token_index,
    rloo_advantages,
    running_mean_baseline,
)
from rlmt.objectives.aggregate import (
    AGGREGATIONS,
    aggregate_loss,
    loss_normalizer,
    masked_mean,
    masked_sum,
    masked_var,
    whiten,
)
from rlmt.objectives.grape import grape_aggregate
from rlmt.objectives.kl import approx_kl, entropy_from_logits, kl_k1, kl_k3
from rlmt.objectives.policy import (
    KL_ESTIMATORS,
    explained_variance,
    is_finite_loss,
    kl_penalty_loss,
    nll_loss,
    gspo_loss,
    ppo_clip_loss,
    reinforce_loss,
    return_weights,
    value_loss,
)
from rlmt.objectives.preference import LOSSES as PREFERENCE_LOSSES
from rlmt.objectives.preference import bradley_terry_loss, cdpo_loss, dpo_loss, ipo_loss, log_ratio_margin

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "PREFERENCE_LOSSES",
    "aggregate_loss",
    "approx_kl",
    "bradley_terry_loss",
    "cdpo_loss",
    "dpo_loss",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "grape_aggregate",
    "group_relative_advantages",
    "ipo_loss",
    "is_finite_loss",
    "kl_k1",
    "kl_k3",
    "kl_penalized_token_rewards",
    "kl_penalty_loss",
    "last_token_index",
    "log_ratio_margin",
    "loss_normalizer",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "nll_loss",
    "gspo_loss",
    "ppo_clip_loss",
    "reinforce_loss",
    "return_weights",
    "rloo_advantages",
    "running_mean_baseline",
    "value_loss",
    "whiten",
]
