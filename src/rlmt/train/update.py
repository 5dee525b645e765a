"""The policy-gradient update shared by REINFORCE, GRPO, GSPO, GRAPE and PPO: micro-batches of whole prompt
groups, accumulated under the minibatch's global loss normalizer, ``pg.epochs`` x ``pg.minibatches`` steps.

For one micro-batch of prompt groups (rows ``mb``), with the method's objective ``J`` (a pure function of
:mod:`rlmt.objectives`), advantages A and the global normalizer N of its minibatch:

    loss_mb = J(log pi, log pi_old, A; N)                           the policy term
            + beta * aggregate(k(log pi, log pi_ref); N)            KL in the loss (unless pg.kl_in_reward)
            + vf_coef * value_loss(V, V_old, R; N)                  a critic (PPO)

and ``sum_mb grad loss_mb`` is the gradient of the whole minibatch's loss, whatever the split (see
:mod:`rlmt.objectives.aggregate`). Before each optimizer step, return-weighted optimization adds
``pg.nll_coef`` x the NLL of a batch of demonstrations. Metrics are reduced by
:class:`rlmt.train.metrics.MetricReduction` with token weights.

pi_old must be the policy as the trainer computes it. In float32 the sampler computes the same function (its
log-probs match the training pass's to ~1e-5), so its numbers serve. Under autocast the sampler is a bfloat16
copy (:mod:`rlmt.rollout.precision`) that rounds differently (~0.04 nats): then an update that is exactly
on-policy (one epoch, one optimizer step) takes the ratio against the training pass's own detached
log-probs. The sampler/trainer gap is reported either way as ``rollout/logprob_gap``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from rlmt.config import Config
from rlmt.data import load_rows, make_micro_batches, split_sft_row, tokenize_sft
from rlmt.objectives.aggregate import loss_normalizer, masked_mean
from rlmt.objectives.policy import is_finite_loss, kl_penalty_loss, nll_loss, return_weights, value_loss
from rlmt.rewards import score_checked
from rlmt.rollout import RolloutBatch
from rlmt.rollout.logprobs import grouped_response_logprobs, token_logprobs
from rlmt.runtime import release_free_heap
from rlmt.train.experience import (Advantages, Demonstrations, Experience, PolicyObjective, UpdateContext,
                                   group_rows)
from rlmt.parallel.fsdp import is_sharded
from rlmt.train.metrics import MetricReduction, reduce_across
from rlmt.train.optim import NONFINITE, guarded_step, nonfinite_count
from rlmt.train.ppo import response_logprobs_and_values
from rlmt.data import step_indices

# (prompt-group indices, normalizer) -> (loss, metrics): one micro-batch's share of its minibatch's loss
MicroLoss = Callable[[Tensor, Tensor], tuple[Tensor, dict[str, float]]]


def response_logprobs(model, batch: RolloutBatch, groups: Tensor, group_size: int, temperature: float,
                      autocast: torch.dtype | None = None) -> Tensor:
    """(len(groups) * G, T) log-probs of the responses of the given prompt groups: each group is one packed
    row, its prompt computed once (:func:`grouped_response_logprobs`)."""
    rows = group_rows(groups, group_size)
    first = rows[::group_size]
    P = batch.prompt_len
    return grouped_response_logprobs(model, batch.input_ids[first, :P], batch.attention_mask[first, :P],
                                     batch.response_ids[rows], batch.response_mask[rows], group_size, temperature,
                                     autocast=autocast)


def sampled_token_cap(cfg: Config) -> int:
    """The most tokens a response samples (``pg.aggregation: constant`` divides by it): ``rollout.max_new_tokens``,
    or an episode's sampled turns (``env.max_turns`` of them, within ``env.max_total_tokens``)."""
    if cfg.env.source:
        return min(cfg.env.max_turns * cfg.rollout.max_new_tokens, cfg.env.max_total_tokens)
    return cfg.rollout.max_new_tokens


