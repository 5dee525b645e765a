"""DPO and its variants (IPO, cDPO): the offline loop over preference pairs (prompt, chosen, rejected).

The reference is the policy before any update. Its sequence log-probs of every pair are computed once, before
a checkpoint is loaded (so on a resume the weights are still the initial ones), and cached in
RUN_DIR/reference_logps.pt, which a resume reloads instead of recomputing.

A step takes ``batch_size * grad_accum`` pairs (a pure function of (seed, step), as in SFT). The chosen and
rejected completions of a micro-batch share one pass over their prompt (2B response rows attend to the B
prompts' keys and values); each micro-batch's loss is its pairs' sum divided by the step's pair count, so the
accumulated gradient does not depend on the split.
"""

from __future__ import annotations

import json
import os
import time
from functools import partial
from pathlib import Path
from typing import Sequence

import torch

from rlmt.checkpoint import load_checkpoint, save_checkpoint
from rlmt.config import Config, DPOConfig, to_dict
from rlmt.data import (LoadReport, load_rows)
from rlmt.rollout.logprobs import grouped_response_logprobs
from rlmt.objectives.preference import LOSSES, PreferenceLoss, log_ratio_margin
from rlmt.records import RunRecorder, write_atomic
from rlmt.rollout import left_pad
from rlmt.train.optim import build_optimizer, guarded_step
from rlmt.train.session import resume_checkpoint, start_run
from rlmt.models import save_final
from rlmt.train.sft import examples_per_step, step_indices, total_steps_for
from rlmt.data import PreferencePair, tokenize_preference

REFERENCE_FILE = "reference_logps.pt"


def pair_sequence_logprobs(model: torch.nn.Module, pairs: Sequence[PreferencePair], pad_id: int,
                           device) -> torch.Tensor:
    """(b, 2) [chosen, rejected] sums of log pi over each completion's tokens.

    The prompt runs once for both completions (:func:`grouped_response_logprobs` with G = 2, one packed row
    per pair: the same numbers and gradient as two full sequences, at P + 2T tokens instead of 2(P + T)).
    """
    b = len(pairs)
    p_ids, p_mask = left_pad([p.prompt_ids for p in pairs], pad_id)
    responses = [ids for p in pairs for ids in (p.chosen_ids, p.rejected_ids)]  # rows 2i, 2i+1: pair i
    r_ids = torch.full((2 * b, max(len(r) for r in responses)), pad_id, dtype=torch.long)
    r_mask = torch.zeros_like(r_ids)
    for i, r in enumerate(responses):
        r_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        r_mask[i, :len(r)] = 1
    lp = grouped_response_logprobs(model, p_ids.to(device), p_mask.to(device), r_ids.to(device), r_mask.to(device), 2)
    return lp.sum(-1).view(b, 2)


