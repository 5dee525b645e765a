"""The values the online loop hands from phase to phase: one scored rollout (:class:`Experience`), its
advantages (:class:`Advantages`), what an update may change (:class:`UpdateContext`), and the shape of a
method (:class:`OnlineMethod`, the rows of :data:`rlmt.train.methods.METHODS`).

Shapes: N = prompts x G sequences (group p holds rows [p*G, (p+1)*G)), T response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from rlmt.config import Config, PolicyGradientConfig
from rlmt.parallel import World
from rlmt.rollout import RolloutBatch


@dataclass
class Experience:
    """One scored rollout: everything an advantage estimator and an update rule need."""

    batch: RolloutBatch
    rewards: Tensor  # (N,) sequence rewards from the reward source, NaN where unscored
    mask: Tensor  # (N, T) response tokens of scored responses
    ref_logprobs: Tensor | None  # (N, T) log pi_ref, when the method is KL-regularized and pg.beta > 0
    group_size: int
    temperature: float  # the sampler's temperature, used for every log-prob
    token_rewards: Tensor | None = None  # (N, T) dense rewards (methods with dense_rewards; rlmt.train.dense)
    step: int = 0  # the loop step that sampled it (0-based)
    group_offset: int = 0  # on several ranks: the global index of this rank's first prompt group in the step


@dataclass
class Advantages:
    """An advantage estimator's output: ``values`` (N,) per sequence or (N, T) per token, what the objective
    weighs; PPO adds its critic's targets. ``metrics`` are logged as they are."""

    values: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    returns: Tensor | None = None  # (N, T) value targets R = A + V_old (PPO)
    old_values: Tensor | None = None  # (N, T) V_old (PPO)


@dataclass
class Demonstrations:
    """Demonstrations for return-weighted optimization: token ids and (optional) rewards R (n,)."""

    examples: list
    rewards: Tensor | None


@dataclass
class UpdateContext:
    """What an update may change: the policy (and critic), the optimizer and its own ``state``.

    ``trainable`` holds every module the optimizer steps (gradient clipping runs over it); ``state`` is a
    JSON-serializable dict saved in checkpoints (REINFORCE's running baseline, the update counter that seeds
    epoch shuffles, GRAPE's kept revisions). ``method`` is the run's row of :data:`rlmt.train.methods.METHODS`.
    """

    policy: torch.nn.Module
    critic: torch.nn.Module | None
    trainable: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    cfg: Config
    state: dict
    demos: Demonstrations | None = None
    method: "OnlineMethod | None" = None
    autocast: torch.dtype | None = None  # the policy's forward dtype (model.autocast; None: the weights')
    world: World = field(default_factory=World)  # the ranks the step's groups are split across (one by default)


# (ctx, exp) -> advantages; (ctx, exp, advantages) -> metrics (the update has changed the policy)
AdvantageEstimator = Callable[[UpdateContext, Experience], Advantages]
UpdateRule = Callable[[UpdateContext, Experience, Advantages], dict]
# (log pi, log pi_old, A, mask, pg, normalizer) -> (loss, metrics): a method's policy term (rlmt.objectives)
PolicyObjective = Callable[[Tensor, Tensor, Tensor, Tensor, PolicyGradientConfig, Tensor],
                           tuple[Tensor, dict[str, float]]]


@dataclass(frozen=True)
class StepPlan:
    """How many prompts one loop step samples, how many loop steps run, and how many optimizer steps the
    learning-rate schedule spans."""

    prompts_per_step: int
    steps: int
    optimizer_steps: int


@dataclass(frozen=True)
class OnlineMethod:
    """One online method: a row of :data:`rlmt.train.methods.METHODS` (see the table there)."""

    advantages: AdvantageEstimator
    update: UpdateRule
    objective: PolicyObjective | None = None  # the policy term of the shared update
    critic: Callable[[nn.Module], nn.Module] | None = None  # builds a critic that trains beside the policy
    dense_rewards: bool = False  # uses a reward source's per-token rewards
    kl_regularized: bool = True  # runs the reference model when pg.beta > 0
    steps_optimizer: bool = True  # False: the update takes its own step (TRPO); AdamW's moments stay unallocated
    reward_source: str | None = None  # the method's own reward source (else reward.source)
    revises: bool = False  # may run GRAPE's critique-revise step (grape.revise)
    episodes: bool = True  # trains on multi-turn episodes (env.source; rlmt.envs)
    plan: Callable[[Config, int], StepPlan] | None = None  # None: rlmt.train.methods.policy_gradient_plan





def group_rows(groups: Tensor, group_size: int) -> Tensor:
    """Prompt-group indices (g,) -> their sequence rows (g * G,): group p holds rows [p*G, (p+1)*G)."""
    return (groups[:, None] * group_size + torch.arange(group_size)).flatten()
