"""Advantage estimators of the online methods without a critic: one advantage per sequence from its reward
(``pg.advantage``), or REINFORCE's per-token returns when the reward source gives dense rewards. PPO's
GAE, which needs the critic, is :func:`rlmt.train.ppo.gae_advantages`.

Each is ``(ctx, exp) -> Advantages``; the running baseline lives in ``ctx.state["baseline"]`` (checkpointed).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlmt.config import PolicyGradientConfig
from rlmt.objectives.advantages import group_relative_advantages, running_mean_baseline
from rlmt.objectives.aggregate import masked_mean
from rlmt.objectives.policy import KL_ESTIMATORS
from rlmt.parallel import World
from rlmt.train.dense import dense_reinforce_advantages
from rlmt.train.experience import Advantages, Experience, UpdateContext


def advantages_for(rewards: Tensor, group_size: int, cfg: PolicyGradientConfig, baseline: float | None,
                   kind: str | None = None, world: World = World()) -> tuple[Tensor, float | None]:
    """(N*G,) rewards (NaN = unscored) -> ((N*G,) advantages, updated running baseline).

    ``kind`` (default ``cfg.advantage``): group: (r - mean_G) / (std_G + eps); group_no_std: r - mean_G;
    leave_one_out: RLOO; running_mean: r - b with b the moving average *before* this batch; none: r.
    Unscored responses get advantage 0. The group kinds need only the group (never split across ranks); the
    running mean's batch mean is taken over every rank of ``world``.
    """
    kind = kind or cfg.advantage
    if kind == "group":
        return group_relative_advantages(rewards, group_size, scale="std"), baseline
    if kind == "group_no_std":
        return group_relative_advantages(rewards, group_size, scale="none"), baseline
    if kind == "leave_one_out":
        return group_relative_advantages(rewards, group_size, scale="none", leave_one_out=True), baseline
    finite = torch.isfinite(rewards)
    r = torch.where(finite, rewards, torch.zeros_like(rewards))
    if kind == "none":
        return r, baseline
    b = 0.0 if baseline is None else baseline  # advantage uses the baseline *before* this batch
    if world.size > 1:
        total, count = world.sum_scalar(float(r[finite].sum())), world.sum_scalar(float(finite.sum()))
        batch_mean = total / count if count else (baseline or 0.0)
    else:
        batch_mean = float(r[finite].mean()) if finite.any() else (baseline or 0.0)
    new = running_mean_baseline(baseline, batch_mean, cfg.baseline_momentum)
    return torch.where(finite, r - b, torch.zeros_like(r)), new


def sequence_rewards(exp: Experience, pg: PolicyGradientConfig) -> Tensor:
    """(N,) rewards; with ``pg.kl_in_reward``: ``r - beta * sum_t k(log pi_old, log pi_ref)`` (k: pg.kl_estimator)."""
    if exp.ref_logprobs is None or not pg.kl_in_reward:
        return exp.rewards
    k = KL_ESTIMATORS[pg.kl_estimator](exp.batch.logprobs, exp.ref_logprobs)
    return exp.rewards - pg.beta * torch.where(exp.mask != 0, k, torch.zeros_like(k)).sum(-1)


def sequence_advantages(ctx: UpdateContext, exp: Experience) -> Advantages:
    """One advantage per sequence (GRPO, GSPO, GRAPE, TRPO, REINFORCE without dense rewards)."""
    adv, ctx.state["baseline"] = advantages_for(sequence_rewards(exp, ctx.cfg.pg), exp.group_size, ctx.cfg.pg,
                                                ctx.state.get("baseline"), world=ctx.world)
    return Advantages(adv, {"advantage/abs_mean": float(adv.abs().mean())})


def reinforce_advantages(ctx: UpdateContext, exp: Experience) -> Advantages:
    """REINFORCE: per sequence, or with dense rewards (``exp.token_rewards``) per token ``A_t = G_t - b``
    (:func:`dense_reinforce_advantages`).

    The baseline b of each sequence comes from ``pg.advantage`` applied to its total return
    ``G_0 = c * R + sum_t d_t`` (c = ``rm.dense_outcome_coef``): b = G_0 - A(G_0). ``group`` acts as
    ``group_no_std`` here: a sequence's std would rescale token returns that differ along the sequence.
    """
    if exp.token_rewards is None:
        return sequence_advantages(ctx, exp)
    cfg = ctx.cfg
    rewards = sequence_rewards(exp, cfg.pg)
    c = cfg.rm.dense_outcome_coef
    total = c * rewards + exp.token_rewards.sum(-1)  # (N,), NaN where unscored
    kind = "group_no_std" if cfg.pg.advantage == "group" else cfg.pg.advantage
    seq_adv, ctx.state["baseline"] = advantages_for(total, exp.group_size, cfg.pg, ctx.state.get("baseline"), kind,
                                                    ctx.world)
    adv = dense_reinforce_advantages(rewards, exp.token_rewards, exp.mask, total - seq_adv, c)
    return Advantages(adv, {"advantage/abs_mean": float(masked_mean(adv.abs(), exp.mask))})
