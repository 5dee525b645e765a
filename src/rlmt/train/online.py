"""The online loop: prompts -> rollout -> rewards -> advantages -> objective -> step.

One loop serves every online policy-gradient method; a method is an *update rule* (see :data:`METHODS`)
that turns one scored rollout (:class:`Experience`) into optimizer steps:

- ``reinforce``: loss = -(r - b) * sum_t log pi(y_t | ...), baseline b from ``pg.advantage``;
- ``grpo``: group-relative advantages into the PPO-clipped surrogate, plus beta * KL(pi || pi_ref) (k3);
- ``ppo``: a value head, GAE over tokens with the KL penalty folded into per-token rewards, the clipped
  surrogate and clipped value loss (:mod:`rlmt.train.ppo`);
- ``trpo``: a natural-gradient step inside a KL trust region (:mod:`rlmt.train.trpo`).

No second forward pass for the old log-probs: pi_old is the sampler's log-probs, except under bfloat16
autocast, where an exactly on-policy update (one epoch, one optimizer step) takes its ratio against the
training pass's own detached log-probs (the bfloat16 sampler rounds differently; see ``_optimize``). The reference model runs only when ``pg.beta > 0`` (with LoRA it is the base with adapters
disabled). Every forward pass runs at the model's autocast setting (:mod:`rlmt.rollout.precision`).
"""

from __future__ import annotations

import contextlib
import math
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rlmt.checkpoint import load_checkpoint, save_checkpoint
from rlmt.config import Config, PolicyGradientConfig, to_dict
from rlmt.curriculum import curriculum_weights, draw_prompts, update_pass_rates
from rlmt.data import check_prompt_lengths, encode_prompt, load_rows, split_sft_row, tokenize_sft
from rlmt.runtime import release_free_heap
from rlmt.models import frozen_reference
from rlmt.rollout.precision import autocast_of
from rlmt.rollout.logprobs import grouped_response_logprobs, token_logprobs
from rlmt.objectives.advantages import group_relative_advantages, running_mean_baseline
from rlmt.objectives.aggregate import loss_normalizer, masked_mean
from rlmt.objectives.policy import kl_penalty_loss, nll_loss, ppo_clip_loss, reinforce_loss, return_weights
from rlmt.records import RunRecorder
from rlmt.rewards import reward_source_for, score_checked
from rlmt.rollout import RolloutBatch, SamplingParams, generate
from rlmt.train.dense import dense_reinforce_advantages, dense_rewards_for
from rlmt.train.optim import build_optimizer, guarded_step
from rlmt.train.runner import _eval_metrics
from rlmt.train.session import resume_checkpoint, start_run
from rlmt.models import save_final
from rlmt.data import make_micro_batches
from rlmt.train.sft import step_indices


# ------------------------------------------------------------------------------------------ the parts


def advantages_for(rewards: torch.Tensor, group_size: int, cfg: PolicyGradientConfig,
                   baseline: float | None) -> tuple[torch.Tensor, float | None]:
    """(N*G,) rewards (NaN = unscored) -> ((N*G,) advantages, updated running baseline)."""
    kind = cfg.advantage
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
    new = running_mean_baseline(baseline, float(r[finite].mean()) if finite.any() else (baseline or 0.0),
                                cfg.baseline_momentum)
    return torch.where(finite, r - b, torch.zeros_like(r)), new


def policy_objective(method: str) -> Callable:
    """(lp, old_lp, adv, mask, cfg, normalizer) -> (loss, metrics) for ``method``."""
    if method in ("grpo", "grape"):
        return lambda lp, old, adv, mask, cfg, n: ppo_clip_loss(lp, old, adv, mask, cfg.clip_eps, cfg.clip_eps_high,
                                                               cfg.aggregation, n)
    if method == "reinforce":
        return lambda lp, old, adv, mask, cfg, n: reinforce_loss(lp, adv, mask, cfg.aggregation, n)
    raise ValueError(f"no policy objective for {method!r}")


