"""The outcome reward model (RLHF stage 2): a scalar head on a causal-LM trunk, trained with Bradley-Terry.

    r(x, y) = w^T h_last(x, y)          h_last: the trunk's final hidden state (H,) at the last token of
                                        prompt + completion (the completion ends with the end-of-turn token)
    loss    = sum_pairs -log sigmoid(r(x, y_w) - r(x, y_l)) / N_step

The offline loop mirrors DPO's: a step takes ``batch_size * grad_accum`` pairs (a pure function of (seed,
step)); the chosen and rejected completions of a micro-batch run as one batch of 2B rows; each micro-batch's
loss is its pairs' sum divided by the step's pair count, so accumulation does not change the gradient.
Checkpoints hold the trunk and, as an extra module, the head (``reward_head.pt``), so resume is exact.

``final/`` holds the trunk (``AutoModelForCausalLM``-loadable, its tokenizer with it), ``reward_head.pt`` and
``reward_model.json`` (hidden size, the prompt format used in training, and with ``rm.normalize`` the mean
and std of the final model's scores over every train completion, chosen and rejected, so a reward source can
return z-scores). :func:`load_reward_model` reads it back.

Held-out pairwise accuracy (share of data.eval pairs with r_w > r_l; ties count as wrong) goes to
``eval-before.json`` (with ``run.eval_before_after``) and ``eval-after.json``, as in DPO.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from rlmt.checkpoint import load_checkpoint, save_checkpoint
from rlmt.config import Config, to_dict
from rlmt.data import LoadReport, PromptFormat, load_rows
from rlmt.objectives.preference import bradley_terry_loss
from rlmt.records import RunRecorder, write_atomic
from rlmt.data import PreferencePair, collate_pairs, tokenize_preference
from rlmt.train.optim import build_optimizer, guarded_step
from rlmt.train.session import resume_checkpoint, start_run
from rlmt.train.sft import examples_per_step, step_indices, total_steps_for
from rlmt.models import RewardHead
from rlmt.models.reward_model import HEAD_FILE, RewardModel, save_reward_model

HEAD_MODULE = "reward_head"  # its name among a checkpoint's extra modules


# -------------------------------------------------------------------------------------------- the math


def rm_update(rm: RewardModel, micro_batches: list[list[PreferencePair]], optimizer, scheduler,
              max_grad_norm: float, pad_id: int, device) -> dict[str, float]:
    """One optimizer step of Bradley-Terry over micro-batches of pairs; metrics over the whole step."""
    t0 = time.perf_counter()
    n_pairs = sum(len(pairs) for pairs in micro_batches)
    rm.train()
    chosen, rejected = [], []
    for pairs in micro_batches:
        b = len(pairs)
        batch = collate_pairs(pairs, pad_id).to(device)
        r = rm(batch.input_ids, batch.attention_mask)  # (2b,): chosen rows, then rejected rows
        loss, _ = bradley_terry_loss(r[:b], r[b:], normalizer=n_pairs)
        loss.backward()
        chosen.append(r[:b].detach())
        rejected.append(r[b:].detach())
    _, metrics = bradley_terry_loss(torch.cat(chosen), torch.cat(rejected))
    return {**metrics, **guarded_step(rm, optimizer, scheduler, max_grad_norm), "pairs": float(n_pairs),
            "time/step_s": time.perf_counter() - t0}


@torch.no_grad()
def pair_scores(rm: RewardModel, pairs: Sequence[PreferencePair], batch_size: int, pad_id: int,
                device) -> Tensor:
    """(N, 2) [chosen, rejected] raw scores of ``pairs``, eval mode, no grad."""
    was_training = rm.training
    rm.eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        batch = collate_pairs(chunk, pad_id).to(device)
        r = rm(batch.input_ids, batch.attention_mask).cpu()
        out.append(torch.stack([r[:len(chunk)], r[len(chunk):]], -1))
    rm.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, 2))


def pairwise_accuracy(scores: Tensor) -> dict[str, float]:
    """(N, 2) [chosen, rejected] scores -> share with r_w > r_l (ties wrong), mean margin, pair count."""
    d = scores[:, 0] - scores[:, 1]
    return {"pairwise_accuracy": float((d > 0).float().mean()), "margin": float(d.mean()), "pairs": float(len(d))}


def score_stats(scores: Tensor, min_std: float = 1e-6) -> tuple[float, float]:
    """Mean and (population) std of every score in ``scores``; the std is floored at ``min_std``."""
    flat = scores.flatten().double()
    return float(flat.mean()), max(float(flat.std(correction=0)), min_std)


# ---------------------------------------------------------------------------------------- save and load


# ------------------------------------------------------------------------------------------- the loop


def _load_pairs(cfg: Config, path: str, tokenizer, fmt: PromptFormat, limit: int,
                ) -> tuple[list[PreferencePair], LoadReport]:
    report = load_rows(path, "preference", cfg.data.on_invalid, limit)
    return tokenize_preference(report.rows, tokenizer, fmt, cfg.data.max_prompt_tokens,
                               cfg.data.max_completion_tokens, cfg.data.on_invalid, report), report


def train_reward_model(cfg: Config) -> Path:
    run_dir, lm, fmt = start_run(cfg)
    tok, pad_id = lm.tokenizer, lm.tokenizer.pad_token_id
    device = next(lm.model.parameters()).device
    rm = RewardModel(lm.model, RewardHead(lm.model.config.hidden_size).to(device), tok, fmt)
    pairs, report = _load_pairs(cfg, cfg.data.train, tok, fmt, cfg.data.limit)
    held = _load_pairs(cfg, cfg.data.eval, tok, fmt, cfg.eval.max_prompts)[0] if cfg.data.eval else []
    total = total_steps_for(cfg, len(pairs))
    opt, sched = build_optimizer(rm, cfg.optim, total)
    ckpt = resume_checkpoint(cfg)
    extras = {HEAD_MODULE: rm.head}
    start = load_checkpoint(ckpt, rm.trunk, opt, sched, extras)["step"] if ckpt else 0
    rec = RunRecorder(run_dir, to_dict(cfg), start if ckpt else None, cfg.run.tensorboard, cfg.run.log_every,
                      total, cfg.run.progress)
    if report.skipped:
        rec.note(f"data: {len(pairs)} pairs; filtered/adjusted: {report.skipped}")
    bs = cfg.optim.batch_size

    def evaluate(tag: str) -> None:
        metrics = pairwise_accuracy(pair_scores(rm, held, bs, pad_id, device))
        write_atomic(run_dir / f"eval-{tag}.json", json.dumps(metrics, indent=1))
        rec.note(f"eval {tag}: {json.dumps(metrics)}")

    if cfg.run.eval_before_after and held and not ckpt:
        evaluate("before")
    per_step = examples_per_step(cfg)
    for step in range(start, total):
        idx = step_indices(step, per_step, len(pairs), cfg.run.seed, cfg.data.shuffle)
        mbs = [[pairs[i] for i in idx[j:j + bs]] for j in range(0, len(idx), bs)]
        metrics = rm_update(rm, mbs, opt, sched, cfg.optim.max_grad_norm, pad_id, device)
        rec.log(step + 1, {**metrics, "epoch": (step + 1) * per_step / len(pairs)})
        if cfg.run.save_every and (step + 1) % cfg.run.save_every == 0 and step + 1 < total:
            save_checkpoint(run_dir, step + 1, rm.trunk, opt, sched, {"pairs_seen": (step + 1) * per_step},
                            cfg.run.keep_checkpoints, extras)
    save_checkpoint(run_dir, total, rm.trunk, opt, sched, {"pairs_seen": total * per_step},
                    cfg.run.keep_checkpoints, extras)
    meta = {"hidden_size": rm.trunk.config.hidden_size, "head": HEAD_FILE, "chat": fmt.chat,
            "system_prompt": fmt.system_prompt, "max_completion_tokens": cfg.data.max_completion_tokens,
            "train_pairs": len(pairs)}
    if cfg.rm.normalize:
        mean, std = score_stats(pair_scores(rm, pairs, bs, pad_id, device))
        meta.update(score_mean=mean, score_std=std)
        rec.note(f"train scores: mean {mean:.4g}, std {std:.4g} (stored for z-scores)")
    save_reward_model(rm, tok, run_dir, meta)
    if held:
        evaluate("after")
    rec.close()
    return run_dir


