"""The online methods as rows of one table: what differs between them, and nothing else.

A row says how a scored rollout becomes advantages, which pure objective (:mod:`rlmt.objectives`) the
shared update minimises, which update rule runs (the shared accumulation, TRPO's trust-region step, or SFT on
the kept responses), and whether the method uses dense rewards, a critic, the reference model, or a reward
source of its own. :func:`rlmt.train.runner.train` picks the row once; the loop (:mod:`rlmt.train.online`)
never reads ``cfg.algorithm``. A new method is a row plus its pure objective (GSPO below).

| method             | advantages                       | objective                 | update            |
|--------------------|----------------------------------|---------------------------|-------------------|
| reinforce          | pg.advantage, or dense returns   | reinforce_loss            | accumulate        |
| grpo, grape        | pg.advantage (group)             | ppo_clip_loss (per token) | accumulate        |
| gspo               | pg.advantage (group)             | gspo_loss (per sequence)  | accumulate        |
| ppo                | GAE with the value head          | ppo_clip_loss + value     | accumulate        |
| trpo               | pg.advantage                     | (surrogate inside)        | trust-region step |
| rejection_sampling | kept = 1, else 0                 | NLL of the kept           | SFT rounds        |
"""

from __future__ import annotations

import math
from torch import Tensor

from rlmt.config import Config, PolicyGradientConfig
from rlmt.objectives.policy import gspo_loss, ppo_clip_loss, reinforce_loss
from rlmt.rewards import METHOD_SOURCES
from rlmt.train.estimators import reinforce_advantages, sequence_advantages
from rlmt.train.experience import Experience, OnlineMethod, StepPlan, UpdateContext
from rlmt.train.ppo import gae_advantages, make_value_head
from rlmt.train.rejection import kept_responses, rejection_steps, sft_on_kept
from rlmt.train.trpo import trpo_update
from rlmt.train.update import policy_gradient_update

def policy_gradient_plan(cfg: Config, n_rows: int) -> StepPlan:
    """``rollout.batch_prompts`` prompts a step; ``optim.max_steps`` steps, or ``optim.epochs`` passes over
    the prompts; ``pg.epochs * pg.minibatches`` optimizer steps per loop step."""
    bp = cfg.rollout.batch_prompts
    steps = cfg.optim.max_steps or max(1, math.ceil(cfg.optim.epochs * n_rows / bp))
    return StepPlan(bp, steps, steps * cfg.pg.epochs * cfg.pg.minibatches)


def rejection_plan(cfg: Config, n_rows: int) -> StepPlan:
    """``rejection.prompts_per_round`` prompts a round, ``rejection.rounds`` rounds (:mod:`rlmt.train.rejection`)."""
    return StepPlan(*rejection_steps(cfg, n_rows))


def clipped_surrogate(lp: Tensor, old: Tensor, adv: Tensor, mask: Tensor, pg: PolicyGradientConfig,
                      normalizer: Tensor) -> tuple[Tensor, dict[str, float]]:
    """PPO's per-token clipped surrogate (GRPO, GRAPE, PPO): :func:`ppo_clip_loss`."""
    return ppo_clip_loss(lp, old, adv, mask, pg.clip_eps, pg.clip_eps_high, pg.aggregation, normalizer)


def sequence_clipped_surrogate(lp: Tensor, old: Tensor, adv: Tensor, mask: Tensor, pg: PolicyGradientConfig,
                               normalizer: Tensor) -> tuple[Tensor, dict[str, float]]:
    """GSPO's clipped surrogate on the sequence-level ratio: :func:`gspo_loss`."""
    return gspo_loss(lp, old, adv, mask, pg.clip_eps, pg.clip_eps_high, pg.aggregation, normalizer)


def score_function(lp: Tensor, old: Tensor, adv: Tensor, mask: Tensor, pg: PolicyGradientConfig,
                   normalizer: Tensor) -> tuple[Tensor, dict[str, float]]:
    """REINFORCE's -A log pi: :func:`reinforce_loss` (pi_old unused)."""
    return reinforce_loss(lp, adv, mask, pg.aggregation, normalizer)


METHODS: dict[str, OnlineMethod] = {
    "reinforce": OnlineMethod(reinforce_advantages, policy_gradient_update, score_function, dense_rewards=True),
    "grpo": OnlineMethod(sequence_advantages, policy_gradient_update, clipped_surrogate),
    "gspo": OnlineMethod(sequence_advantages, policy_gradient_update, sequence_clipped_surrogate),
    "grape": OnlineMethod(sequence_advantages, policy_gradient_update, clipped_surrogate,
                          reward_source=METHOD_SOURCES["grape"],
                          revises=True),
    "ppo": OnlineMethod(gae_advantages, policy_gradient_update, clipped_surrogate, critic=make_value_head,
                        dense_rewards=True),
    "trpo": OnlineMethod(sequence_advantages, trpo_update, steps_optimizer=False, episodes=False),
    "rejection_sampling": OnlineMethod(kept_responses, sft_on_kept, kl_regularized=False, plan=rejection_plan,
                                       episodes=False),
}


def update_step(ctx: UpdateContext, exp: Experience) -> dict[str, float]:
    """One update of ``ctx.method`` from a scored rollout: its advantages, then its update rule."""
    method = ctx.method
    return method.update(ctx, exp, method.advantages(ctx, exp))
