"""Optimizer, learning-rate schedule and the guarded optimizer step (clipping, non-finite skip)."""

from __future__ import annotations

import math
import time
from typing import Sequence

import torch

from rlmt.config import OptimConfig
from rlmt.parallel import World, all_reduce_gradients
from rlmt.parallel.fsdp import clip_grad_norm, is_sharded


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


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, total_steps: int, preallocate: bool = True,
                    group_lrs: Sequence[tuple[torch.nn.Module, float]] = ()):
    """AdamW and its LR schedule over ``model``'s trainable parameters.

    ``group_lrs``: (submodule, peak lr) pairs whose parameters form their own parameter group at that LR
    (PPO's value head at ``ppo.critic_lr``); every group follows the same warmup and decay. ``preallocate=False``
    leaves the moments lazy (for a loop that never steps the optimizer, e.g. TRPO).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    own = {id(p) for sub, _ in group_lrs for p in sub.parameters()}
    groups = [{"params": [p for p in params if id(p) not in own], "lr": cfg.lr}]
    groups += [{"params": [p for p in sub.parameters() if p.requires_grad], "lr": lr} for sub, lr in group_lrs]
    groups = [g for g in groups if g["params"]]
    # fused: one kernel per step with no full-size temporaries (foreach AdamW allocates several)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    from torch.distributed.tensor import DTensor

    # FSDP2's sharded parameters are DTensors beside plain replicated ones: the fused and foreach kernels take
    # one kind per call, so a mixed group steps parameter by parameter
    mixed = any(isinstance(p, DTensor) for p in params)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                            **({"fused": False, "foreach": False} if mixed else {"fused": fused}))
    if preallocate:
        preallocate_adam_state(opt)
    in_backward = StepInBackward(params, opt) if cfg.step_in_backward else None
    sched = Schedule(opt, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.schedule), in_backward)
    return opt, sched


class Schedule(torch.optim.lr_scheduler.LambdaLR):
    """The LR schedule, and (``optim.step_in_backward``) the :class:`StepInBackward` hooks that apply each
    parameter's update during backward, for :func:`guarded_step` to close the step. The hooks are not part
    of the schedule's checkpointed state."""

    def __init__(self, optimizer, lr_lambda, in_backward: "StepInBackward | None" = None):
        self.in_backward = in_backward
        super().__init__(optimizer, lr_lambda)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.pop("in_backward", None)
        return state


def preallocate_adam_state(opt: torch.optim.Optimizer) -> None:
    """Create AdamW's moments now, as views into one flat buffer per (device, dtype), instead of lazily at the
    first step.

    Lazily, ~270 moment tensors are allocated in the middle of the first backward, between activations; when
    those are freed, the allocator's heap keeps the holes between long-lived moments (measured on the DPO
    benchmark: ~800 MB of free-but-resident heap, a quarter of the peak). One large allocation made before any
    activation sits outside the heap (glibc serves it by mmap). The values are AdamW's own initial state
    (zeros, step 0), so the math is unchanged; a checkpoint's ``load_state_dict`` replaces them as usual.
    """
    todo: dict[tuple, list[torch.nn.Parameter]] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            if not opt.state[p]:
                todo.setdefault((p.device, p.dtype, bool(group.get("fused"))), []).append(p)
    for (device, dtype, fused), params in todo.items():
        n = sum(p.numel() for p in params)
        flat = torch.zeros(2 * n, dtype=dtype, device=device)
        offset = 0
        for p in params:
            k = p.numel()
            opt.state[p] = {  # as AdamW._init_group makes them: a float32 step (on the device when fused)
                "step": torch.zeros((), dtype=torch.float32, device=device if fused else "cpu"),
                "exp_avg": flat[offset:offset + k].view_as(p),
                "exp_avg_sq": flat[n + offset:n + offset + k].view_as(p)}
            offset += k


