"""Rejection sampling on the online loop: each step (a *round*) samples G responses for
``rejection.prompts_per_round`` prompts, keeps the best of each prompt, and fine-tunes on the kept set.

    keep_p = top-k of {i in group p : R_i >= threshold}   (ties keep the earlier sample; dedupe identical texts)
    then ceil(sft_epochs * |kept| / (batch_size * grad_accum)) SFT steps on the kept (prompt, response) pairs

The "advantage" of a response is 1 if kept, else 0 (:func:`kept_responses`); the update is SFT on the kept
set (:func:`sft_on_kept`), its data order a pure function of (seed, round). The kept set of round r is also
written to ``RUN_DIR/rounds/round-r.jsonl`` (token ids, text, reward) as a record.

On several ranks each rank keeps from its own prompt groups; the kept sets are gathered in rank order (the
order of the groups, so the round's kept list is the one-process list) and each SFT step's examples are
split across the ranks like any offline step's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from rlmt.data import SFTExample, make_micro_batches
from rlmt.parallel import shard_rows
from rlmt.records import progress_bar, write_atomic
from rlmt.train.experience import Advantages, Experience, UpdateContext
from rlmt.train.metrics import MetricReduction
from rlmt.data import step_indices
from rlmt.train.offline import examples_per_step
from rlmt.train.sft import sft_update


def select_kept(scores: list[float | None], texts: list[str], num_samples: int, keep_top_k: int,
                threshold: float | None, dedupe: bool) -> list[int]:
    """Indices of the responses to keep: per prompt, the best ``keep_top_k`` (0: all) of those scored at or
    above ``threshold``; ties keep the earlier sample; with ``dedupe`` identical texts count once."""
    kept = []
    for p in range(len(scores) // num_samples):
        idx = range(p * num_samples, (p + 1) * num_samples)
        cands = [i for i in idx if scores[i] is not None and (threshold is None or scores[i] >= threshold)]
        cands.sort(key=lambda i: -scores[i])  # stable: ties keep sample order
        seen, chosen = set(), []
        for i in cands:
            if dedupe and texts[i] in seen:
                continue
            seen.add(texts[i])
            chosen.append(i)
        kept += chosen[:keep_top_k] if keep_top_k > 0 else chosen
    return kept


def kept_responses(ctx: UpdateContext, exp: Experience) -> Advantages:
    """(N,) 1.0 for each kept response, 0.0 otherwise (see the module docstring)."""
    rc, texts = ctx.cfg.rejection, exp.batch.texts
    scores = [None if not math.isfinite(float(r)) else float(r) for r in exp.rewards]
    keep = select_kept(scores, texts, exp.group_size, rc.keep_top_k, rc.threshold, rc.dedupe)
    weights = torch.zeros(len(texts))
    weights[keep] = 1.0
    kept_rewards = [scores[i] for i in keep]
    return Advantages(weights, {
        "kept/count": float(len(keep)),
        "kept/reward_mean": sum(kept_rewards) / len(kept_rewards) if kept_rewards else float("nan"),
        "kept/prompts": float(len({i // exp.group_size for i in keep})),
    })


def kept_examples(exp: Experience, keep: list[int]) -> list[SFTExample]:
    """(prompt ids without padding, sampled response ids) of the kept rows."""
    b = exp.batch
    P = b.prompt_len
    out = []
    for i in keep:
        prompt = b.input_ids[i, :P][b.attention_mask[i, :P].bool()].tolist()
        out.append(SFTExample(prompt, b.response_ids[i, :int(b.response_lengths[i])].tolist()))
    return out


def sft_on_kept(ctx: UpdateContext, exp: Experience, adv: Advantages) -> dict[str, float]:
    """SFT on the kept responses: ``rejection.sft_epochs`` passes, ``optim.batch_size * grad_accum`` examples
    a step; metrics are means over the round's SFT steps (``sft/steps`` of them), counted by a bar
    ``round R SFT`` on rank 0 unless ``run.progress`` is false."""
    cfg, r, world = ctx.cfg, exp.step, ctx.world
    keep = [int(i) for i in torch.nonzero(adv.values > 0).flatten()]
    mine = list(zip(kept_examples(exp, keep), [exp.batch.texts[i] for i in keep],
                    [float(exp.rewards[i]) for i in keep]))
    kept = [k for part in world.all_gather_object(mine) for k in part]  # every rank's, in group order
    examples = [e for e, _, _ in kept]
    if world.is_main:
        run_dir = Path(cfg.run.output_dir) / "rounds"
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / f"round-{r}.jsonl", "".join(
            json.dumps({"prompt_ids": e.prompt_ids, "completion_ids": e.completion_ids, "response": text,
                        "reward": reward}) + "\n" for e, text, reward in kept))
    metrics = adv.metrics
    if world.size > 1:  # the kept-set figures over every rank's groups
        rewards = [reward for _, _, reward in kept]
        metrics = {"kept/count": float(len(kept)),
                   "kept/reward_mean": sum(rewards) / len(rewards) if rewards else float("nan"),
                   "kept/prompts": world.sum_scalar(adv.metrics["kept/prompts"])}
    per_step = examples_per_step(cfg)
    n_steps = math.ceil(cfg.rejection.sft_epochs * len(examples) / per_step) if examples else 0
    device = next(ctx.policy.parameters()).device
    pad = ctx.policy.config.pad_token_id if ctx.policy.config.pad_token_id is not None else 0
    reduction = MetricReduction()
    with progress_bar(n_steps, f"round {r + 1} SFT", "step", cfg.run.progress and world.is_main) as bar:
        for s in range(n_steps):
            idx = step_indices(s, per_step, len(examples), cfg.run.seed + r, cfg.data.shuffle)  # the global batch
            mbs = make_micro_batches([examples[i] for i in shard_rows(idx, world.rank, world.size)],
                                     cfg.optim.batch_size, pad)
            reduction.add(sft_update(ctx.policy, mbs, ctx.optimizer, ctx.scheduler, cfg.optim.max_grad_norm,
                                     device, ctx.autocast, world))
            reduction.end_step()
            bar.update(1)
    return {**reduction.result(), **metrics, "sft/steps": float(n_steps)}


def rejection_steps(cfg, n_rows: int) -> tuple[int, int, int]:
    """(prompts per round, rounds, optimizer steps for the LR schedule: the estimate from the kept-set size at
    ``keep_top_k`` per prompt)."""
    per_round = cfg.rejection.prompts_per_round or n_rows
    est_kept = per_round * (cfg.rejection.keep_top_k or cfg.rollout.num_samples)
    per_step = examples_per_step(cfg)
    est = cfg.rejection.rounds * max(1, math.ceil(cfg.rejection.sft_epochs * est_kept / per_step))
    return min(per_round, n_rows), cfg.rejection.rounds, est
