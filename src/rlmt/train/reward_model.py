"""The outcome reward model (RLHF stage 2): a scalar head on a causal-LM trunk, trained with Bradley-Terry.

    r(x, y) = w^T h_last(x, y)          h_last: the trunk's final hidden state (H,) at the last token of
                                        prompt + completion (the completion ends with the end-of-turn token)
    loss    = sum_pairs -log sigmoid(r(x, y_w) - r(x, y_l)) / N_step

A task of the offline loop: a step takes ``batch_size * grad_accum`` pairs (a pure function of (seed, step));
the chosen and rejected completions of a micro-batch run as one batch of 2B rows; each micro-batch's loss is
its pairs' sum divided by the step's pair count, so accumulation does not change the gradient. Checkpoints
hold the trunk and, as an extra module, the head (``reward_head.pt``), so resume is exact.

``final/`` holds the trunk (``AutoModelForCausalLM``-loadable, its tokenizer with it), ``reward_head.pt`` and
``reward_model.json`` (hidden size, the prompt format used in training, and with ``rm.normalize`` the mean
and std of the final model's scores over every train completion, chosen and rejected, so a reward source can
return z-scores). :func:`load_reward_model` reads it back.

Held-out pairwise accuracy (share of data.eval pairs with r_w > r_l; ties count as wrong) goes to
``eval-before.json`` (with ``run.eval_before_after``) and ``eval-after.json``, as in DPO.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import Tensor

from rlmt.config import Config
from rlmt.data import PreferencePair, PromptFormat, collate_pairs
from rlmt.models import LoadedModel, RewardHead
from rlmt.models.reward_model import HEAD_FILE, RewardModel, save_reward_model
from rlmt.objectives.preference import bradley_terry_loss
from rlmt.train.dpo import tokenize_pairs
from rlmt.train.offline import OfflineModules, OfflineRun, OfflineTask, chunks, offline_update

HEAD_MODULE = "reward_head"  # its name among a checkpoint's extra modules


# -------------------------------------------------------------------------------------------- the math


def bradley_terry_micro_loss(rm: RewardModel, pad_id: int, device, pairs: list[PreferencePair],
                              normalizer: float) -> tuple[Tensor, dict[str, float], float]:
    """A micro-batch of b pairs: its Bradley-Terry sum over the step's ``normalizer`` pairs, the
    :func:`bradley_terry_loss` metrics and its weight b."""
    b = len(pairs)
    batch = collate_pairs(pairs, pad_id).to(device)
    r = rm(batch.input_ids, batch.attention_mask)  # (2b,): chosen rows, then rejected rows
    loss, metrics = bradley_terry_loss(r[:b], r[b:], normalizer=normalizer)
    return loss, metrics, float(b)


def pairs_in(micro_batches: list[list[PreferencePair]]) -> float:
    """N_step: the pairs of all ``micro_batches``."""
    return float(sum(len(pairs) for pairs in micro_batches))


def rm_update(rm: RewardModel, micro_batches: list[list[PreferencePair]], optimizer, scheduler,
              max_grad_norm: float, pad_id: int, device) -> dict[str, float]:
    """One optimizer step of Bradley-Terry over micro-batches of pairs; the loss metrics over the step."""
    return offline_update(rm, micro_batches, pairs_in(micro_batches),
                          partial(bradley_terry_micro_loss, rm, pad_id, device), optimizer, scheduler, max_grad_norm,
                          "pairs")


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


# ------------------------------------------------------------------------------------------ the task


def _modules(lm: LoadedModel, fmt: PromptFormat) -> OfflineModules:
    device = next(lm.model.parameters()).device
    rm = RewardModel(lm.model, RewardHead(lm.model.config.hidden_size).to(device), lm.tokenizer, fmt)
    return OfflineModules(rm.trunk, rm, {HEAD_MODULE: rm.head})


def _loss(run: OfflineRun, pairs: list[PreferencePair], normalizer: float):
    return bradley_terry_micro_loss(run.modules.trainable, run.pad_id, run.device, pairs, normalizer)


def _evaluate(run: OfflineRun, held: list[PreferencePair]) -> dict[str, float]:
    return pairwise_accuracy(pair_scores(run.modules.trainable, held, run.cfg.optim.batch_size, run.pad_id,
                                         run.device))


def _save_final(run: OfflineRun, pairs: list[PreferencePair], note) -> None:
    """``final/``: the trunk, the head and ``reward_model.json``, with ``rm.normalize`` the train scores' stats."""
    rm, cfg, fmt = run.modules.trainable, run.cfg, run.fmt
    meta = {"hidden_size": rm.trunk.config.hidden_size, "head": HEAD_FILE, "chat": fmt.chat,
            "system_prompt": fmt.system_prompt, "max_completion_tokens": cfg.data.max_completion_tokens,
            "train_pairs": len(pairs)}
    if cfg.rm.normalize:
        mean, std = score_stats(pair_scores(rm, pairs, cfg.optim.batch_size, run.pad_id, run.device))
        meta.update(score_mean=mean, score_std=std)
        note(f"train scores: mean {mean:.4g}, std {std:.4g} (stored for z-scores)")
    save_reward_model(rm, run.lm.tokenizer, run.run_dir, meta, run.final_state)


REWARD_MODEL = OfflineTask(
    data_kind="preference", unit="pairs", count="pairs",
    tokenize=tokenize_pairs,
    modules=_modules,
    collate=chunks,
    normalizer=pairs_in,
    loss=_loss,
    evaluate=_evaluate,
    save_final=_save_final,
)

