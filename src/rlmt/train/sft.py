"""Supervised fine-tuning: next-token NLL on completion tokens, the offline loop.

The loss of one optimizer step is the per-token mean over *all* completion tokens of the step:

    loss = sum_{examples, t in completion} -log pi(y_t | x, y_<t) / N_step

Each micro-batch contributes its token sum divided by the step's global N_step, so the accumulated gradient
does not depend on how the step is split into micro-batches (batch 1 x accum 8 == batch 8 x accum 1).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from rlmt.config import Config
from rlmt.rollout.logprobs import token_logprobs
from rlmt.objectives.aggregate import loss_normalizer
from rlmt.objectives.policy import nll_loss
from rlmt.train.optim import guarded_step
from rlmt.data import TokenBatch


def sft_update(model: torch.nn.Module, micro_batches: list[TokenBatch], optimizer, scheduler,
               max_grad_norm: float, device, weights: list[torch.Tensor] | None = None) -> dict[str, float]:
    """One optimizer step over ``micro_batches``: accumulate, then clip and apply (or skip if non-finite).

    ``weights`` (one (B,) tensor per micro-batch, optional) weight each example's tokens (return-weighted
    demonstrations). Returns ``loss`` (the step's per-token NLL), ``tokens`` and the step's diagnostics.
    """
    t0 = time.perf_counter()
    normalizer = sum(loss_normalizer(mb.target_mask, "token_mean") for mb in micro_batches)
    total = 0.0
    model.train()
    for i, mb in enumerate(micro_batches):
        mb = mb.to(device)
        lp = token_logprobs(model, mb.input_ids, mb.attention_mask, mb.target_mask, position_ids=mb.position_ids)
        w = None if weights is None else weights[i].to(device)
        loss, _ = nll_loss(lp, mb.target_mask, weights=w, aggregation="token_mean", normalizer=normalizer)
        loss.backward()
        total += float(loss.detach())
    metrics = guarded_step(model, optimizer, scheduler, max_grad_norm)
    loss_value = total if math.isfinite(total) else float("nan")
    return {"loss": loss_value, "tokens": float(normalizer), **metrics, "time/step_s": time.perf_counter() - t0}


def examples_per_step(cfg: Config) -> int:
    return cfg.optim.batch_size * cfg.optim.grad_accum


def step_indices(step: int, per_step: int, n: int, seed: int, shuffle: bool) -> list[int]:
    """Dataset indices of optimizer step ``step``: a seeded permutation per epoch, read in order.

    A pure function of (step, seed), so the data position after a resume is exactly where it was.
    """
    out = []
    start = step * per_step
    for k in range(start, start + per_step):
        epoch, offset = divmod(k, n)
        out.append(int(_epoch_order(n, seed, epoch, shuffle)[offset]))
    return out


_ORDER_CACHE: dict[tuple[int, int, int, bool], torch.Tensor] = {}


def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    key = (n, seed, epoch, shuffle)
    if key not in _ORDER_CACHE:
        if len(_ORDER_CACHE) > 8:
            _ORDER_CACHE.clear()
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        _ORDER_CACHE[key] = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
    return _ORDER_CACHE[key]


def total_steps_for(cfg: Config, n_examples: int, epochs: float | None = None) -> int:
    if cfg.optim.max_steps > 0:
        return cfg.optim.max_steps
    ep = cfg.optim.epochs if epochs is None else epochs
    return max(1, math.ceil(ep * n_examples / examples_per_step(cfg)))


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.run.output_dir)
