"""DPO and its variants (IPO, cDPO) on preference pairs (prompt, chosen, rejected), a task of the offline loop.

The reference is the policy before any update. Its sequence log-probs of every pair are computed once, before
a checkpoint is loaded (so on a resume the weights are still the initial ones), and cached in
RUN_DIR/reference_logps.pt, which a resume reloads instead of recomputing.

A step takes ``batch_size * grad_accum`` pairs (a pure function of (seed, step)). The chosen and rejected
completions of a micro-batch share one pass over their prompt (2B response rows attend to the B
prompts' keys and values); each micro-batch's loss is its pairs' sum divided by the step's pair count, so the
accumulated gradient does not depend on the split.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from rlmt.config import Config, DPOConfig
from rlmt.data import PreferencePair, tokenize_preference
from rlmt.objectives.preference import LOSSES, PreferenceLoss, log_ratio_margin
from rlmt.rollout import left_pad
from rlmt.rollout.logprobs import grouped_response_logprobs
from rlmt.train.offline import OfflineRun, OfflineTask, chunks, offline_update
from rlmt.train.optim import NONFINITE, nonfinite_count

REFERENCE_FILE = "reference_logps.pt"


def pair_sequence_logprobs(model: torch.nn.Module, pairs: Sequence[PreferencePair], pad_id: int,
                           device, autocast: torch.dtype | None = None) -> torch.Tensor:
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
    lp = grouped_response_logprobs(model, p_ids.to(device), p_mask.to(device), r_ids.to(device), r_mask.to(device), 2,
                                   autocast=autocast)
    return lp.sum(-1).view(b, 2)


@torch.no_grad()
def pair_logprobs(model: torch.nn.Module, pairs: Sequence[PreferencePair], batch_size: int, pad_id: int,
                  device, autocast: torch.dtype | None = None) -> torch.Tensor:
    """(N, 2) [chosen, rejected] sequence log-probs of ``pairs`` under ``model`` in eval mode, no grad."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        out.append(pair_sequence_logprobs(model, chunk, pad_id, device, autocast).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, 2))


def reference_logprobs(run_dir: Path, model: torch.nn.Module, splits: dict[str, list[PreferencePair]],
                       batch_size: int, pad_id: int, device, autocast: torch.dtype | None = None,
                       ) -> tuple[dict[str, torch.Tensor], bool]:
    """{split: (N, 2)} reference log-probs, loaded from RUN_DIR/reference_logps.pt when it matches the data,
    otherwise computed with ``model`` (which must still hold the initial weights) and saved.
    Returns (log-probs, whether they were loaded)."""
    path = run_dir / REFERENCE_FILE
    if path.exists():
        cached = torch.load(path, map_location="cpu")
        if set(cached) == set(splits) and all(cached[k].shape == (len(v), 2) for k, v in splits.items()):
            return cached, True
    ref = {k: pair_logprobs(model, v, batch_size, pad_id, device, autocast) for k, v in splits.items()}
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")  # each rank of a job writes its own, the rename is atomic
    torch.save(ref, tmp)
    os.replace(tmp, path)
    return ref, False


def preference_loss(cfg: DPOConfig) -> PreferenceLoss:
    """The configured loss with its hyperparameters bound: ``f(pc, pr, rc, rr, normalizer=...)``."""
    extra = {"label_smoothing": cfg.label_smoothing} if cfg.loss == "cdpo" else {}
    return partial(LOSSES[cfg.loss], beta=cfg.beta, **extra)


def dpo_micro_loss(model: torch.nn.Module, loss_fn: PreferenceLoss, pad_id: int, device,
                   micro_batch: tuple[list[PreferencePair], Tensor], normalizer: float,
                   autocast: torch.dtype | None = None) -> tuple[Tensor, dict[str, float], float]:
    """A micro-batch of (b pairs, reference (b, 2)): ``loss_fn`` of its pairs over the step's ``normalizer``
    pairs, its metrics and its weight b."""
    pairs, ref = micro_batch
    seq = pair_sequence_logprobs(model, pairs, pad_id, device, autocast)  # (b, 2)
    ref = ref.to(device=seq.device, dtype=seq.dtype)
    loss, metrics = loss_fn(seq[:, 0], seq[:, 1], ref[:, 0], ref[:, 1], normalizer=normalizer)
    # a -inf rejected log-prob gives a zero, finite loss: count the completions (the step guard skips the step)
    return loss, {**metrics, NONFINITE: nonfinite_count(seq, torch.ones_like(seq))}, float(len(pairs))


