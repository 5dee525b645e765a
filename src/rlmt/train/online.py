"""The online loop: prompts -> rollout -> rewards -> reference -> advantages -> update -> record.

One loop serves every online method (rejection sampling, REINFORCE, GRPO, GSPO, PPO, TRPO, GRAPE); what
differs is the method's row of :data:`rlmt.train.methods.METHODS`, passed in once. Each step:

1. draws ``plan.prompts_per_step`` prompts (:class:`PromptSampler`: a seeded epoch order, or the curriculum);
2. samples G responses per prompt (:func:`rollout`, ``rollout.batch_prompts`` prompts per engine call),
   each sample's draws keyed by (run.seed, step, prompt position in the step, sample index);
3. scores them with the reward source (None -> NaN: excluded from the update, counted);
4. runs the reference model when the method is KL-regularized and ``pg.beta > 0`` (:func:`reference_logprobs`;
   LoRA: the policy with adapters disabled);
5. turns the scored rollout into advantages and an update (the method's row), and records the metrics.

pi_old is the sampler's log-probs (no second forward pass; see :mod:`rlmt.train.update` for autocast).
Every forward pass runs at the model's autocast setting (:mod:`rlmt.rollout.precision`). Resume is exact:
the sampler, the prompt order and the epoch shuffles are pure functions of (seed, step), and the update's
state (baselines, counters, revisions) and the curriculum's pass rates are checkpointed.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import torch

from rlmt.checkpoint import load_checkpoint
from rlmt.config import Config
from rlmt.curriculum import curriculum_weights, draw_prompts, update_pass_rates
from rlmt.data import Row, SourceOptions, check_prompt_lengths, encode_prompt, load_rows
from rlmt.evaluate import evaluate_run
from rlmt.models import Reference, frozen_reference, save_final
from rlmt.envs.evaluate import env_parts, env_seed, evaluate_env_run
from rlmt.envs.base import check_env_fields
from rlmt.envs.episodes import EpisodeBatch, run_episodes
from rlmt.rewards import RewardResult, check_reward_fields, check_reward_source, reward_source_for, score_checked
from rlmt.parallel import World, check_divisible, shard_groups
from rlmt.parallel.fsdp import full_state_dict, gathered, shard_layers
from rlmt.rollout import RolloutBatch, SamplingParams, concat_batches, generate, sample_keys, weights_shared
from rlmt.records import progress_bar
from rlmt.runtime import release_free_heap
from rlmt.train.dense import dense_rewards_for
from rlmt.train.experience import Experience, UpdateContext
from rlmt.train.experience import OnlineMethod
from rlmt.train.methods import METHODS, policy_gradient_plan, update_step
from rlmt.train.optim import build_optimizer
from rlmt.train.metrics import reduce_across
from rlmt.train.session import recorder, resume_checkpoint, run_record, save_on_main, shard_model, start_run
from rlmt.data import step_indices
from rlmt.train.update import load_demonstrations, response_logprobs


class PromptSampler:
    """Which prompts step s samples: ``step_indices`` over a seeded epoch order, or with ``pg.curriculum``
    a draw weighted by each prompt's running pass rate (groups that still vary come more often)."""

    def __init__(self, cfg: Config, n_rows: int, pass_rates: list[float] | None):
        self.cfg, self.n = cfg, n_rows
        self.pass_rates = torch.tensor(pass_rates or [float("nan")] * n_rows, dtype=torch.float32)

    def draw(self, step: int, k: int) -> list[int]:
        cfg = self.cfg
        if cfg.pg.curriculum:
            pick = torch.Generator().manual_seed(cfg.run.seed * 7_777_777 + step)
            return draw_prompts(curriculum_weights(self.pass_rates, cfg.pg.curriculum_floor), k, pick)
        return step_indices(step, k, self.n, cfg.run.seed, cfg.data.shuffle)

    def observe(self, idx: list[int], rewards: torch.Tensor, group_size: int) -> dict[str, float]:
        """Update the pass rates of the prompts just sampled (unscored counts as a fail); curriculum only."""
        if not self.cfg.pg.curriculum:
            return {}
        group_pass = (rewards.reshape(-1, group_size) >= self.cfg.reward.pass_threshold).float().mean(-1)
        self.pass_rates = update_pass_rates(self.pass_rates, torch.tensor(idx), group_pass.cpu(),
                                            self.cfg.pg.curriculum_momentum)
        seen = ~torch.isnan(self.pass_rates)
        return {"curriculum/seen": float(seen.sum()),
                "curriculum/mean_pass_rate": float(self.pass_rates[seen].mean()) if seen.any() else 0.0}


