"""PPO's update rule for the online loop: a value head, GAE over tokens, clipped surrogate + clipped value loss.

One rollout (:class:`~rlmt.train.online.Experience`, N = prompts x G sequences, T response tokens) becomes:

1. old values V_old (N, T) from one no-grad pass, and per-token rewards with the KL penalty folded in:
   ``r_t = -beta * (log pi_old(y_t) - log pi_ref(y_t)) + [t = last] * score`` (+ dense step rewards d_t,
   with the score weighted by ``rm.dense_outcome_coef``, when the reward source gives them);
2. ``A, R = GAE(r, V_old; gamma, lam)`` (returns R = A + V_old), A whitened over the response tokens;
3. ``pg.epochs`` passes, ``pg.minibatches`` optimizer steps each, over micro-batches of whole prompt groups
   accumulated under the minibatch's global normalizer (the same schedule as GRPO's ``_optimize``):

       loss = ppo_clip(log pi, log pi_old, A) + vf_coef * value_loss(V, V_old, R; clip=ppo.value_clip)

The value head sits on the policy's own final hidden states (a shared trunk): the log-probs and the values
of a micro-batch come from one forward pass, and no second transformer is held in memory. The price is
that the value loss also trains the trunk (``vf_coef`` weighs it against the policy loss); with LoRA only
the adapters and the head train. Unscored responses (NaN reward) are off ``exp.mask`` and count nowhere.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from rlmt.config import Config
from rlmt.rollout.precision import autocast_of
from rlmt.rollout.logprobs import activation_checkpointing, cache_survives_checkpointing, grouped_hidden_states, _scored_positions, position_ids_from_mask
from rlmt.objectives import (explained_variance, gae, loss_normalizer, masked_mean,
                             ppo_clip_loss, value_loss, whiten)
from rlmt.rollout import RolloutBatch
from rlmt.train.dense import ppo_token_rewards
from rlmt.train.online import Experience, UpdateContext
from rlmt.train.optim import guarded_step
from rlmt.models import ValueHead


def make_value_head(policy: nn.Module, cfg: Config) -> ValueHead:
    """The critic of ``policy`` (plain or peft-wrapped): a zero-initialised :class:`ValueHead` on its device."""
    return ValueHead(policy.config.hidden_size).to(next(policy.parameters()).device)


def _rows(groups: Tensor, group_size: int) -> Tensor:
    """Prompt-group indices (g,) -> their sequence rows (g * G,): group p holds rows [p*G, (p+1)*G)."""
    return (groups[:, None] * group_size + torch.arange(group_size)).flatten()


def _hidden_before_tokens(policy: nn.Module, batch: RolloutBatch, groups: Tensor, group_size: int) -> Tensor:
    """(g*G, T, H) final hidden states that predict each response token of the given prompt groups.

    Each prompt runs once and its KV cache is repeated for its G responses, as in
    :func:`rlmt.rollout.logprobs.grouped_response_logprobs` (also under gradient checkpointing); with a transformers
    too old to keep a cache under checkpointing the full sequences run instead. Position t holds the state before response token t.
    """
    rows, P, G = _rows(groups, group_size), batch.prompt_len, group_size
    if activation_checkpointing(policy) and policy.training and not cache_survives_checkpointing():
        ids, am = batch.input_ids[rows], batch.attention_mask[rows]
        h = policy.get_decoder()(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am),
                                 use_cache=False).last_hidden_state  # (g*G, P+T, H)
        return h[:, P - 1:-1]
    first = rows[::G]
    return grouped_hidden_states(policy, batch.input_ids[first, :P], batch.attention_mask[first, :P],
                                 batch.response_ids[rows], batch.response_mask[rows], G)


def response_logprobs_and_values(policy: nn.Module, value_head: nn.Module, batch: RolloutBatch, groups: Tensor,
                                 group_size: int, temperature: float, chunk_tokens: int = 1024
                                 ) -> tuple[Tensor, Tensor]:
    """log pi(y_t | x, y_<t) and V(x, y_<t) of the responses of ``groups`` from one policy forward.

    Returns two (g*G, T) float32 tensors; log-probs are 0 off the response mask, values are defined
    everywhere (mask them). Log-probs use logits / temperature, like the sampler's.
    """
    h = _hidden_before_tokens(policy, batch, groups, group_size)  # (g*G, T, H)
    rows = _rows(groups, group_size)
    sel = batch.response_mask[rows].bool()
    inv_t = 1.0 / temperature if temperature > 0 else 1.0
    lp, _ = _scored_positions(h[sel], batch.response_ids[rows][sel], policy.get_output_embeddings(), inv_t,
                              chunk_tokens, grad_dtype=autocast_of(policy))
    zeros = h.new_zeros(sel.shape, dtype=torch.float32)
    logprobs = zeros.masked_scatter(sel, lp) if sel.any() else zeros + 0.0 * h.sum()
    return logprobs, value_head(h)


MicroLoss = Callable[[Tensor, Tensor], tuple[Tensor, dict[str, float]]]


def _accumulated_steps(ctx: UpdateContext, n_groups: int, group_size: int, mask: Tensor,
                       micro_loss: MicroLoss, shuffle: torch.Generator) -> dict[str, float]:
    """``pg.epochs`` x ``pg.minibatches`` optimizer steps over whole prompt groups; micro-batches of
    ``optim.batch_size`` sequences (rounded to groups) accumulate ``micro_loss(groups, normalizer)``, with
    the minibatch's global normalizer so the step does not depend on the micro-batch split. Epoch 0 keeps
    the rollout order; later epochs are shuffled by ``shuffle``.

    Metrics: loss-valued ones (key ending in "loss") summed over a step's micro-batches and averaged over
    steps; "_max" ones maxed; the rest token-weighted means over the whole update.
    """
    cfg, pg = ctx.cfg, ctx.cfg.pg
    per_micro = max(1, cfg.optim.batch_size // group_size)
    sums: dict[str, float] = {}
    tokens, n_steps, skipped, step = 0.0, 0, 0.0, {"grad_norm": 0.0, "lr": 0.0}
    for epoch in range(pg.epochs):
        order = torch.arange(n_groups) if epoch == 0 else torch.randperm(n_groups, generator=shuffle)
        for mb_groups in order.chunk(pg.minibatches):
            normalizer = loss_normalizer(mask[_rows(mb_groups, group_size)], pg.aggregation,
                                         max_len=cfg.rollout.max_new_tokens)
            for micro_groups in mb_groups.split(per_micro):
                w = float(mask[_rows(micro_groups, group_size)].sum())
                if w == 0:
                    continue
                loss, met = micro_loss(micro_groups, normalizer)
                loss.backward()
                tokens += w
                for k, v in met.items():
                    if k.endswith("_max"):
                        sums[k] = max(sums.get(k, v), v)
                    else:
                        sums[k] = sums.get(k, 0.0) + (v if k.endswith("loss") else v * w)
            step = guarded_step(ctx.trainable, ctx.optimizer, ctx.scheduler, cfg.optim.max_grad_norm)
            n_steps += 1
            skipped += step["skipped_steps"]
    out = {k: v if k.endswith("_max") else v / (n_steps if k.endswith("loss") else max(tokens, 1.0))
           for k, v in sums.items()}
    return {**out, "skipped_steps": skipped, "grad_norm": step["grad_norm"], "lr": step["lr"],
            "tokens": tokens / max(1, pg.epochs)}


def ppo_update(ctx: UpdateContext, exp: Experience) -> dict[str, float]:
    """One PPO update from one scored rollout (see the module docstring for the equations).

    Shapes: ``exp.batch`` holds N = prompts x G sequences of T response tokens; ``exp.mask`` (N, T) is the
    response tokens of scored sequences; ``exp.ref_logprobs`` (N, T) or None (beta = 0: no KL term). The
    KL penalty is always k1 in the reward (``pg.kl_in_reward`` and ``pg.kl_estimator`` do not apply).
    ``ppo.critic_lr`` is not applied here: the head trains at the optimizer's LR (one parameter group).
    ``ctx.state["updates"]`` counts updates; it seeds the shuffle of epochs >= 1, so resume replays it.
    """
    cfg, pg, pc = ctx.cfg, ctx.cfg.pg, ctx.cfg.ppo
    batch, G, mask = exp.batch, exp.group_size, exp.mask
    if ctx.critic is None:
        raise ValueError("ppo needs a value head: build it with rlmt.train.ppo.make_value_head")
    N = batch.response_ids.shape[0]
    if N % G:
        raise ValueError(f"{N} sequences do not split into groups of {G}")
    n_groups, per_micro = N // G, max(1, cfg.optim.batch_size // G)
    ctx.policy.train()

    def forward(groups: Tensor) -> tuple[Tensor, Tensor]:
        return response_logprobs_and_values(ctx.policy, ctx.critic, batch, groups, G, exp.temperature)

    old_lp = batch.logprobs  # (N, T) the sampler's log pi_old
    with torch.no_grad():
        old_values = torch.cat([forward(g)[1] for g in torch.arange(n_groups).split(per_micro)])  # (N, T)
    ref_lp = exp.ref_logprobs if exp.ref_logprobs is not None else old_lp
    token_rewards = ppo_token_rewards(exp.rewards.nan_to_num(0.0), exp.token_rewards, old_lp, ref_lp, mask, pg.beta,
                                      cfg.rm.dense_outcome_coef)  # + dense step rewards (rlmt.train.dense)
    adv, returns = gae(token_rewards, old_values, mask, pc.gamma, pc.lam)  # (N, T) each
    loss_adv = whiten(adv, mask) if pc.whiten_advantages else adv

    def micro_loss(groups: Tensor, normalizer: Tensor) -> tuple[Tensor, dict[str, float]]:
        rows = _rows(groups, G)
        lp, values = forward(groups)
        m = mask[rows]
        p_loss, p_met = ppo_clip_loss(lp, old_lp[rows], loss_adv[rows], m, pg.clip_eps, pg.clip_eps_high,
                                      pg.aggregation, normalizer)
        v_loss, v_met = value_loss(values, old_values[rows], returns[rows], m, pc.value_clip, pg.aggregation,
                                   normalizer)
        return p_loss + pc.vf_coef * v_loss, {**p_met, "value_loss": v_met["value_loss"],
                                              "clipfrac_value": v_met["clipfrac_value"]}

    ctx.state["updates"] = int(ctx.state.get("updates", 0)) + 1
    shuffle = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + ctx.state["updates"])
    metrics = _accumulated_steps(ctx, n_groups, G, mask, micro_loss, shuffle)
    metrics["loss"] = metrics.get("policy_loss", 0.0) + pc.vf_coef * metrics.get("value_loss", 0.0)
    metrics.update({
        "explained_variance": explained_variance(old_values, returns, mask),
        "advantage/abs_mean": float(masked_mean(adv.abs(), mask)),  # before whitening
        "value/mean": float(masked_mean(old_values, mask)),
        "return/mean": float(masked_mean(returns, mask)),
    })
    if exp.ref_logprobs is not None:
        metrics["kl"] = float(masked_mean(old_lp - exp.ref_logprobs, mask))
    return metrics
