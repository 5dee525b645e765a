"""The offline loop: SFT, DPO, the reward model and the process reward model are tasks of this one loop.

    read + check train / eval rows -> load the model -> tokenize -> modules -> total steps, optimizer
    -> prepare (initial weights) -> resume
    -> eval before -> for each step: indices -> micro-batches -> sum_k loss_k backward -> guarded step -> log
    -> checkpoint -> final/ -> eval after

A task (:class:`OfflineTask`) says only what differs: how rows become examples, which modules train and
which extra ones a checkpoint holds, what to compute before a checkpoint is loaded, a step's normalizer and
a micro-batch's loss, the held-out evaluation, and what ``final/`` holds.

Why the step does not depend on its split into micro-batches
------------------------------------------------------------
A step's loss is a sum over its units u (completion tokens, pairs or labelled steps) divided by the step's
count of units N_step (the task's ``normalizer``). Micro-batch k holds a disjoint subset S_k of the units and
returns ``loss_k = sum_{u in S_k} c_u / N_step``, so ``sum_k loss_k`` is the step's loss and, the gradient
being linear, the accumulated gradient is the whole step's gradient (batch 1 x accumulation 4 == batch 4 x
accumulation 1). The logged metrics go through :class:`rlmt.train.metrics.MetricReduction` with each
micro-batch weighted by its units: loss shares are summed, and a per-unit mean (accuracy, margin) weighted by
units is the mean over the whole step.

Why resume is exact
-------------------
The data of step s is a pure function of (seed, s) (:func:`step_indices`); weights, optimizer,
scheduler, RNG states and the task's extra modules come back from the checkpoint; what ``prepare`` computes
from the initial weights (DPO's reference log-probs) is cached in the run directory and reloaded.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from rlmt.checkpoint import load_checkpoint
from rlmt.config import Config
from rlmt.data import LoadReport, PromptFormat, SourceOptions, load_rows
from rlmt.data.order import step_indices
from rlmt.models import LoadedModel, save_final
from rlmt.records import RunRecorder, write_atomic
from rlmt.train.metrics import MetricReduction
from rlmt.objectives.policy import is_finite_loss
from rlmt.train.optim import NONFINITE, build_optimizer, guarded_step
from rlmt.parallel import World, check_divisible, shard_rows
from rlmt.parallel.fsdp import full_state_dict, gathered, is_sharded
from rlmt.train.session import recorder, resume_checkpoint, run_record, save_on_main, shard_model, start_run

MicroBatchLoss = Callable[[Any, float], tuple[Tensor, dict[str, float], float]]
"""(micro-batch, N_step) -> (its loss share sum_{u in micro-batch} c_u / N_step with grad, its metrics, its
weight: the units it holds)."""


@dataclass(frozen=True)
class OfflineModules:
    """The modules of one run."""

    model: nn.Module  # the causal LM: a checkpoint's model directory and, by default, final/
    trainable: nn.Module  # what the optimizer updates and the step clips: the model, or the model and a head
    extras: dict[str, nn.Module] = field(default_factory=dict)  # saved beside the model in checkpoints as {name}.pt


@dataclass(frozen=True)
class OfflineRun:
    """What a task's functions see of a run."""

    cfg: Config
    lm: LoadedModel
    fmt: PromptFormat
    run_dir: Path
    modules: OfflineModules
    device: torch.device
    final_state: dict | None = None  # rank 0, at the end, model.parallel=fsdp: the model's whole weights for final/

    @property
    def pad_id(self) -> int:
        return self.lm.tokenizer.pad_token_id


def model_only(lm: LoadedModel, fmt: PromptFormat) -> OfflineModules:
    """The causal LM alone trains; no extra modules."""
    return OfflineModules(lm.model, lm.model)


def chunks(run: OfflineRun, examples: list) -> list[list]:
    """A step's examples in micro-batches of ``optim.batch_size``, in order."""
    bs = run.cfg.optim.batch_size
    return [examples[j:j + bs] for j in range(0, len(examples), bs)]


def save_model(run: OfflineRun, examples: list, note: Callable[[str], None]) -> None:
    """``final/``: the causal LM and its tokenizer (:func:`rlmt.models.save_final`)."""
    save_final(run.modules.model, run.lm.tokenizer, run.run_dir, run.final_state)