@dataclass
class Experience:
    """One scored rollout: everything an update rule needs. Shapes: N = prompts x G sequences, T tokens."""

    batch: RolloutBatch
    rewards: torch.Tensor  # (N,) sequence rewards from the reward source, NaN where unscored
    mask: torch.Tensor  # (N, T) response tokens of scored responses
    ref_logprobs: torch.Tensor | None  # (N, T) log pi_ref, when pg.beta > 0
    group_size: int
    temperature: float  # the sampler's temperature, used for every log-prob
    token_rewards: torch.Tensor | None = None  # (N, T) dense rewards (PPO, REINFORCE; rlmt.train.dense), 0 off mask


@dataclass
class UpdateContext:
    """What an update rule may change: the policy (and critic), the optimizer and its own ``state``.

    ``trainable`` holds every module the optimizer steps (gradient clipping runs over it); ``state`` is a
    JSON-serializable dict saved in checkpoints (e.g. REINFORCE's running baseline).
    """

    policy: torch.nn.Module
    critic: torch.nn.Module | None
    trainable: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    cfg: Config
    state: dict
    demos: "Demonstrations | None" = None


@dataclass
class Demonstrations:
    """Demonstrations for return-weighted optimization: token ids and (optional) rewards R (n,)."""

    examples: list
    rewards: torch.Tensor | None


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
    The draw is a pure function of a counter kept in ``ctx.state``, so resume stays exact.
    """
    demos, cfg = ctx.demos, ctx.cfg
    k = int(ctx.state.get("demo_draws", 0))
    ctx.state["demo_draws"] = k + 1
    idx = step_indices(k, cfg.optim.batch_size, len(demos.examples), cfg.run.seed + 1, True)
    mb = make_micro_batches([demos.examples[i] for i in idx], cfg.optim.batch_size, ctx.policy.config.pad_token_id
                            if ctx.policy.config.pad_token_id is not None else 0)[0]
    device = next(ctx.policy.parameters()).device
    mb = mb.to(device)
    lp = token_logprobs(ctx.policy, mb.input_ids, mb.attention_mask, mb.target_mask)
    weights = None if demos.rewards is None else return_weights(demos.rewards[idx], cfg.pg.nll_tau).to(device)
    loss, metrics = nll_loss(lp, mb.target_mask, weights=weights, aggregation="token_mean")
    (cfg.pg.nll_coef * loss).backward()
    return {"demo/nll": metrics["nll"], "demo/nll_loss": cfg.pg.nll_coef * metrics["nll_loss"]}


UpdateRule = Callable[[UpdateContext, Experience], dict]


def sequence_rewards(exp: Experience, pg: PolicyGradientConfig) -> torch.Tensor:
    """(N,) rewards; with ``pg.kl_in_reward``: r - beta * sum_t (log pi_old - log pi_ref) (k1 in the reward)."""
    if exp.ref_logprobs is None or not pg.kl_in_reward:
        return exp.rewards
    return exp.rewards - pg.beta * ((exp.batch.logprobs - exp.ref_logprobs) * exp.mask).sum(-1)


def policy_gradient_update(ctx: UpdateContext, exp: Experience) -> dict[str, float]:
    """REINFORCE and GRPO: sequence advantages, then the method's objective over minibatches.

    REINFORCE with dense rewards (``exp.token_rewards``) uses per-token advantages instead
    (:func:`dense_advantages`); GRPO/GRAPE never receive dense rewards (see :mod:`rlmt.train.dense`).
    """
    rewards = sequence_rewards(exp, ctx.cfg.pg)
    if exp.token_rewards is not None and ctx.cfg.algorithm == "reinforce":
        adv, ctx.state["baseline"] = dense_advantages(exp, rewards, ctx.cfg, ctx.state.get("baseline"))
    else:
        adv, ctx.state["baseline"] = advantages_for(rewards, exp.group_size, ctx.cfg.pg, ctx.state.get("baseline"))
    before_step = (lambda: demonstration_nll(ctx)) if ctx.demos is not None else None
    ctx.state["updates"] = int(ctx.state.get("updates", 0)) + 1
    metrics = _optimize(ctx.trainable, ctx.policy, ctx.optimizer, ctx.scheduler, ctx.cfg,
                        policy_objective(ctx.cfg.algorithm), exp.batch, adv, exp.mask, exp.ref_logprobs,
                        exp.temperature, before_step, shuffle_seed=ctx.cfg.run.seed * 1_000_003 + ctx.state["updates"])
    abs_mean = float(adv.abs().mean()) if adv.ndim == 1 else float(masked_mean(adv.abs(), exp.mask))
    return {**metrics, "advantage/abs_mean": abs_mean}


def dense_advantages(exp: Experience, rewards: torch.Tensor, cfg: Config,
                     baseline: float | None) -> tuple[torch.Tensor, float | None]:
    """REINFORCE with dense rewards: (N, T) advantages ``A_t = G_t - b`` (:func:`dense_reinforce_advantages`).

    The baseline b of each sequence comes from ``pg.advantage`` applied to its total return
    ``G_0 = c * R + sum_t d_t`` (c = ``rm.dense_outcome_coef``): b = G_0 - A(G_0). ``group`` acts as
    ``group_no_std`` here: a sequence's std would rescale token returns that differ along the sequence.
    """
    c = cfg.rm.dense_outcome_coef
    total = c * rewards + exp.token_rewards.sum(-1)  # (N,), NaN where unscored
    pg = dataclasses.replace(cfg.pg, advantage="group_no_std") if cfg.pg.advantage == "group" else cfg.pg
    seq_adv, baseline = advantages_for(total, exp.group_size, pg, baseline)
    return dense_reinforce_advantages(rewards, exp.token_rewards, exp.mask, total - seq_adv, c), baseline


def _response_logprobs(model, batch: RolloutBatch, groups: torch.Tensor, group_size: int,
                       temperature: float) -> torch.Tensor:
    """(len(groups) * G, T) log-probs of the responses of the given prompt groups: each group is one packed
    row, its prompt computed once (:func:`grouped_response_logprobs`)."""
    rows = (groups[:, None] * group_size + torch.arange(group_size)).flatten()
    first = rows[::group_size]
    P = batch.prompt_len
    return grouped_response_logprobs(model, batch.input_ids[first, :P], batch.attention_mask[first, :P],
                                     batch.response_ids[rows], batch.response_mask[rows], group_size, temperature)


# ------------------------------------------------------------------------------------------ the loop


def train_online(cfg: Config) -> Path:
    run_dir, lm, fmt = start_run(cfg)
    policy, tok = lm.model, lm.tokenizer
    report = load_rows(cfg.data.train, "prompt", cfg.data.on_invalid, cfg.data.limit)
    source = reward_source_for(cfg)
    rows = source.prepare_rows(report.rows) if hasattr(source, "prepare_rows") else report.rows
    rows = check_prompt_lengths(rows, tok, fmt, cfg.data.max_prompt_tokens, cfg.data.on_invalid, report)
    pg, G = cfg.pg, cfg.rollout.num_samples
    total = cfg.optim.max_steps or max(1, math.ceil(cfg.optim.epochs * len(rows) / cfg.rollout.batch_prompts))
    method = METHODS[cfg.algorithm]
    critic = method.make_critic(policy, cfg) if method.make_critic else None
    trainable = torch.nn.ModuleList([policy] + ([critic] if critic is not None else []))
    opt, sched = build_optimizer(trainable, cfg.optim, total * pg.epochs * pg.minibatches,
                                 preallocate=cfg.algorithm != "trpo")  # TRPO takes its own steps
    extras = {"critic": critic} if critic is not None else None
    reference = frozen_reference(lm, cfg.model.dtype) if pg.beta > 0 else None  # rlmt.models.reference
    ckpt = resume_checkpoint(cfg)
    state = load_checkpoint(ckpt, policy, opt, sched, extras) if ckpt else {"step": 0, "update": {}}
    rec = RunRecorder(run_dir, to_dict(cfg), state["step"] if ckpt else None, cfg.run.tensorboard,
                      cfg.run.log_every, total, cfg.run.progress)
    if cfg.run.eval_before_after and cfg.data.eval and not ckpt:
        before = _eval_metrics(cfg, lm, fmt, "before", run_dir)
        rec.note(f"eval before: pass@1 {before['pass@1']:.3f}  reward/mean {before['reward/mean']:.3f}")
    params = SamplingParams(G, cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_new_tokens,
                            tuple(cfg.rollout.stop))
    device = next(policy.parameters()).device
    train_t = cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0
    base_demos = load_demonstrations(cfg, tok, fmt, source)
    ctx = UpdateContext(policy, critic, trainable, opt, sched, cfg, dict(state.get("update", {})), base_demos)
    revise = cfg.algorithm == "grape" and cfg.grape.revise  # GRAPE critique-revise (rlmt.grape.revise)
    if revise:
        from rlmt.grape.revise import revise_step, revision_demonstrations

        ctx.demos = revision_demonstrations(ctx.state, base_demos)
    pass_rates = torch.tensor(state.get("pass_rates") or [float("nan")] * len(rows), dtype=torch.float32)
    for step in range(state["step"], total):
        t_step = time.perf_counter()
        gen = torch.Generator(device=device).manual_seed(cfg.run.seed * 1_000_003 + step)
        if pg.curriculum:
            pick = torch.Generator().manual_seed(cfg.run.seed * 7_777_777 + step)
            idx = draw_prompts(curriculum_weights(pass_rates, pg.curriculum_floor), cfg.rollout.batch_prompts, pick)
        else:
            idx = step_indices(step, cfg.rollout.batch_prompts, len(rows), cfg.run.seed, cfg.data.shuffle)
        step_rows = [rows[i] for i in idx]
        batch = generate(policy, tok, [encode_prompt(tok, fmt, r.data["prompt"]) for r in step_rows], params, gen)
        rep_rows = [step_rows[int(i)].data for i in batch.prompt_index]
        scored = score_checked(source, rep_rows, batch.texts, invalid_as_none=cfg.reward.invalid_as_none)
        rewards = torch.tensor([float("nan") if s is None else s for s in scored.scores], device=device)
        valid = torch.isfinite(rewards)
        mask = batch.response_mask & valid[:, None]
        ref_lp = None
        N = len(batch.texts)
        t_ref = time.perf_counter()
        if pg.beta > 0:
            release_free_heap()  # the rollout's freed transients, before the reference pass stacks on them
            with torch.no_grad(), reference.passes() as ref:
                # one prompt group per pass: small peak; the reference's file pages are dropped after
                ref_lp = torch.cat([_response_logprobs(ref, batch, g[None], G, train_t) for g in torch.arange(N // G)])
        dense = dense_rewards_for(cfg.algorithm, batch.response_ids, batch.response_mask, tok, scored.token_rewards,
                                  mask)
        revised = revise_step(ctx, base_demos, tok, fmt, rep_rows, batch, scored, source, params, gen) if revise else {}
        release_free_heap()
        t_update = time.perf_counter()
        metrics = {**method.update(ctx, Experience(batch, rewards, mask, ref_lp, G, train_t, dense)), **revised}
        release_free_heap()
        # phases of the step: reference pass (with dense rewards / revisions when configured), then the update
        metrics.update({"time/reference_s": t_update - t_ref, "time/update_s": time.perf_counter() - t_update})
        groups = rewards.reshape(-1, G)
        if pg.curriculum:
            group_pass = (groups >= cfg.reward.pass_threshold).float().mean(-1)  # unscored counts as a fail
            pass_rates = update_pass_rates(pass_rates, torch.tensor(idx), group_pass, pg.curriculum_momentum)
            seen = ~torch.isnan(pass_rates)
            metrics.update({"curriculum/seen": float(seen.sum()),
                            "curriculum/mean_pass_rate": float(pass_rates[seen].mean()) if seen.any() else 0.0})
        r_ok = rewards[valid]
        metrics.update({
            "reward/mean": float(r_ok.mean()) if valid.any() else float("nan"),
            "reward/std": float(r_ok.std()) if valid.sum() > 1 else 0.0,
            "pass_rate": float((r_ok >= cfg.reward.pass_threshold).float().mean()) if valid.any() else 0.0,
            "reward/unscored": float((~valid).sum()),
            "groups/zero_variance": float(((groups.nan_to_num(-1e9).amax(-1) - groups.nan_to_num(1e9).amin(-1)) == 0).sum()),
            "response_length/mean": float(batch.response_lengths.float().mean()),
            **{k: v for k, v in batch.stats.items() if k != "rollout/decode_steps"},
            "train/sequence_tokens": float(batch.attention_mask.sum()),
            # what the packed training pass computes: each prompt once, then its responses
            "train/packed_tokens": float(batch.attention_mask[::G, :batch.prompt_len].sum() + batch.response_mask.sum()),
            "time/step_s": time.perf_counter() - t_step,
            **scored.metrics,
        })
        rec.log(step + 1, metrics)
        if cfg.run.save_every and (step + 1) % cfg.run.save_every == 0 and step + 1 < total:
            save_checkpoint(run_dir, step + 1, policy, opt, sched, {"update": ctx.state, "pass_rates": pass_rates.tolist()},
                            cfg.run.keep_checkpoints, extras)
    save_checkpoint(run_dir, total, policy, opt, sched, {"update": ctx.state, "pass_rates": pass_rates.tolist()},
                    cfg.run.keep_checkpoints, extras)
    save_final(policy, tok, run_dir)
    if hasattr(source, "finish"):
        source.finish(run_dir)
    if cfg.run.eval_before_after and cfg.data.eval:
        after = _eval_metrics(cfg, lm, fmt, "after", run_dir)
        rec.note(f"eval after: pass@1 {after['pass@1']:.3f}  reward/mean {after['reward/mean']:.3f}")
    rec.close()
    return run_dir


def _optimize(trainable, policy, opt, sched, cfg: Config, objective, batch: RolloutBatch, adv: torch.Tensor,
              mask: torch.Tensor, ref_lp: torch.Tensor | None, temperature: float,
              before_step: Callable[[], dict] | None = None, shuffle_seed: int = 0) -> dict[str, float]:
    """``pg.epochs`` passes over the rollout, ``pg.minibatches`` optimizer steps each, micro-batches of
    whole prompt groups (``optim.batch_size`` sequences, rounded to groups) accumulated with the minibatch's
    global loss normalizer. ``before_step`` (optional) adds more gradient before each optimizer step (the
    demonstration NLL of return-weighted optimization) and returns its metrics."""
    pg = cfg.pg
    G = cfg.rollout.num_samples
    if batch.input_ids.shape[0] % G:
        raise ValueError(f"{batch.input_ids.shape[0]} sequences do not split into groups of {G}")
    n_groups = batch.input_ids.shape[0] // G
    groups_per_micro = max(1, cfg.optim.batch_size // G)
    old_lp = batch.logprobs
    # pi_old must be the policy as the trainer computes it. In float32 the sampler computes the same function
    # (its log-probs match the training pass's to ~1e-5), so its numbers serve. Under autocast the sampler is a
    # bfloat16 copy (rlmt.rollout.precision) that rounds differently (~0.04 nats): then an update that is exactly
    # on-policy (one epoch, one optimizer step) takes the ratio against the training pass's own detached
    # log-probs. The sampler/trainer gap is reported either way as rollout/logprob_gap.
    on_policy = pg.epochs == 1 and pg.minibatches == 1 and autocast_of(policy) is not None
    token_weighted: dict[str, float] = {}  # diagnostics: token-weighted means over the whole update
    loss_sums: dict[str, float] = {}  # losses: each micro-batch holds its share; summed per optimizer step
    tokens, n_steps, skipped, grad_norm, lr = 0.0, 0, 0.0, 0.0, 0.0
    policy.train()
    for epoch in range(pg.epochs):
        order = torch.arange(n_groups) if epoch == 0 else torch.randperm(  # later epochs: a fresh group order
            n_groups, generator=torch.Generator().manual_seed(shuffle_seed * 101 + epoch))
        for mb_groups in order.chunk(pg.minibatches):
            mb = (mb_groups[:, None] * G + torch.arange(G)).flatten()
            normalizer = loss_normalizer(mask[mb], pg.aggregation, max_len=cfg.rollout.max_new_tokens)
            for micro_groups in mb_groups.split(groups_per_micro):
                micro = (micro_groups[:, None] * G + torch.arange(G)).flatten()
                m = mask[micro]
                if not m.any():
                    continue
                lp = _response_logprobs(policy, batch, micro_groups, G, temperature)
                old = lp.detach() if on_policy else old_lp[micro]
                loss, met = objective(lp, old, adv[micro], m, pg, normalizer)
                met = {**met, "rollout/logprob_gap": float(masked_mean((lp.detach() - old_lp[micro]).abs(), m))}
                if ref_lp is not None and not pg.kl_in_reward:
                    kl_loss, kl_met = kl_penalty_loss(lp, ref_lp[micro], m, pg.beta, pg.kl_estimator,
                                                      pg.aggregation, normalizer)
                    loss = loss + kl_loss
                    met = {**met, **kl_met}
                loss.backward()
                w = float(m.sum())
                tokens += w
                for k, v in met.items():
                    if k.endswith("loss"):
                        loss_sums[k] = loss_sums.get(k, 0.0) + v
                    else:
                        token_weighted[k] = token_weighted.get(k, 0.0) + v * w
            if before_step is not None:
                for k, v in before_step().items():
                    loss_sums[k] = loss_sums.get(k, 0.0) + v
            step = guarded_step(trainable, opt, sched, cfg.optim.max_grad_norm)
            n_steps += 1
            skipped += step["skipped_steps"]
            grad_norm, lr = step["grad_norm"], step["lr"]
    out = {k: v / tokens for k, v in token_weighted.items()} if tokens else {}
    out.update({k: v / n_steps for k, v in loss_sums.items()})
    out["loss"] = out.get("policy_loss", 0.0) + out.get("kl_loss", 0.0) + out.get("demo/nll_loss", 0.0)
    out.update({"skipped_steps": skipped, "grad_norm": grad_norm, "lr": lr, "tokens": tokens / max(1, pg.epochs)})
    return out


@dataclass(frozen=True)
class OnlineMethod:
    """An online method: its update rule, and (PPO) how to build the critic that trains beside the policy."""

    update: UpdateRule
    make_critic: Callable[[torch.nn.Module, Config], torch.nn.Module] | None = None


def _lazy(module: str, name: str) -> Callable:
    def call(*args, **kwargs):
        import importlib

        return getattr(importlib.import_module(module), name)(*args, **kwargs)
    return call


METHODS: dict[str, OnlineMethod] = {
    "reinforce": OnlineMethod(policy_gradient_update),
    "grpo": OnlineMethod(policy_gradient_update),
    "grape": OnlineMethod(policy_gradient_update),  # GRPO's update on the rubric reward (rlmt.grape)
    "ppo": OnlineMethod(_lazy("rlmt.train.ppo", "ppo_update"), _lazy("rlmt.train.ppo", "make_value_head")),
    "trpo": OnlineMethod(_lazy("rlmt.train.trpo", "trpo_update")),
}