class StepInBackward:
    """``optim.step_in_backward``: each parameter's AdamW update runs inside backward, as soon as its gradient
    is complete (a post-accumulate-grad hook), and the gradient is freed at once, so the whole model's
    gradients never exist together (one model size less peak memory: 513 MB for SmolLM2-135M in float32).

    The update is the optimizer's own (``optimizer.step()`` with only that parameter in the group), so the
    math and the checkpointed optimizer state are those of the ordinary step. What it cannot do, by
    construction: clip the global gradient norm (known only when backward ends; the config refuses
    ``max_grad_norm > 0``) or accumulate several backward passes into one step (the config refuses that too).
    A parameter whose gradient is not finite is not updated (counted; a non-finite loss makes every
    parameter's gradient non-finite, so then nothing is applied), but parameters that finished earlier in
    the same backward have been updated: the skip is per parameter, not per step.
    """

    def __init__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        # by index: loading a checkpoint replaces the group dicts, and the schedule writes the lr into the new ones
        self.group_of = {p: i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        self.sq_norm, self.skipped = 0.0, 0
        for p in params:
            p.register_post_accumulate_grad_hook(self._step)

    def _step(self, p: torch.nn.Parameter) -> None:
        g = p.grad
        sq = float(torch.linalg.vector_norm(g)) ** 2  # a reduction: no gradient-size temporary
        if not math.isfinite(sq):
            self.skipped += 1
            self.sq_norm = float("nan")
        else:
            self.sq_norm += sq
            opt, groups = self.optimizer, self.optimizer.param_groups
            opt.param_groups = [{**groups[self.group_of[p]], "params": [p]}]
            try:
                opt.step()
            finally:
                opt.param_groups = groups
        p.grad = None

    def finish(self, scheduler) -> dict[str, float]:
        """Close the step the hooks applied: the metrics :func:`guarded_step` reports, and the schedule."""
        out = {"grad_norm": math.sqrt(self.sq_norm) if math.isfinite(self.sq_norm) else float("nan"),
               "lr": self.optimizer.param_groups[0]["lr"], "skipped_steps": float(self.skipped > 0),
               "skipped_params": float(self.skipped)}
        self.sq_norm, self.skipped = 0.0, 0
        scheduler.step()
        return out


NONFINITE = "nonfinite_logprobs"
"""The metric a micro-batch loss reports: its tokens (or sequences) whose log-prob is NaN or +-inf."""


def nonfinite_count(logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """Entries of ``logprobs`` under ``mask`` (same shape) that are NaN or +-inf. A -inf log-prob has a finite
    gradient through ``log_softmax``, and under a clipped ratio (``exp(-inf) = 0``) a finite loss too, so
    neither the loss nor the gradient norm shows it: the loops count it and the step guard skips the step."""
    return float((~torch.isfinite(logprobs.detach()) & mask.bool()).sum())


def guarded_step(model: torch.nn.Module, optimizer, scheduler, max_grad_norm: float,
                 finite: bool = True, world: World | None = None) -> dict[str, float]:
    """Clip and apply the accumulated gradients, unless they are not finite or ``finite`` is False (the
    step's loss, or a log-prob it used, was not: :func:`nonfinite_count`); a skipped step applies nothing
    (no weight, no AdamW moment or step count moves) and the schedule still advances.

    Returns ``grad_norm`` (before clipping), ``lr`` (used for this step), ``skipped_steps`` (1.0 if
    skipped) and, on several ranks, ``time/grad_sync_s`` (the gradient sum's wall time, waiting included). With ``optim.step_in_backward`` the update already happened in backward
    (:class:`StepInBackward`); the loops do not run the backward of a non-finite micro-batch, so then too
    nothing was applied.

    On several ranks (``world``) the gradients are first summed across them
    (:func:`rlmt.parallel.all_reduce_gradients`) and the step is skipped on every rank if ``finite`` is False
    on any, so every rank applies the same step.
    """
    in_backward = getattr(scheduler, "in_backward", None)
    if in_backward is not None:
        out = in_backward.finish(scheduler)
        return {**out, "skipped_steps": 1.0} if not finite else out
    sync = {}
    if world is not None and world.size > 1:
        t0 = time.perf_counter()
        finite = world.agree(finite)
        all_reduce_gradients(world, model.parameters())
        sync = {"time/grad_sync_s": time.perf_counter() - t0}
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    if world is not None and world.size > 1 and is_sharded(model):  # FSDP: local shards and replicated grads
        norm = clip_grad_norm(world, params, limit)
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
    lr = optimizer.param_groups[0]["lr"]
    skipped = not finite or not torch.isfinite(norm)
    if skipped:  # keep the schedule on step count without applying the bad update
        for p in params:
            p.grad = None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return {"grad_norm": float(norm), "lr": lr, "skipped_steps": float(skipped), **sync}