def pair_count(micro_batches: list[tuple[list[PreferencePair], Tensor]]) -> float:
    """N_step: the pairs of all ``micro_batches``."""
    return float(sum(len(pairs) for pairs, _ in micro_batches))


def dpo_update(model: torch.nn.Module, micro_batches: list[tuple[list[PreferencePair], Tensor]],
               loss_fn: PreferenceLoss, optimizer, scheduler, max_grad_norm: float, pad_id: int,
               device) -> dict[str, float]:
    """One optimizer step over micro-batches of (pairs, reference (b, 2)); the loss metrics over the step."""
    return offline_update(model, micro_batches, pair_count(micro_batches),
                          partial(dpo_micro_loss, model, loss_fn, pad_id, device), optimizer, scheduler,
                          max_grad_norm, "pairs")


def preference_accuracy(model: torch.nn.Module, pairs: list[PreferencePair], ref: torch.Tensor, beta: float,
                        batch_size: int, pad_id: int, device, autocast: torch.dtype | None = None) -> dict[str, float]:
    """Held-out preference figures of ``model``.

    ``preference_accuracy``: share of pairs whose implicit reward margin h is > 0, a tie (h = 0 exactly)
    counting half: before training the policy is the reference, every margin is 0 and the figure is 0.5, the
    chance rate, not 0. ``preference_ties``: the share of tied pairs (1 before training).
    ``likelihood_accuracy``: share of pairs where the model itself gives the chosen completion the higher
    log-probability, summed (``likelihood_accuracy``) or per token (``likelihood_accuracy_per_token``): the
    base model's own preference, meaningful before training too.
    """
    pol = pair_logprobs(model, pairs, batch_size, pad_id, device, autocast)
    h = log_ratio_margin(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1])  # (N,)
    lengths = torch.tensor([[len(p.chosen_ids), len(p.rejected_ids)] for p in pairs], dtype=pol.dtype,
                           device=pol.device)  # (N, 2)
    per_token = pol / lengths.clamp_min(1)
    return {"preference_accuracy": float(((h > 0).float() + 0.5 * (h == 0).float()).mean()),
            "rewards/margin": float(beta * h.mean()),
            "likelihood_accuracy": float((pol[:, 0] > pol[:, 1]).float().mean()),
            "likelihood_accuracy_per_token": float((per_token[:, 0] > per_token[:, 1]).float().mean()),
            "preference_ties": float((h == 0).float().mean()), "pairs": float(len(pairs))}


# ------------------------------------------------------------------------------------------ the task


def tokenize_pairs(cfg: Config, tokenizer, fmt, report) -> list[PreferencePair]:
    return tokenize_preference(report.rows, tokenizer, fmt, cfg.data.max_prompt_tokens,
                               cfg.data.max_completion_tokens, cfg.data.on_invalid, report)


def _with_reference(run: OfflineRun, splits: dict[str, list[PreferencePair]]) -> tuple[dict[str, list], str]:
    """Each split's pairs with their reference log-probs: [(pair, (2,) [chosen, rejected])]."""
    ref, reloaded = reference_logprobs(run.run_dir, run.modules.model, splits, run.cfg.optim.batch_size,
                                       run.pad_id, run.device, run.lm.autocast)
    note = f"reference log-probs {'reloaded from' if reloaded else 'computed, saved to'} {run.run_dir / REFERENCE_FILE}"
    return {k: list(zip(v, ref[k])) for k, v in splits.items()}, note


def _collate(run: OfflineRun, examples: list[tuple[PreferencePair, Tensor]]) -> list[tuple[list, Tensor]]:
    return [([p for p, _ in c], torch.stack([r for _, r in c])) for c in chunks(run, examples)]


def _loss(run: OfflineRun, micro_batch, normalizer: float):
    return dpo_micro_loss(run.modules.model, preference_loss(run.cfg.dpo), run.pad_id, run.device, micro_batch,
                          normalizer, run.lm.autocast)


def _evaluate(run: OfflineRun, held: list[tuple[PreferencePair, Tensor]]) -> dict[str, float]:
    pairs, ref = [p for p, _ in held], torch.stack([r for _, r in held])
    return preference_accuracy(run.modules.model, pairs, ref, run.cfg.dpo.beta, run.cfg.optim.batch_size,
                               run.pad_id, run.device, run.lm.autocast)


DPO = OfflineTask(
    data_kind="preference", unit="pairs", count="pairs",
    tokenize=tokenize_pairs,
    prepare=_with_reference,
    collate=_collate,
    normalizer=pair_count,
    loss=_loss,
    evaluate=_evaluate,
)

