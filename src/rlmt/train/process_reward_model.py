"""Process reward model: per-step correctness from step labels, the offline loop (``algorithm: process_reward_model``).

Rows hold ``prompt``, ``steps`` and ``labels`` (one per step, in [0, 1]). The completion is the steps joined
by ``rm.step_separator`` followed by the end-of-turn token. A score head (Linear H -> 1, zero-initialised,
float32) reads the trunk's final hidden state at each step's last token (the state *after* reading it):

    p_k = sigmoid(w^T h_{pos_k} + b),   loss = sum_k BCE(p_k, y_k) / (steps in the optimizer step)

so the accumulated gradient does not depend on how a step is split into micro-batches. The trunk is the
configured model (all weights, or LoRA adapters) and trains with the head.

Held-out numbers (``eval-before.json``, ``eval-after.json``): ``step_accuracy`` (p_k on the label's side of
0.5; ties count as wrong), ``outcome_accuracy`` (the ``rm.step_aggregate`` of a row's scores against its
minimum label: a solution is correct when every step is), ``step_loss``. ``final/`` holds the trunk,
``process_head.pt`` and ``process_reward_model.json`` (separator, aggregate, prompt format), which
:class:`rlmt.rewards.process_reward_model.ProcessRewardModelReward` loads. ``rm.normalize`` does not apply:
step scores are probabilities.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from rlmt.checkpoint import load_checkpoint, save_checkpoint
from rlmt.config import Config, to_dict
from rlmt.data import LoadReport, load_rows
from rlmt.objectives.process import agreement, aggregate_steps, process_step_loss
from rlmt.records import RunRecorder, write_atomic
from rlmt.train.optim import build_optimizer, guarded_step
from rlmt.train.session import resume_checkpoint, start_run
from rlmt.models import save_final
from rlmt.train.sft import examples_per_step, step_indices, total_steps_for
from rlmt.data import StepBatch, StepExample, collate_steps, tokenize_steps
from rlmt.models import ProcessHead
from rlmt.models.process_reward_model import save_process_head, step_logits, step_scores


def process_update(model: nn.Module, head: nn.Module, trainable: nn.Module, micro_batches: list[StepBatch],
                   optimizer, scheduler, max_grad_norm: float, device) -> dict[str, float]:
    """One optimizer step: each micro-batch's BCE sum over the step's total step count, accumulated."""
    t0 = time.perf_counter()
    n_steps = sum(int(mb.mask.sum()) for mb in micro_batches)
    trainable.train()
    loss_sum, correct = 0.0, 0.0
    for mb in micro_batches:
        mb = mb.to(device)
        loss, met = process_step_loss(step_logits(model, head, mb), mb.labels, mb.mask, normalizer=n_steps)
        loss.backward()
        loss_sum += met["step_loss"]
        correct += met["step_accuracy"] * float(mb.mask.sum())
    return {"loss": loss_sum, "step_accuracy": correct / max(n_steps, 1), "steps": float(n_steps),
            **guarded_step(trainable, optimizer, scheduler, max_grad_norm), "time/step_s": time.perf_counter() - t0}


def process_accuracy(model: nn.Module, head: nn.Module, examples: Sequence[StepExample], aggregate: str,
                     batch_size: int, pad_id: int, device) -> dict[str, float]:
    """Held-out ``step_accuracy``, ``outcome_accuracy`` (aggregate vs. min label), ``step_loss``, counts."""
    scores = step_scores(model, head, examples, batch_size, pad_id, device)
    S = max(len(e.labels) for e in examples)
    p = torch.full((len(examples), S), 0.5)
    y = torch.zeros((len(examples), S))
    m = torch.zeros((len(examples), S), dtype=torch.bool)
    for i, (e, s) in enumerate(zip(examples, scores)):
        p[i, :len(s)], y[i, :len(s)], m[i, :len(s)] = torch.tensor(s), torch.tensor(e.labels), True
    logit = torch.logit(p.clamp(1e-7, 1 - 1e-7))
    _, met = process_step_loss(logit, y, m)
    outcome = aggregate_steps(p, m, aggregate)
    min_label = torch.where(m, y, torch.ones_like(y)).amin(-1)
    return {"step_accuracy": met["step_accuracy"], "outcome_accuracy": float(agreement(outcome, min_label).mean()),
            "step_loss": met["step_loss"], "steps": float(m.sum()), "rows": float(len(examples))}


def _load(cfg: Config, path: str, lm, fmt, limit: int) -> tuple[list[StepExample], LoadReport]:
    report = load_rows(path, "steps", cfg.data.on_invalid, limit)
    return tokenize_steps(report.rows, lm.tokenizer, fmt, cfg.data.max_prompt_tokens, cfg.data.max_completion_tokens,
                          cfg.rm.step_separator, cfg.data.on_invalid, report), report


def train_process_reward_model(cfg: Config) -> Path:
    run_dir, lm, fmt = start_run(cfg)
    pad_id = lm.tokenizer.pad_token_id
    device = next(lm.model.parameters()).device
    examples, report = _load(cfg, cfg.data.train, lm, fmt, cfg.data.limit)
    held_out = _load(cfg, cfg.data.eval, lm, fmt, cfg.eval.max_prompts)[0] if cfg.data.eval else None
    head = ProcessHead(lm.model.config.hidden_size).to(device)
    trainable = nn.ModuleList([lm.model, head])
    total = total_steps_for(cfg, len(examples))
    opt, sched = build_optimizer(trainable, cfg.optim, total)
    ckpt = resume_checkpoint(cfg)
    extras = {"process_head": head}
    start = load_checkpoint(ckpt, lm.model, opt, sched, extras)["step"] if ckpt else 0
    rec = RunRecorder(run_dir, to_dict(cfg), start if ckpt else None, cfg.run.tensorboard, cfg.run.log_every,
                      total, cfg.run.progress)
    if report.skipped:
        rec.note(f"data: {len(examples)} rows; filtered/adjusted: {report.skipped}")

    def evaluate(tag: str) -> None:
        metrics = process_accuracy(lm.model, head, held_out, cfg.rm.step_aggregate, cfg.optim.batch_size, pad_id,
                                   device)
        write_atomic(run_dir / f"eval-{tag}.json", json.dumps(metrics, indent=1))
        rec.note(f"eval {tag}: {json.dumps(metrics)}")

    if cfg.run.eval_before_after and held_out and not ckpt:
        evaluate("before")
    per_step, bs = examples_per_step(cfg), cfg.optim.batch_size
    for step in range(start, total):
        idx = step_indices(step, per_step, len(examples), cfg.run.seed, cfg.data.shuffle)
        mbs = [collate_steps([examples[i] for i in idx[j:j + bs]], pad_id) for j in range(0, len(idx), bs)]
        metrics = process_update(lm.model, head, trainable, mbs, opt, sched, cfg.optim.max_grad_norm, device)
        rec.log(step + 1, {**metrics, "epoch": (step + 1) * per_step / len(examples)})
        if cfg.run.save_every and (step + 1) % cfg.run.save_every == 0 and step + 1 < total:
            save_checkpoint(run_dir, step + 1, lm.model, opt, sched, {"rows_seen": (step + 1) * per_step},
                            cfg.run.keep_checkpoints, extras)
    save_checkpoint(run_dir, total, lm.model, opt, sched, {"rows_seen": total * per_step}, cfg.run.keep_checkpoints,
                    extras)
    final = save_final(lm.model, lm.tokenizer, run_dir)
    save_process_head(final, head, cfg.rm.step_separator, cfg.rm.step_aggregate, fmt)
    if held_out:
        evaluate("after")
    rec.close()
    return run_dir