@dataclass(frozen=True)
class OfflineTask:
    """One offline method: everything the loop does differently for it."""

    data_kind: str  # the row kind :func:`rlmt.data.load_rows` checks: "sft", "preference" or "steps"
    unit: str  # what one example is, in the data note: "examples", "pairs", "rows"
    count: str  # the logged name of a step's normalizer: "tokens", "pairs", "steps"
    tokenize: Callable[[Config, Any, PromptFormat, LoadReport], list]  # (cfg, tokenizer, fmt, loaded rows) -> examples
    collate: Callable[[OfflineRun, list], list]  # a step's examples -> its micro-batches
    normalizer: Callable[[list], float]  # a step's micro-batches -> N_step, the units of the whole step
    loss: Callable[[OfflineRun, Any, float], tuple[Tensor, dict[str, float], float]]  # see MicroBatchLoss
    modules: Callable[[LoadedModel, PromptFormat], OfflineModules] = model_only
    # with the initial weights, before a checkpoint is loaded: {"train": ..., ["eval": ...]} -> (the examples
    # the loop then uses, a line for the record or None)
    prepare: Callable[[OfflineRun, dict[str, list]], tuple[dict[str, list], str | None]] | None = None
    evaluate: Callable[[OfflineRun, list], dict[str, float]] | None = None  # held-out figures; None: no eval
    save_final: Callable[[OfflineRun, list, Callable[[str], None]], None] = save_model  # writes final/


# ------------------------------------------------------------------------------------ the data order


def examples_per_step(cfg: Config) -> int:
    """Examples of one optimizer step: ``batch_size * grad_accum``."""
    return cfg.optim.batch_size * cfg.optim.grad_accum


def total_steps_for(cfg: Config, n_examples: int, epochs: float | None = None) -> int:
    """``optim.max_steps``, or enough steps for ``epochs`` (default ``optim.epochs``) passes over the data."""
    if cfg.optim.max_steps > 0:
        return cfg.optim.max_steps
    ep = cfg.optim.epochs if epochs is None else epochs
    return max(1, math.ceil(ep * n_examples / examples_per_step(cfg)))


# ------------------------------------------------------------------------------------------- the loop


def offline_update(trainable: nn.Module, micro_batches: list, normalizer: float, loss: MicroBatchLoss,
                   optimizer, scheduler, max_grad_norm: float, count: str, world: World = World(),
                   ) -> dict[str, float]:
    """One optimizer step: backward each micro-batch's share of the step's loss, then clip and apply (or skip
    if the gradient, the loss or a log-prob the task counted is not finite). Returns the reduced micro-batch
    metrics, ``count``: N_step, ``grad_norm``, ``lr``, ``skipped_steps``, ``nonfinite_logprobs`` (when the task
    counts them) and ``time/step_s``.

    On several ranks ``micro_batches`` are this rank's share of the step and ``normalizer`` the whole step's
    N_step over all ranks; the gradients are summed across ranks before the step and the metrics reduced over
    them (:meth:`MetricReduction.result_across`)."""
    t0 = time.perf_counter()
    trainable.train()
    sharded = world.size > 1 and is_sharded(trainable)
    reduction = MetricReduction()
    finite, nonfinite = True, {}  # a non-finite log-prob or loss loses the step: no backward, the guard skips it
    for mb in micro_batches:
        value, metrics, weight = loss(mb, normalizer)
        if NONFINITE in metrics:
            nonfinite[NONFINITE] = nonfinite.get(NONFINITE, 0.0) + metrics.pop(NONFINITE)
        finite = finite and not nonfinite.get(NONFINITE) and is_finite_loss(value)
        if finite or sharded:  # FSDP: every rank runs every backward (its reduce-scatter); the guard skips the step
            value.backward()
        reduction.add(metrics, weight)
    applied = guarded_step(trainable, optimizer, scheduler, max_grad_norm, finite, world)
    if world.size > 1 and nonfinite:
        nonfinite[NONFINITE] = world.sum_scalar(nonfinite[NONFINITE])
    return {**reduction.result_across(world), count: float(normalizer), **applied, **nonfinite,
            "time/step_s": time.perf_counter() - t0}


def _read(cfg: Config, task: OfflineTask) -> dict[str, LoadReport]:
    """The rows of data.train (and data.eval when the task evaluates), read and checked: no model needed."""
    reports = {"train": load_rows(cfg.data.train, task.data_kind, cfg.data.on_invalid, cfg.data.limit,
                                  SourceOptions.of(cfg.data))}
    if task.evaluate is not None and cfg.data.eval:
        reports["eval"] = load_rows(cfg.data.eval, task.data_kind, cfg.data.on_invalid, cfg.eval.max_prompts,
                                    SourceOptions.of(cfg.data, "eval"))
    return reports