@torch.no_grad()
def pair_logprobs(model: torch.nn.Module, pairs: Sequence[PreferencePair], batch_size: int, pad_id: int,
                  device) -> torch.Tensor:
    """(N, 2) [chosen, rejected] sequence log-probs of ``pairs`` under ``model`` in eval mode, no grad."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        out.append(pair_sequence_logprobs(model, chunk, pad_id, device).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, 2))


def reference_logprobs(run_dir: Path, model: torch.nn.Module, splits: dict[str, list[PreferencePair]],
                       batch_size: int, pad_id: int, device) -> tuple[dict[str, torch.Tensor], bool]:
    """{split: (N, 2)} reference log-probs, loaded from RUN_DIR/reference_logps.pt when it matches the data,
    otherwise computed with ``model`` (which must still hold the initial weights) and saved.
    Returns (log-probs, whether they were loaded)."""
    path = run_dir / REFERENCE_FILE
    if path.exists():
        cached = torch.load(path, map_location="cpu")
        if set(cached) == set(splits) and all(cached[k].shape == (len(v), 2) for k, v in splits.items()):
            return cached, True
    ref = {k: pair_logprobs(model, v, batch_size, pad_id, device) for k, v in splits.items()}
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(ref, tmp)
    os.replace(tmp, path)
    return ref, False


def preference_loss(cfg: DPOConfig) -> PreferenceLoss:
    """The configured loss with its hyperparameters bound: ``f(pc, pr, rc, rr, normalizer=...)``."""
    extra = {"label_smoothing": cfg.label_smoothing} if cfg.loss == "cdpo" else {}
    return partial(LOSSES[cfg.loss], beta=cfg.beta, **extra)


def dpo_update(model: torch.nn.Module, micro_batches: list[tuple[list[PreferencePair], torch.Tensor]],
               loss_fn: PreferenceLoss, optimizer, scheduler, max_grad_norm: float, pad_id: int,
               device) -> dict[str, float]:
    """One optimizer step over micro-batches of (pairs, reference (b, 2)); metrics over the whole step."""
    t0 = time.perf_counter()
    n_pairs = sum(len(pairs) for pairs, _ in micro_batches)
    model.train()
    policy = []
    for pairs, ref in micro_batches:
        seq = pair_sequence_logprobs(model, pairs, pad_id, device)  # (b, 2)
        ref = ref.to(device=seq.device, dtype=seq.dtype)
        loss, _ = loss_fn(seq[:, 0], seq[:, 1], ref[:, 0], ref[:, 1], normalizer=n_pairs)
        loss.backward()
        policy.append(seq.detach())
    pol, ref = torch.cat(policy), torch.cat([r.to(policy[0].device, policy[0].dtype) for _, r in micro_batches])
    _, metrics = loss_fn(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1])
    return {**metrics, **guarded_step(model, optimizer, scheduler, max_grad_norm), "pairs": float(n_pairs),
            "time/step_s": time.perf_counter() - t0}


def preference_accuracy(model: torch.nn.Module, pairs: list[PreferencePair], ref: torch.Tensor, beta: float,
                        batch_size: int, pad_id: int, device) -> dict[str, float]:
    """Held-out preference figures of ``model``.

    ``preference_accuracy``: share of pairs whose implicit reward margin h is > 0 (ties, e.g. before training
    where policy = reference, count as wrong). ``likelihood_accuracy``: share of pairs where the model itself
    gives the chosen completion the higher log-probability, summed (``likelihood_accuracy``) or per token
    (``likelihood_accuracy_per_token``): the base model's own preference, meaningful before training too.
    """
    pol = pair_logprobs(model, pairs, batch_size, pad_id, device)
    h = log_ratio_margin(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1])  # (N,)
    lengths = torch.tensor([[len(p.chosen_ids), len(p.rejected_ids)] for p in pairs], dtype=pol.dtype,
                           device=pol.device)  # (N, 2)
    per_token = pol / lengths.clamp_min(1)
    return {"preference_accuracy": float((h > 0).float().mean()), "rewards/margin": float(beta * h.mean()),
            "likelihood_accuracy": float((pol[:, 0] > pol[:, 1]).float().mean()),
            "likelihood_accuracy_per_token": float((per_token[:, 0] > per_token[:, 1]).float().mean()),
            "pairs": float(len(pairs))}


def _load_pairs(cfg: Config, path: str, lm, fmt, limit: int) -> tuple[list[PreferencePair], LoadReport]:
    report = load_rows(path, "preference", cfg.data.on_invalid, limit)
    pairs = tokenize_preference(report.rows, lm.tokenizer, fmt, cfg.data.max_prompt_tokens,
                                cfg.data.max_completion_tokens, cfg.data.on_invalid, report)
    return pairs, report


def train_dpo(cfg: Config) -> Path:
    run_dir, lm, fmt = start_run(cfg)
    pad_id = lm.tokenizer.pad_token_id
    device = next(lm.model.parameters()).device
    pairs, report = _load_pairs(cfg, cfg.data.train, lm, fmt, cfg.data.limit)
    splits = {"train": pairs}
    if cfg.data.eval:
        splits["eval"] = _load_pairs(cfg, cfg.data.eval, lm, fmt, cfg.eval.max_prompts)[0]
    total = total_steps_for(cfg, len(pairs))
    opt, sched = build_optimizer(lm.model, cfg.optim, total)
    ckpt = resume_checkpoint(cfg)
    ref, reloaded = reference_logprobs(run_dir, lm.model, splits, cfg.optim.batch_size, pad_id, device)
    start = load_checkpoint(ckpt, lm.model, opt, sched)["step"] if ckpt else 0
    rec = RunRecorder(run_dir, to_dict(cfg), start if ckpt else None, cfg.run.tensorboard, cfg.run.log_every,
                      total, cfg.run.progress)
    rec.note(f"reference log-probs {'reloaded from' if reloaded else 'computed, saved to'} {run_dir / REFERENCE_FILE}")
    if report.skipped:
        rec.note(f"data: {len(pairs)} pairs; filtered/adjusted: {report.skipped}")
    accuracy = partial(preference_accuracy, beta=cfg.dpo.beta, batch_size=cfg.optim.batch_size, pad_id=pad_id,
                       device=device)
    if cfg.run.eval_before_after and "eval" in splits and not ckpt:
        before = accuracy(lm.model, splits["eval"], ref["eval"])
        write_atomic(run_dir / "eval-before.json", json.dumps(before, indent=1))
        rec.note(f"eval before: {json.dumps(before)}")
    loss_fn = preference_loss(cfg.dpo)
    per_step = examples_per_step(cfg)
    bs = cfg.optim.batch_size
    for step in range(start, total):
        idx = step_indices(step, per_step, len(pairs), cfg.run.seed, cfg.data.shuffle)
        mbs = [([pairs[i] for i in idx[j:j + bs]], ref["train"][idx[j:j + bs]]) for j in range(0, len(idx), bs)]
        metrics = dpo_update(lm.model, mbs, loss_fn, opt, sched, cfg.optim.max_grad_norm, pad_id, device)
        rec.log(step + 1, {**metrics, "epoch": (step + 1) * per_step / len(pairs)})
        if cfg.run.save_every and (step + 1) % cfg.run.save_every == 0 and step + 1 < total:
            save_checkpoint(run_dir, step + 1, lm.model, opt, sched, {"pairs_seen": (step + 1) * per_step},
                            cfg.run.keep_checkpoints)
    save_checkpoint(run_dir, total, lm.model, opt, sched, {"pairs_seen": total * per_step}, cfg.run.keep_checkpoints)
    save_final(lm.model, lm.tokenizer, run_dir)
    if "eval" in splits:
        after = accuracy(lm.model, splits["eval"], ref["eval"])
        write_atomic(run_dir / "eval-after.json", json.dumps(after, indent=1))
        rec.note(f"eval after: {json.dumps(after)}")
    rec.close()
    return run_dir