def accumulate(ctx: UpdateContext, n_groups: int, group_size: int, mask: Tensor, micro_loss: MicroLoss,
               before_step: Callable[[], dict[str, float]] | None = None, group_offset: int = 0) -> dict[str, float]:
    """``pg.epochs`` x ``pg.minibatches`` optimizer steps over whole prompt groups.

    Micro-batches of ``optim.batch_size`` sequences (rounded to whole groups) accumulate
    ``micro_loss(groups, normalizer)`` with their minibatch's global normalizer. Epoch 0 keeps the rollout
    order; later epochs shuffle the groups with a generator seeded by (run.seed, the update counter in
    ``ctx.state``), so a resumed run replays them. ``before_step`` adds more gradient before each optimizer
    step and returns its metrics (counted once per step).

    On several ranks (``ctx.world``) this rank holds the step's groups ``[group_offset, group_offset +
    n_groups)`` of ``n_groups * world.size``. The minibatches are drawn over the *global* group indices, the
    same on every rank, and each rank takes the groups of each minibatch it holds (possibly none); the
    normalizer is summed across ranks and the gradients too (:func:`guarded_step`), so every optimizer step
    is the one-process step over the same groups.
    """
    cfg, pg, world = ctx.cfg, ctx.cfg.pg, ctx.world
    per_micro = max(1, cfg.optim.batch_size // group_size)
    ctx.state["updates"] = int(ctx.state.get("updates", 0)) + 1
    shuffle = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + ctx.state["updates"])
    reduction = MetricReduction()
    tokens, skipped, nonfinite, sync, step = 0.0, 0.0, 0.0, 0.0, {"grad_norm": 0.0, "lr": 0.0}
    ctx.trainable.train()
    n_global = n_groups * world.size
    sharded = world.size > 1 and is_sharded(ctx.trainable)
    for epoch in range(pg.epochs):
        order = torch.arange(n_global) if epoch == 0 else torch.randperm(n_global, generator=shuffle)
        for mb_global in order.chunk(pg.minibatches):
            mb_groups = mb_global
            if world.size > 1:  # this rank's groups of the minibatch, as local indices
                held = (mb_global >= group_offset) & (mb_global < group_offset + n_groups)
                mb_groups = mb_global[held] - group_offset
            normalizer = loss_normalizer(mask[group_rows(mb_groups, group_size)], pg.aggregation,
                                         max_len=sampled_token_cap(cfg))
            normalizer = world.all_reduce(normalizer.to(world.device), "sum").to(normalizer.device)
            finite = True  # a non-finite log-prob or loss loses the whole step: no backward, the guard skips it
            micros = [g for g in mb_groups.split(per_micro) if mask[group_rows(g, group_size)].any()]
            # FSDP gathers each layer on all ranks at once: every rank runs as many passes as the busiest one,
            # the extra ones with zero weight (agreed on before any pass, so the collectives line up)
            passes = int(world.all_reduce_max(len(micros))) if sharded else len(micros)
            for micro_groups in micros:
                w = float(mask[group_rows(micro_groups, group_size)].sum())
                loss, met = micro_loss(micro_groups, normalizer)
                bad = met.pop(NONFINITE, 0.0)
                nonfinite += bad
                finite = finite and bad == 0 and is_finite_loss(loss)
                if finite or sharded:  # FSDP: every rank runs every backward; the guard skips the step
                    loss.backward()
                tokens += w
                reduction.add(met, w)
            for _ in range(passes - len(micros)):  # a one-token pass through every layer: zero, finite grads
                (0.0 * ctx.policy(input_ids=torch.zeros((1, 1), dtype=torch.long, device=mask.device)
                                  ).logits.float().sum()).backward()
            finite = world.agree(finite)  # every rank adds the demonstrations' share, or none does
            if before_step is not None and finite:
                extra = before_step()
                finite = finite and all(math.isfinite(v) for k, v in extra.items() if k.endswith("loss"))
                reduction.add(extra, 1.0)
            step = guarded_step(ctx.trainable, ctx.optimizer, ctx.scheduler, cfg.optim.max_grad_norm, finite, world)
            reduction.end_step()
            skipped += step["skipped_steps"]
            sync += step.get("time/grad_sync_s", 0.0)
    release_free_heap()  # the update's freed activations, before the next rollout stacks on them
    return {**reduction.result_across(world), "skipped_steps": skipped, NONFINITE: world.sum_scalar(nonfinite),
            "grad_norm": step["grad_norm"], "lr": step["lr"], "tokens": world.sum_scalar(tokens) / max(1, pg.epochs),
            **({"time/grad_sync_s": sync} if world.size > 1 else {})}


def policy_micro_loss(ctx: UpdateContext, exp: Experience, adv: Advantages, objective: PolicyObjective) -> MicroLoss:
    """The micro-batch loss of the module docstring for this rollout: the objective, the KL term when it is
    in the loss, and the value loss when the method has a critic (``adv`` then carries V_old and R)."""
    pg, batch, G = ctx.cfg.pg, exp.batch, exp.group_size
    on_policy = pg.epochs == 1 and pg.minibatches == 1 and ctx.autocast is not None
    kl_in_loss = exp.ref_logprobs is not None and not pg.kl_in_reward

    def micro_loss(groups: Tensor, normalizer: Tensor) -> tuple[Tensor, dict[str, float]]:
        rows = group_rows(groups, G)
        m = exp.mask[rows]
        if ctx.critic is not None:
            lp, values = response_logprobs_and_values(ctx.policy, ctx.critic, batch, groups, G, exp.temperature,
                                                      autocast=ctx.autocast)
        else:
            lp, values = response_logprobs(ctx.policy, batch, groups, G, exp.temperature, ctx.autocast), None
        sampler = batch.logprobs[rows]
        old = lp.detach() if on_policy else sampler
        loss, met = objective(lp, old, adv.values[rows], m, pg, normalizer)
        met = {**met, "rollout/logprob_gap": float(masked_mean((lp.detach() - sampler).abs(), m)),
               NONFINITE: nonfinite_count(lp, m) + nonfinite_count(old, m)}
        if kl_in_loss:
            kl_loss, kl_met = kl_penalty_loss(lp, exp.ref_logprobs[rows], m, pg.beta, pg.kl_estimator,
                                              pg.aggregation, normalizer)
            loss, met = loss + kl_loss, {**met, **kl_met}
        if values is not None:
            pc = ctx.cfg.ppo
            v_loss, v_met = value_loss(values, adv.old_values[rows], adv.returns[rows], m, pc.value_clip,
                                       pg.aggregation, normalizer)
            loss = loss + pc.vf_coef * v_loss
            met = {**met, "value_loss": v_met["value_loss"], "clipfrac_value": v_met["clipfrac_value"]}
        return loss, met

    return micro_loss


