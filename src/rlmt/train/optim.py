"""Optimizer, learning-rate schedule and the guarded optimizer step (clipping, non-finite skip)."""

from __future__ import annotations

import math

import torch

from rlmt.config import OptimConfig


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based): linear warmup, then the decay.

    warmup: (step + 1) / warmup_steps for step < warmup_steps; then constant 1, linear to 0 at
    ``total_steps``, or cosine 0.5 * (1 + cos(pi * progress)).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    # fused: one kernel per step with no full-size temporaries (foreach AdamW allocates several)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                            fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.schedule))
    return opt, sched


def guarded_step(model: torch.nn.Module, optimizer, scheduler, max_grad_norm: float) -> dict[str, float]:
    """Clip and apply the accumulated gradients, unless they are not finite (then skip and report it).

    Returns ``grad_norm`` (before clipping), ``lr`` (used for this step) and ``skipped`` (1.0 if skipped).
    """
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    lr = optimizer.param_groups[0]["lr"]
    skipped = not torch.isfinite(norm)
    if skipped:  # keep the schedule on step count without applying the bad update
        for p in params:
            p.grad = None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return {"grad_norm": float(norm), "lr": lr, "skipped_steps": float(skipped)}
