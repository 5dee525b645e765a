"""Supervised fine-tuning: next-token NLL on completion tokens, a task of the offline loop.

The loss of one optimizer step is the per-token mean over *all* completion tokens of the step:

    loss = sum_{examples, t in completion} -log pi(y_t | x, y_<t) / N_step

Each micro-batch contributes its token sum divided by the step's global N_step, so the accumulated gradient
does not depend on how the step is split into micro-batches (batch 1 x accum 8 == batch 8 x accum 1).
``sft.packing`` packs each micro-batch's examples into rows of ``sft.pack_length`` (block-diagonal attention).

The held-out figure (``data.eval`` with SFT rows) is the same quantity over the held-out completions, with its
exponential: ``nll = sum -log pi / N_eval``, ``perplexity = exp(nll)``.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from rlmt.config import Config
from rlmt.data import TokenBatch, make_micro_batches, tokenize_sft
from rlmt.objectives.aggregate import loss_normalizer
from rlmt.objectives.policy import nll_loss
from rlmt.rollout.logprobs import token_logprobs
from rlmt.parallel import World
from rlmt.train.offline import OfflineRun, OfflineTask, offline_update
from rlmt.train.optim import NONFINITE, nonfinite_count


def completion_tokens(micro_batches: list[TokenBatch]) -> float:
    """N_step: the completion tokens of all ``micro_batches``."""
    return float(sum(loss_normalizer(mb.target_mask, "token_mean") for mb in micro_batches))


def completion_nll(model: torch.nn.Module, device, batch: TokenBatch, normalizer: float,
                   autocast: torch.dtype | None = None) -> tuple[Tensor, dict[str, float], float]:
    """A micro-batch's share of the step's NLL: sum over its completion tokens of -log pi / ``normalizer``.

    batch: (B, L) rows; returns (loss, {"loss", "nonfinite_logprobs"}, completion tokens of the batch).
    """
    batch = batch.to(device)
    lp = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.target_mask,
                        position_ids=batch.position_ids, autocast=autocast)  # (B, L)
    loss, _ = nll_loss(lp, batch.target_mask, aggregation="token_mean", normalizer=normalizer)
    return (loss, {"loss": float(loss.detach()), NONFINITE: nonfinite_count(lp, batch.target_mask)},
            float(batch.target_mask.sum()))


def sft_update(model: torch.nn.Module, micro_batches: list[TokenBatch], optimizer, scheduler,
               max_grad_norm: float, device, autocast: torch.dtype | None = None,
               world: World = World()) -> dict[str, float]:
    """One SFT optimizer step over ``micro_batches`` (:func:`rlmt.train.offline.offline_update`); on several
    ranks, this rank's share of the step (the token count is summed over the ranks).

    Returns ``loss`` (the step's per-token NLL), ``tokens`` and the step's diagnostics.
    """
    return offline_update(model, micro_batches, world.sum_scalar(completion_tokens(micro_batches)),
                          partial(completion_nll, model, device, autocast=autocast), optimizer, scheduler,
                          max_grad_norm, "tokens", world)


@torch.no_grad()
def heldout_nll(model: torch.nn.Module, examples: list, batch_size: int, pad_id: int, device,
                autocast: torch.dtype | None = None) -> dict[str, float]:
    """{"nll", "perplexity", "tokens"} of ``examples`` (SFT examples): the per-token NLL of their completions,
    summed over all of them and divided by their completion tokens, in batches of ``batch_size``."""
    was_training = model.training
    model.eval()
    try:
        total, tokens = 0.0, 0.0
        for batch in make_micro_batches(examples, batch_size, pad_id):
            loss, _, n = completion_nll(model, device, batch, 1.0, autocast)  # normalizer 1: the sum
            total, tokens = total + float(loss), tokens + n
    finally:
        model.train(was_training)
    nll = total / max(tokens, 1.0)
    return {"nll": nll, "perplexity": math.exp(min(nll, 700.0)), "tokens": tokens}


def _evaluate(run: OfflineRun, held: list) -> dict[str, float]:
    return heldout_nll(run.modules.model, held, run.cfg.optim.batch_size, run.pad_id, run.device, run.lm.autocast)


def _tokenize(cfg: Config, tokenizer, fmt, report) -> list:
    return tokenize_sft(report.rows, tokenizer, fmt, cfg.data.max_prompt_tokens, cfg.data.max_completion_tokens,
                        cfg.data.on_invalid, report)


def _collate(run: OfflineRun, examples: list) -> list[TokenBatch]:
    return make_micro_batches(examples, run.cfg.optim.batch_size, run.pad_id, run.cfg.sft.packing,
                              run.cfg.sft.pack_length)


SFT = OfflineTask(
    data_kind="sft", unit="examples", count="tokens",
    tokenize=_tokenize,
    collate=_collate,
    normalizer=completion_tokens,
    loss=lambda run, batch, n: completion_nll(run.modules.model, run.device, batch, n, run.lm.autocast),
    evaluate=_evaluate,
)