def policy_gradient_update(ctx: UpdateContext, exp: Experience, adv: Advantages) -> dict[str, float]:
    """The update rule of REINFORCE, GRPO, GSPO, GRAPE and PPO: the shared accumulation over the method's
    micro-batch loss (see the module docstring)."""
    N, G = exp.batch.response_ids.shape[0], exp.group_size
    if N % G:
        raise ValueError(f"{N} sequences do not split into groups of {G}")
    before_step = (lambda: demonstration_nll(ctx)) if ctx.demos is not None else None
    micro_loss = policy_micro_loss(ctx, exp, adv, ctx.method.objective)
    metrics = accumulate(ctx, N // G, G, exp.mask, micro_loss, before_step, exp.group_offset)
    metrics["loss"] = (metrics.get("policy_loss", 0.0) + metrics.get("kl_loss", 0.0)
                       + ctx.cfg.ppo.vf_coef * metrics.get("value_loss", 0.0) + metrics.get("demo/nll_loss", 0.0))
    return {**metrics, **reduce_across(ctx.world, adv.metrics)}


# -------------------------------------------------------------------------- return-weighted optimization


def load_demonstrations(cfg: Config, tokenizer, fmt, source) -> Demonstrations | None:
    """Read ``data.demonstrations`` when ``pg.nll_coef > 0``; rewards come from a row's ``reward`` field,
    else from the run's reward source applied to the demonstration's completion."""
    if cfg.pg.nll_coef <= 0 or not cfg.data.demonstrations:
        return None
    report = load_rows(cfg.data.demonstrations, "sft", cfg.data.on_invalid)
    examples = tokenize_sft(report.rows, tokenizer, fmt, cfg.data.max_prompt_tokens, cfg.data.max_completion_tokens,
                            cfg.data.on_invalid, report)
    rewards = None
    if cfg.pg.nll_tau is not None:
        rows = [r.data for r in report.rows]
        if all(isinstance(r.get("reward"), (int, float)) for r in rows):
            scores = [float(r["reward"]) for r in rows]
        else:
            scores = score_checked(source, rows, [split_sft_row(r)[1] for r in rows]).scores
        rewards = torch.tensor([0.0 if s is None else s for s in scores])
    return Demonstrations(examples, rewards)


def demonstration_nll(ctx: UpdateContext) -> dict[str, float]:
    """Add lambda * (weighted) NLL of ``optim.batch_size`` demonstrations to the pending gradient.

    weights w = exp(R / tau) normalized to mean 1 (:func:`return_weights`) when ``pg.nll_tau`` is set.
    The draw is a pure function of a counter kept in ``ctx.state``, so resume stays exact. On N ranks every
    rank draws the same batch and adds 1/N of its gradient, so the sum across ranks is the one-process term.
    """
    demos, cfg = ctx.demos, ctx.cfg
    k = int(ctx.state.get("demo_draws", 0))
    ctx.state["demo_draws"] = k + 1
    idx = step_indices(k, cfg.optim.batch_size, len(demos.examples), cfg.run.seed + 1, True)
    pad = ctx.policy.config.pad_token_id if ctx.policy.config.pad_token_id is not None else 0
    mb = make_micro_batches([demos.examples[i] for i in idx], cfg.optim.batch_size, pad)[0]
    device = next(ctx.policy.parameters()).device
    mb = mb.to(device)
    lp = token_logprobs(ctx.policy, mb.input_ids, mb.attention_mask, mb.target_mask, autocast=ctx.autocast)
    weights = None if demos.rewards is None else return_weights(demos.rewards[idx], cfg.pg.nll_tau).to(device)
    loss, metrics = nll_loss(lp, mb.target_mask, weights=weights, aggregation="token_mean")
    (cfg.pg.nll_coef / ctx.world.size * loss).backward()
    # a loss share: summed over ranks by MetricReduction.result_across, like the gradient
    return {"demo/nll": metrics["nll"], "demo/nll_loss": cfg.pg.nll_coef * metrics["nll_loss"] / ctx.world.size}
