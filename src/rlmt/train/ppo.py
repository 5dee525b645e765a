"""PPO's parts for the online loop: the critic (a value head on the policy's trunk) and GAE advantages.

One rollout (:class:`~rlmt.train.experience.Experience`, N = prompts x G sequences, T response tokens)
becomes (:func:`gae_advantages`):

1. old values V_old (N, T) from one no-grad pass, and per-token rewards with the KL penalty folded in
   (``pg.kl_in_reward``, PPO's convention): ``r_t = -beta * k(log pi_old(y_t), log pi_ref(y_t)) + [t = last] *
   score`` (k: ``pg.kl_estimator``, k1 by convention; + dense step rewards d_t, with the score weighted by
   ``rm.dense_outcome_coef``, when the reward source gives them);
2. ``A, R = GAE(r, V_old; gamma, lam)`` (returns R = A + V_old), A whitened over the response tokens;

then the shared update (:func:`rlmt.train.update.policy_gradient_update`) runs ``pg.epochs`` x
``pg.minibatches`` steps of

       loss = ppo_clip(log pi, log pi_old, A) + vf_coef * value_loss(V, V_old, R; clip=ppo.value_clip)

with the value head in its own parameter group at ``ppo.critic_lr``.

The value head sits on the policy's own final hidden states (a shared trunk): the log-probs and the values
of a micro-batch come from one forward pass, and no second transformer is held in memory. The price is
that the value loss also trains the trunk (``vf_coef`` weighs it against the policy loss); with LoRA only
the adapters and the head train. Unscored responses (NaN reward) are off ``exp.mask`` and count nowhere.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rlmt.config import Config
from rlmt.models import ValueHead
from rlmt.objectives import explained_variance, gae, masked_mean, whiten
from rlmt.parallel import World
from rlmt.rollout import RolloutBatch
from rlmt.rollout.logprobs import (activation_checkpointing, cache_survives_checkpointing, grouped_hidden_states,
                                   position_ids_from_mask, scored_positions)
from rlmt.rollout.precision import compute_autocast
from rlmt.train.dense import ppo_token_rewards
from rlmt.train.experience import Advantages, Experience, UpdateContext, group_rows


def make_value_head(policy: nn.Module, cfg: Config | None = None) -> ValueHead:
    """The critic of ``policy`` (plain or peft-wrapped): a zero-initialised :class:`ValueHead` on its device."""
    return ValueHead(policy.config.hidden_size).to(next(policy.parameters()).device)


def _hidden_before_tokens(policy: nn.Module, batch: RolloutBatch, groups: Tensor, group_size: int,
                          autocast: torch.dtype | None) -> Tensor:
    """(g*G, T, H) final hidden states that predict each response token of the given prompt groups.

    Each prompt runs once and its KV cache is repeated for its G responses, as in
    :func:`rlmt.rollout.logprobs.grouped_response_logprobs` (also under gradient checkpointing); with a transformers
    too old to keep a cache under checkpointing the full sequences run instead. Position t holds the state before response token t.
    """
    rows, P, G = group_rows(groups, group_size), batch.prompt_len, group_size
    if activation_checkpointing(policy) and policy.training and not cache_survives_checkpointing():
        ids, am = batch.input_ids[rows], batch.attention_mask[rows]
        with compute_autocast(policy, autocast):
            h = policy.get_decoder()(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am),
                                     use_cache=False).last_hidden_state  # (g*G, P+T, H)
        return h[:, P - 1:-1]
    first = rows[::G]
    return grouped_hidden_states(policy, batch.input_ids[first, :P], batch.attention_mask[first, :P],
                                 batch.response_ids[rows], batch.attention_mask[rows, P:], G, autocast)


def response_logprobs_and_values(policy: nn.Module, value_head: nn.Module, batch: RolloutBatch, groups: Tensor,
                                 group_size: int, temperature: float, chunk_tokens: int = 1024,
                                 autocast: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """log pi(y_t | x, y_<t) and V(x, y_<t) of the responses of ``groups`` from one policy forward.

    Returns two (g*G, T) float32 tensors; log-probs are 0 off the response mask, values are defined
    everywhere (mask them). Log-probs use logits / temperature, like the sampler's. ``autocast``: the body's
    forward dtype (``model.autocast``); the log-probs are float32 either way.
    """
    h = _hidden_before_tokens(policy, batch, groups, group_size, autocast)  # (g*G, T, H)
    rows = group_rows(groups, group_size)
    sel = batch.response_mask[rows].bool()
    inv_t = 1.0 / temperature if temperature > 0 else 1.0
    lp, _ = scored_positions(h[sel], batch.response_ids[rows][sel], policy.get_output_embeddings(), inv_t,
                              chunk_tokens, grad_dtype=autocast)
    zeros = h.new_zeros(sel.shape, dtype=torch.float32)
    logprobs = zeros.masked_scatter(sel, lp) if sel.any() else zeros + 0.0 * h.sum()
    return logprobs, value_head(h)


def gae_advantages(ctx: UpdateContext, exp: Experience) -> Advantages:
    """PPO's advantages (see the module docstring): (N, T) A (whitened with ``ppo.whiten_advantages``), with
    the critic's targets R and V_old for the value loss. Unscored responses are off ``exp.mask``."""
    cfg, pg, pc = ctx.cfg, ctx.cfg.pg, ctx.cfg.ppo
    batch, G, mask = exp.batch, exp.group_size, exp.mask
    if ctx.critic is None:
        raise ValueError("ppo needs a value head: build it with rlmt.train.ppo.make_value_head")
    N = batch.response_ids.shape[0]
    if N % G:
        raise ValueError(f"{N} sequences do not split into groups of {G}")
    per_micro = max(1, cfg.optim.batch_size // G)
    ctx.policy.train()
    with torch.no_grad():
        old_values = torch.cat([response_logprobs_and_values(ctx.policy, ctx.critic, batch, g, G, exp.temperature,
                                                             autocast=ctx.autocast)[1]
                                for g in torch.arange(N // G).split(per_micro)])  # (N, T)
    old_lp = batch.logprobs  # (N, T) the sampler's log pi_old
    in_reward = exp.ref_logprobs is not None and pg.kl_in_reward
    ref_lp = exp.ref_logprobs if in_reward else old_lp
    token_rewards = ppo_token_rewards(exp.rewards.nan_to_num(0.0), exp.token_rewards, old_lp, ref_lp, mask,
                                      pg.beta if in_reward else 0.0, cfg.rm.dense_outcome_coef, pg.kl_estimator)
    adv, returns = gae(token_rewards, old_values, mask, pc.gamma, pc.lam)  # (N, T) each
    metrics = {
        "explained_variance": explained_variance(old_values, returns, mask),
        "advantage/abs_mean": float(masked_mean(adv.abs(), mask)),  # before whitening
        "value/mean": float(masked_mean(old_values, mask)),
        "return/mean": float(masked_mean(returns, mask)),
    }
    if exp.ref_logprobs is not None:
        metrics["kl"] = float(masked_mean(old_lp - exp.ref_logprobs, mask))
    return Advantages(whiten_across(ctx.world, adv, mask) if pc.whiten_advantages else adv, metrics, returns,
                      old_values)


def whiten_across(world: World, x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """:func:`rlmt.objectives.whiten` with the mean and (population) variance over the masked elements of every
    rank: two all-reduces (sum and count, then the squared deviations). x, mask: (N, T) -> (N, T)."""
    if world.size == 1:
        return whiten(x, mask, eps=eps)
    m = (mask != 0).to(x.dtype)
    sums = world.all_reduce(torch.stack([(x * m).sum(), m.sum()]).to(world.device), "sum").to(x.device)
    mu = sums[0] / sums[1].clamp(min=1)
    sq = world.all_reduce(((x - mu) ** 2 * m).sum().reshape(1).to(world.device), "sum").to(x.device)[0]
    out = (x - mu) * torch.rsqrt(sq / sums[1].clamp(min=1) + eps)
    return torch.where(mask != 0, out, torch.zeros_like(out))