def rollout(policy, tokenizer, fmt, rows: list[Row], params: SamplingParams, generator: torch.Generator | None,
            batch_prompts: int, autocast: torch.dtype | None = None,
            keys: list[tuple[int, ...]] | None = None, bar: str | None = None) -> RolloutBatch:
    """G responses for each row, ``batch_prompts`` prompts per engine call, as one batch; the rollout's freed
    transients are handed back before the next phase (:func:`rlmt.runtime.release_free_heap`). With ``keys``
    (:func:`rlmt.rollout.sample_keys`, one per sample) each sample's draws depend on its key alone. ``bar``:
    a progress bar of that name counts the prompts (rejection sampling's rounds)."""
    prompts = [encode_prompt(tokenizer, fmt, r.data["prompt"]) for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    G = params.num_samples
    parts = []
    with progress_bar(len(prompts), bar or "", "prompt", bar is not None, leave=False) as shown, weights_shared():
        for i in range(0, len(prompts), batch_prompts):
            parts.append(generate(policy, tokenizer, prompts[i:i + batch_prompts], params, generator, autocast,
                                  None if keys is None else keys[i * G:(i + batch_prompts) * G]))
            shown.update(len(prompts[i:i + batch_prompts]))
    batch = concat_batches(parts, pad)
    release_free_heap()
    return batch


def reference_logprobs(reference: Reference, batch: RolloutBatch, group_size: int, temperature: float) -> torch.Tensor:
    """(N, T) log pi_ref of the sampled responses, one prompt group per pass (a small peak); the reference's
    file pages are dropped afterwards (:meth:`Reference.passes`)."""
    with torch.no_grad(), reference.passes() as ref:
        out = torch.cat([response_logprobs(ref, batch, g[None], group_size, temperature, reference.autocast)
                         for g in torch.arange(batch.response_ids.shape[0] // group_size)])
    release_free_heap()
    return out


def score_rollout(cfg: Config, method: OnlineMethod, source, rows: list[dict], batch: RolloutBatch,
                  episodes: EpisodeBatch | None, tokenizer):
    """A step's rewards: ``(rewards (N,) the update trains on, returns (N,) the metrics and curriculum see,
    the source's result, dense(mask) -> (N, T) per-token rewards or None)``; NaN where unscored.

    Single responses: the reward source scores them (dense rewards from a dense source's step ends).
    Episodes: GRPO & co. train on the return; PPO and REINFORCE on the last turn's reward, every earlier turn's
    on its last token; a method with a source of its own (GRAPE's rubric) scores each episode's final answer."""
    device = batch.response_ids.device
    if episodes is None or method.reward_source is not None:
        result = score_checked(source, rows, batch.texts, invalid_as_none=cfg.reward.invalid_as_none)
        failed = [ep.error is not None for ep in episodes.episodes] if episodes is not None else [False] * len(rows)
        rewards = torch.tensor([float("nan") if s is None or bad else s for s, bad in zip(result.scores, failed)],
                               device=device)
        if episodes is not None:
            result.metrics.update(episodes.metrics())
            return rewards, rewards, result, lambda mask: None

        def dense_of(mask: torch.Tensor) -> torch.Tensor | None:
            return dense_rewards_for(method.dense_rewards, batch.response_ids, batch.response_mask, tokenizer,
                                     result.token_rewards, mask)

        return rewards, rewards, result, dense_of
    rewards, turns = episodes.dense() if method.dense_rewards else (episodes.returns, None)

    def episode_dense(mask: torch.Tensor) -> torch.Tensor | None:
        return None if turns is None else torch.where(mask, turns, torch.zeros_like(turns))

    metrics = {**episodes.metrics(), "env/return_mean": float("nan")}  # the loop's, over every rank
    return rewards, episodes.returns, RewardResult([], metrics=metrics), episode_dense


def env_notes(episodes: EpisodeBatch, rewards: torch.Tensor, step: int, noted: set[str]) -> list[str]:
    """Lines for the human, each kind once a run: the first environment error, a step with nothing scored."""
    out = []
    failed = [ep.error for ep in episodes.episodes if ep.error]
    if failed and "error" not in noted:  # counted every step in env/errors
        out.append(f"env: {len(failed)} episode(s) unscored at step {step + 1}; the first: {failed[0]}")
        noted.add("error")
    if not torch.isfinite(rewards).any() and "unscored" not in noted:
        out.append(f"env: every episode of step {step + 1} is unscored (errors, truncated with no reward, or no "
                   "verdict): nothing trains")
        noted.add("unscored")
    return out


def rollout_metrics(batch: RolloutBatch, rewards: torch.Tensor, G: int, pass_threshold: float,
                    world: World = World()) -> dict[str, float]:
    """Rewards, pass rate, unscored and zero-variance group counts, lengths and the engine's figures; on
    several ranks over the whole step (``rewards``: every rank's, in global order) with the engine's figures
    reduced (:func:`rlmt.train.metrics.reduce_across`)."""
    if world.size > 1:
        lengths = torch.cat(world.all_gather_object(batch.response_lengths.cpu()))
        own = _rollout_metrics(batch, rewards, G, pass_threshold)
        shared = {k: v for k, v in own.items() if not k.startswith(("reward/", "pass_rate", "groups/"))}
        out = {**own, **reduce_across(world, shared), "response_length/mean": float(lengths.float().mean())}
        out["rollout/tokens_per_s"] = out["rollout/tokens"] / max(out["rollout/seconds"], 1e-9)
        return out
    return _rollout_metrics(batch, rewards, G, pass_threshold)


def _rollout_metrics(batch: RolloutBatch, rewards: torch.Tensor, G: int, pass_threshold: float) -> dict[str, float]:
    valid = torch.isfinite(rewards)
    r_ok, groups = rewards[valid], rewards.reshape(-1, G)
    return {
        "reward/mean": float(r_ok.mean()) if valid.any() else float("nan"),
        "reward/std": float(r_ok.std()) if valid.sum() > 1 else 0.0,
        "pass_rate": float((r_ok >= pass_threshold).float().mean()) if valid.any() else 0.0,
        "reward/unscored": float((~valid).sum()),
        "groups/zero_variance": float(((groups.nan_to_num(-1e9).amax(-1) - groups.nan_to_num(1e9).amin(-1)) == 0).sum()),
        "response_length/mean": float(batch.response_lengths.float().mean()),
        **{k: v for k, v in batch.stats.items() if k != "rollout/decode_steps"},
        "train/sequence_tokens": float(batch.attention_mask.sum()),
        # what the packed training pass computes: each prompt once, then its responses
        "train/packed_tokens": float(batch.attention_mask[::G, :batch.prompt_len].sum()
                                     + batch.attention_mask[:, batch.prompt_len:].sum()),
    }


def train_online(cfg: Config, method: OnlineMethod, world: World = World()) -> Path:
    """Run ``method`` as configured; returns the run directory.

    On N ranks (``world``) each step's prompts are drawn as on one process and split into N contiguous blocks
    of whole prompt groups (:func:`rlmt.parallel.shard_groups`); each rank samples, scores and computes the
    reference for its groups, with every sample's randomness keyed by (seed, step, global prompt index,
    sample index) (:func:`rlmt.rollout.sample_keys`), so the samples do not depend on N. The update sums the
    gradients across ranks (:func:`rlmt.train.update.accumulate`); the rewards are gathered for the curriculum
    and the metrics; rank 0 writes records, checkpoints, ``final/`` and the evaluations."""
    # before the model loads: the reward source and its args (or the environment and its tools), the data and
    # the fields the source reads
    env_run = bool(cfg.env.source)
    scores_episodes = env_run and method.reward_source is not None  # GRAPE: its rubric scores each episode
    if env_run:
        check_environment(cfg, method)
    if not env_run or scores_episodes:
        check_reward_source(cfg, method.reward_source)
    report = load_rows(cfg.data.train, "prompt", cfg.data.on_invalid, cfg.data.limit,
                       SourceOptions.of(cfg.data))
    rows = report.rows if env_run and not scores_episodes else check_reward_fields(cfg, report.rows, report,
                                                                                  method.reward_source)
    rows = check_env_fields(cfg, rows, report) if env_run else rows
    if cfg.run.eval_before_after and cfg.data.eval:  # evaluation scores every row it reads
        held = load_rows(cfg.data.eval, "prompt", cfg.data.on_invalid, cfg.eval.max_prompts,
                         SourceOptions.of(cfg.data, "eval"))
        if not env_run or scores_episodes:
            check_reward_fields(cfg, held.rows, held, method.reward_source, on_invalid="error")
        if env_run:
            check_env_fields(cfg, held.rows, held, on_invalid="error")
    ckpt, record = world.on_main(lambda: resume_checkpoint(cfg)), run_record(cfg)  # verified, config compared
    run_dir, lm, fmt = start_run(cfg)
    policy, tok = lm.model, lm.tokenizer
    source = None if env_run and not scores_episodes else reward_source_for(cfg, method.reward_source)
    rows = source.prepare_rows(rows) if hasattr(source, "prepare_rows") else rows
    if env_run:  # rlmt.envs: a fresh environment per episode, the run's tools, token-in token-out turns
        make_env, renderer, env_stop = env_parts(cfg, tok, fmt)
    rows = check_prompt_lengths(rows, tok, fmt, cfg.data.max_prompt_tokens, cfg.data.on_invalid, report)
    report.require(len(rows))
    pg, G = cfg.pg, cfg.rollout.num_samples
    plan = (method.plan or policy_gradient_plan)(cfg, len(rows))
    check_divisible(plan.prompts_per_step, world.size,
                    "prompts per step (rollout.batch_prompts; rejection sampling: rejection.prompts_per_round)")
    reference = frozen_reference(lm, cfg.model.dtype) if method.kl_regularized and pg.beta > 0 else None
    critic = method.critic(policy) if method.critic else None
    # rank 0's weights everywhere; model.parallel=fsdp: sharded after the reference's copy, before the optimizer
    sharded = shard_model(cfg, lm, world, [policy] + ([critic] if critic is not None else []), ckpt)
    if sharded and reference is not None and reference.copy is not None:  # its passes: one per group, every rank
        shard_layers(reference.copy, world, lm.autocast, cfg.model.fsdp_cpu_offload)
        reference = Reference(reference.policy, reference.copy, None, reference.autocast)  # no file pages now
    trainable = torch.nn.ModuleList([policy] + ([critic] if critic is not None else []))
    critic_lr = [(critic, cfg.ppo.critic_lr)] if critic is not None and cfg.ppo.critic_lr is not None else []
    opt, sched = build_optimizer(trainable, cfg.optim, plan.optimizer_steps,
                                 preallocate=method.steps_optimizer and not sharded, group_lrs=critic_lr)
    extras = {"critic": critic} if critic is not None else None
    state = (load_checkpoint(ckpt, policy, opt, sched, extras, trainable, world.rank) if ckpt
             else {"step": 0, "update": {}})
    rec = recorder(world, run_dir, cfg, state["step"] if ckpt else None, plan.steps)
    if report.skipped:
        rec.note(f"data: {len(rows)} prompts; filtered/adjusted: {report.skipped}")
    evaluating = cfg.run.eval_before_after and cfg.data.eval
    if evaluating and not ckpt:
        _evaluate(cfg, lm, fmt, "before", run_dir, method.reward_source, rec, world)
    params = SamplingParams(G, cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_new_tokens,
                            tuple(cfg.rollout.stop))
    device = next(policy.parameters()).device
    train_t = cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0
    base_demos = load_demonstrations(cfg, tok, fmt, source)
    ctx = UpdateContext(policy, critic, trainable, opt, sched, cfg, dict(state.get("update", {})), base_demos, method,
                        lm.autocast, world)
    revise = method.revises and cfg.grape.revise  # GRAPE critique-revise (rlmt.train.revise)
    if revise:
        from rlmt.train.revise import revise_step, revision_demonstrations

        ctx.demos = revision_demonstrations(ctx.state, base_demos)
    prompts = PromptSampler(cfg, len(rows), state.get("pass_rates"))
    save = partial(save_on_main, world, run_dir, model=policy, optimizer=opt, scheduler=sched,
                   keep=cfg.run.keep_checkpoints, extras=extras, record=record, trainable=trainable, tokenizer=tok)
    rec.start_steps()
    noted: set[str] = set()  # the environment notes shown once a run
    rounds_bar = cfg.algorithm == "rejection_sampling" and cfg.run.progress  # a round samples many prompts
    for step in range(state["step"], plan.steps):
        t_step = time.perf_counter()
        idx = prompts.draw(step, plan.prompts_per_step)  # the global step's prompts, the same on every rank
        mine = shard_groups(len(idx), world.rank, world.size)  # this rank's positions in the step
        step_rows = [rows[idx[j]] for j in mine]
        with gathered(policy):  # model.parallel=fsdp: whole layers while each rank samples at its own pace
            if env_run:
                episodes = run_episodes(policy, tok, renderer, make_env, [r.data for r in step_rows],
                                        [env_seed(cfg.run.seed, step, j) for j in mine], params,
                                        sample_keys(cfg.run.seed, step, mine, G), cfg.env.max_turns,
                                        cfg.env.max_total_tokens, cfg.rollout.batch_prompts, lm.autocast, env_stop,
                                        cfg.env.step_workers)
                batch = episodes.batch
            else:
                batch = rollout(policy, tok, fmt, step_rows, params, None, cfg.rollout.batch_prompts, lm.autocast,
                                sample_keys(cfg.run.seed, step, mine, G),
                                f"round {step + 1} sampling" if rounds_bar and world.is_main else None)
        rep_rows = [step_rows[int(i)].data for i in batch.prompt_index]
        rewards, returns, scored, dense_of = score_rollout(cfg, method, source, rep_rows, batch,
                                                           episodes if env_run else None, tok)
        for note in env_notes(episodes, rewards, step, noted) if env_run else ():
            rec.note(note)
        step_rewards = returns if world.size == 1 else torch.cat(world.all_gather_object(returns.cpu())).to(device)
        mask = batch.response_mask & torch.isfinite(rewards)[:, None]
        t_ref = time.perf_counter()
        ref_lp = reference_logprobs(reference, batch, G, train_t) if reference is not None else None
        dense = dense_of(mask)
        with gathered(policy):
            revised = (revise_step(ctx, base_demos, tok, fmt, rep_rows, batch, scored, source, params,
                                   (cfg.run.seed, step, mine.start)) if revise else {})
        t_update = time.perf_counter()
        exp = Experience(batch, rewards, mask, ref_lp, G, train_t, dense, step, mine.start)
        metrics = {**update_step(ctx, exp), **revised}
        # phases of the step: reference pass (with dense rewards / revisions when configured), then the update
        metrics.update({"time/reference_s": t_update - t_ref, "time/update_s": time.perf_counter() - t_update})
        metrics.update(prompts.observe(idx, step_rewards, G))
        metrics.update({**rollout_metrics(batch, step_rewards, G, cfg.reward.pass_threshold, world),
                        "time/step_s": time.perf_counter() - t_step, **reduce_across(world, scored.metrics)})
        if "env/return_mean" in metrics and not scores_episodes:  # over every rank's episodes
            ok = torch.isfinite(step_rewards)
            metrics["env/return_mean"] = float(step_rewards[ok].mean()) if ok.any() else float("nan")
        rec.log(step + 1, metrics)
        if cfg.run.save_every and (step + 1) % cfg.run.save_every == 0 and step + 1 < plan.steps:
            save(step + 1, {"update": ctx.state, "pass_rates": prompts.pass_rates.tolist()})
    save(plan.steps, {"update": ctx.state, "pass_rates": prompts.pass_rates.tolist()})
    full = full_state_dict(policy) if sharded else None  # model.parallel=fsdp: gathered to rank 0
    shares = world.all_gather_object(source.records()) if world.size > 1 and hasattr(source, "records") else []
    with gathered(policy):
        if world.is_main:
            save_final(policy, tok, run_dir, full)
            for share in shares[1:]:  # the other ranks' oversight totals and critic counters (GRAPE)
                source.absorb(share)
            if hasattr(source, "finish"):
                source.finish(run_dir)
        world.wait()
    if evaluating:
        _evaluate(cfg, lm, fmt, "after", run_dir, method.reward_source, rec, world)
    rec.close()
    return run_dir


def check_environment(cfg: Config, method: OnlineMethod) -> None:
    """The checks of an environment run that need no model: the method takes episodes, the environment and its
    arguments, and the tools (:func:`rlmt.envs.env_factory`)."""
    from rlmt.config import ConfigError
    from rlmt.envs import env_factory, toolbox_for

    if not method.episodes:
        takes = [name for name, m in METHODS.items() if m.episodes]
        raise ConfigError(f"env.source: multi-turn environments train with {takes}, not {cfg.algorithm!r}")
    if cfg.pg.nll_coef > 0:
        raise ConfigError("pg.nll_coef: demonstrations are not mixed into environment runs (env.source is set)")
    if method.revises and cfg.grape.revise:
        raise ConfigError("grape.revise: critique-revise rewrites single responses, not episodes (env.source is set)")
    for key, value in (("env.max_turns", cfg.env.max_turns), ("env.max_total_tokens", cfg.env.max_total_tokens),
                       ("env.step_workers", cfg.env.step_workers)):
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    env_factory(cfg, toolbox_for(cfg))  # the environment, its arguments, turns and group size, the tools


def _evaluate(cfg: Config, lm, fmt, tag: str, run_dir: Path, reward_source: str | None, rec, world: World) -> None:
    """The before/after evaluation (:func:`rlmt.evaluate.evaluate_run`), run and written by rank 0 while the
    other ranks wait."""
    with gathered(lm.model):
        if world.is_main:
            out = (evaluate_env_run(cfg, lm, fmt, tag, run_dir, reward_source) if cfg.env.source
                   else evaluate_run(cfg, lm, fmt, tag, run_dir, reward_source))
            rec.evaluation(tag, {k: out[k] for k in ("pass@1", "reward/mean")},
                           f"pass@1 {out['pass@1']:.3f}  reward/mean {out['reward/mean']:.3f}")
        world.wait()