def _tokenized(cfg: Config, task: OfflineTask, lm: LoadedModel, fmt: PromptFormat, report: LoadReport,
               ) -> tuple[list, LoadReport]:
    examples = task.tokenize(cfg, lm.tokenizer, fmt, report)
    report.require(len(examples))  # a skip at tokenizing can leave none
    return examples, report


def _evaluate(run: OfflineRun, task: OfflineTask, held: list, tag: str, rec: RunRecorder, world: World) -> None:
    """The held-out figures, computed and written by rank 0 while the others wait."""
    with gathered(run.modules.model):
        if world.is_main:
            metrics = task.evaluate(run, held)
            write_atomic(run.run_dir / f"eval-{tag}.json", json.dumps(metrics, indent=1))
            rec.evaluation(tag, metrics, json.dumps(metrics))
        world.wait()


def train_offline(cfg: Config, task: OfflineTask, world: World = World()) -> Path:
    """Run ``task`` on ``cfg`` and return the run directory.

    On N ranks (``world``) every rank holds the model and all examples; step s's global batch
    (:func:`step_indices`, the same on every rank) is split into N contiguous shards
    (:func:`rlmt.parallel.shard_rows`), each rank's micro-batches are scaled by the step's global N_step, and
    the gradients summed across ranks: the step equals the one-process step on the same global batch. Rank 0
    writes the records, checkpoints, ``final/`` and the evaluations."""
    per_step = examples_per_step(cfg)
    check_divisible(per_step, world.size, "optim.batch_size * optim.grad_accum")
    reports = _read(cfg, task)  # before the model loads: a bad row costs no model load
    ckpt, record = world.on_main(lambda: resume_checkpoint(cfg)), run_record(cfg)  # verified, config compared
    run_dir, lm, fmt = start_run(cfg)
    modules = task.modules(lm, fmt)
    sharded = shard_model(cfg, lm, world, [modules.trainable], ckpt)  # rank 0's weights; fsdp: before the optimizer
    run = OfflineRun(cfg, lm, fmt, run_dir, modules, next(lm.model.parameters()).device)
    examples, report = _tokenized(cfg, task, lm, fmt, reports["train"])
    splits = {"train": examples}
    if "eval" in reports:
        splits["eval"] = _tokenized(cfg, task, lm, fmt, reports["eval"])[0]
    total = total_steps_for(cfg, len(examples))
    opt, sched = build_optimizer(modules.trainable, cfg.optim, total, preallocate=not sharded)
    splits, prepare_note = task.prepare(run, splits) if task.prepare else (splits, None)  # initial weights
    examples, held = splits["train"], splits.get("eval", [])
    start = (load_checkpoint(ckpt, modules.model, opt, sched, modules.extras, modules.trainable, world.rank)["step"]
             if ckpt else 0)
    rec = recorder(world, run_dir, cfg, start if ckpt else None, total)
    if prepare_note:
        rec.note(prepare_note)
    if report.skipped:
        rec.note(f"data: {len(examples)} {task.unit}; filtered/adjusted: {report.skipped}")
    if cfg.run.eval_before_after and held and not ckpt:
        _evaluate(run, task, held, "before", rec, world)

    loss = partial(task.loss, run)
    save = partial(save_on_main, world, run_dir, model=modules.model, optimizer=opt, scheduler=sched,
                   keep=cfg.run.keep_checkpoints, extras=modules.extras, record=record, trainable=modules.trainable,
                   tokenizer=lm.tokenizer)
    rec.start_steps()
    for step in range(start, total):
        idx = step_indices(step, per_step, len(examples), cfg.run.seed, cfg.data.shuffle)  # the global batch
        mbs = task.collate(run, [examples[i] for i in shard_rows(idx, world.rank, world.size)])
        normalizer = world.sum_scalar(task.normalizer(mbs))
        metrics = offline_update(modules.trainable, mbs, normalizer, loss, opt, sched, cfg.optim.max_grad_norm,
                                 task.count, world)
        rec.log(step + 1, {**metrics, "epoch": (step + 1) * per_step / len(examples)})
        if cfg.run.save_every and (step + 1) % cfg.run.save_every == 0 and step + 1 < total:
            save(step + 1, {"examples_seen": (step + 1) * per_step})
    save(total, {"examples_seen": total * per_step})

    if sharded:  # model.parallel=fsdp: the whole weights gathered to rank 0, which writes final/
        run = replace(run, final_state=full_state_dict(modules.model))
    with gathered(modules.model):  # and its forward passes (a reward model's score statistics) need no peers
        if world.is_main:
            task.save_final(run, examples, rec.note)
        world.wait()
    if held:
        _evaluate(run, task, held, "after", rec, world)
    rec.close()
    return run_dir
