"""Dense (per-token) rewards in the online loop: from a reward source's ``(char_end, reward)`` pairs to an
(N, T) tensor over response tokens, and how PPO and REINFORCE use it.

A dense source (the process RM) scores each reasoning step and reports where the step ends in the response
*text*; the reward belongs on the response token whose decoded text first reaches that character. PPO adds
the dense rewards to its KL-penalized token rewards before GAE; REINFORCE turns them into per-token returns
to go. GRPO, GSPO, GRAPE and TRPO use one advantage per sequence and ignore dense rewards (with a warning).

Shapes: N sequences of T response tokens, ``mask`` (N, T) on scored response tokens.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import Tensor

from rlmt.objectives.advantages import kl_penalized_token_rewards
from rlmt.objectives.process import step_end_positions
from rlmt.data import token_char_ends



def place_token_rewards(response_ids: Tensor, response_mask: Tensor, tokenizer,
                        token_rewards: Sequence[Sequence[tuple[int, float]]]) -> Tensor:
    """(N, T) float32 rewards: each ``(char_end, r)`` of response i added at the token that reaches char_end.

    response_ids, response_mask: (N, T) right-padded; token_rewards: per response, (char_end, reward) pairs.
    With ends_t the decoded length after token t (:func:`token_char_ends`):

        t*(c) = min{t : ends_t >= c},  or the last response token when no token reaches c

    (a char_end past the decoded text). Two rewards on the same token add up; a response without tokens
    gets none. Zero off the mask.
    """
    out = torch.zeros(response_ids.shape, dtype=torch.float32)
    lengths = response_mask.sum(-1).tolist()
    for i, pairs in enumerate(token_rewards):
        n = int(lengths[i])
        if not pairs or n == 0:
            continue
        ends = token_char_ends(tokenizer, response_ids[i, :n].tolist())
        positions = step_end_positions([(0, int(c)) for c, _ in pairs], ends)
        for t, (_, r) in zip(positions, pairs):
            out[i, t] += float(r)
    return out.to(response_ids.device)


def dense_rewards_for(uses_dense: bool, response_ids: Tensor, response_mask: Tensor, tokenizer,
                      token_rewards: Sequence[Sequence[tuple[int, float]]] | None, mask: Tensor) -> Tensor | None:
    """The (N, T) dense rewards an online method uses, masked to scored tokens; None when the source gave
    none or the method does not use them (``uses_dense`` false: GRPO, GSPO, GRAPE, TRPO; warned, once per
    call site by Python's default warning filter)."""
    if token_rewards is None:
        return None
    if not uses_dense:
        warnings.warn("this method uses one advantage per sequence: the reward source's dense (per-step) rewards "
                      "are ignored; only its outcome scores train (dense rewards need reinforce or ppo)", stacklevel=2)
        return None
    dense = place_token_rewards(response_ids, response_mask, tokenizer, token_rewards)
    return torch.where(mask.to(dense.device) != 0, dense, torch.zeros_like(dense))


@torch.no_grad()
def ppo_token_rewards(score: Tensor, dense: Tensor | None, logprobs_old: Tensor, logprobs_ref: Tensor,
                      mask: Tensor, beta: float, outcome_coef: float = 1.0, estimator: str = "k1") -> Tensor:
    """PPO's per-token rewards with optional dense rewards d (N, T): score (N,), the rest (N, T) -> (N, T).

        r_t = -beta * k(log pi_old(y_t), log pi_ref(y_t)) + [t = last] * c * score + d_t     (k: k1 or k3)

    c = ``outcome_coef`` (``rm.dense_outcome_coef``) when dense rewards exist, else 1 (the plain PPO reward
    of :func:`~rlmt.objectives.advantages.kl_penalized_token_rewards`). Zero off the mask.
    """
    if dense is None:
        return kl_penalized_token_rewards(score, logprobs_old, logprobs_ref, mask, beta, estimator)
    r = kl_penalized_token_rewards(outcome_coef * score, logprobs_old, logprobs_ref, mask, beta, estimator)
    return r + torch.where(mask != 0, dense.to(r.dtype), torch.zeros_like(r))


@torch.no_grad()
def returns_to_go(token_rewards: Tensor, mask: Tensor) -> Tensor:
    """Undiscounted returns to go over the masked tokens: ``G_t = sum_{t' >= t} r_t'``. (N, T) -> (N, T), 0 off
    the mask (rewards off the mask are ignored)."""
    r = torch.where(mask != 0, token_rewards, torch.zeros_like(token_rewards))
    g = r.flip(-1).cumsum(-1).flip(-1)
    return torch.where(mask != 0, g, torch.zeros_like(g))


@torch.no_grad()
def dense_reinforce_advantages(score: Tensor, dense: Tensor, mask: Tensor, baseline: Tensor,
                               outcome_coef: float = 1.0) -> Tensor:
    """REINFORCE's per-token advantages with dense rewards: score, baseline (N,); dense, mask (N, T) -> (N, T).

        r_t = d_t + [t = last] * c * score,   A_t = G_t - b = sum_{t' >= t} r_t' - b

    A token is credited only with the rewards that follow it. b is the sequence baseline of the configured
    ``pg.advantage`` computed on the total return G_0 (see :func:`rlmt.train.estimators.reinforce_advantages`).
    Zero off the mask; unscored rows (NaN score) must be off the mask.
    """
    r = ppo_token_rewards(score.nan_to_num(0.0), dense, torch.zeros_like(dense), torch.zeros_like(dense), mask,
                          0.0, outcome_coef)
    adv = returns_to_go(r, mask) - baseline.nan_to_num(0.0).to(r.dtype)[:, None]
    return torch.where(mask != 0, adv, torch.zeros_like(adv))
