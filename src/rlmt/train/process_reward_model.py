"""Process reward model: per-step correctness from step labels, a task of the offline loop
(``algorithm: process_reward_model``).

Rows hold ``prompt``, ``steps`` and ``labels`` (one per step, in [0, 1]). The completion is the steps joined
by ``rm.step_separator`` followed by the end-of-turn token. A score head (Linear H -> 1, zero-initialised,
float32) reads the trunk's final hidden state at each step's last token (the state *after* reading it):

    p_k = sigmoid(w^T h_{pos_k} + b),   loss = sum_k BCE(p_k, y_k) / (steps in the optimizer step)

so the accumulated gradient does not depend on how a step is split into micro-batches. The trunk is the
configured model (all weights, or LoRA adapters) and trains with the head.

Held-out numbers (``eval-before.json``, ``eval-after.json``): ``step_accuracy`` (p_k on the label's side of
0.5; a score of exactly 0.5 counts half, so the zero-initialised head scores 0.5 before training, not 0),
``outcome_accuracy`` (the ``rm.step_aggregate`` of a row's scores against its minimum label: a solution is
correct when every step is; ties count half too), ``step_loss``, and the figures to read them against:
``step_accuracy_majority`` and ``outcome_accuracy_majority`` (always answering the held-out set's more common
label) and ``step_ties`` (the share of steps scored exactly 0.5: 1 for a fresh head). The training steps'
``step_accuracy`` metric counts a tie as wrong (:func:`rlmt.objectives.process.step_accuracy`). ``final/``
holds the trunk, ``process_head.pt`` and ``process_reward_model.json`` (separator, aggregate, prompt format),
which :class:`rlmt.rewards.process_reward_model.ProcessRewardModelReward` loads. ``rm.normalize`` does not
apply: step scores are probabilities.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import Tensor, nn

from rlmt.config import Config
from rlmt.data import PromptFormat, StepBatch, StepExample, collate_steps, tokenize_steps
from rlmt.models import LoadedModel, ProcessHead, save_final
from rlmt.models.process_reward_model import save_process_head, step_logits, step_scores
from rlmt.objectives.process import agreement, aggregate_steps, majority_rate, process_step_loss
from rlmt.train.offline import OfflineModules, OfflineRun, OfflineTask, chunks, offline_update

HEAD_MODULE = "process_head"  # its name among a checkpoint's extra modules


def labelled_steps(micro_batches: list[StepBatch]) -> float:
    """N_step: the labelled steps of all ``micro_batches``."""
    return float(sum(int(mb.mask.sum()) for mb in micro_batches))


def process_micro_loss(model: nn.Module, head: nn.Module, device, batch: StepBatch, normalizer: float,
                       ) -> tuple[Tensor, dict[str, float], float]:
    """A micro-batch's BCE sum over its labelled steps divided by the step's ``normalizer`` steps; metrics
    ``loss`` (that share) and ``step_accuracy``; weight: its labelled steps."""
    batch = batch.to(device)
    loss, met = process_step_loss(step_logits(model, head, batch), batch.labels, batch.mask, normalizer=normalizer)
    return loss, {"loss": met["step_loss"], "step_accuracy": met["step_accuracy"]}, float(batch.mask.sum())


def process_update(model: nn.Module, head: nn.Module, trainable: nn.Module, micro_batches: list[StepBatch],
                   optimizer, scheduler, max_grad_norm: float, device) -> dict[str, float]:
    """One optimizer step: each micro-batch's BCE sum over the step's total step count, accumulated."""
    return offline_update(trainable, micro_batches, labelled_steps(micro_batches),
                          partial(process_micro_loss, model, head, device), optimizer, scheduler, max_grad_norm,
                          "steps")


def process_accuracy(model: nn.Module, head: nn.Module, examples: Sequence[StepExample], aggregate: str,
                     batch_size: int, pad_id: int, device) -> dict[str, float]:
    """Held-out ``step_accuracy`` and ``outcome_accuracy`` (aggregate vs. min label; a score of exactly 0.5
    counts half), ``step_loss``, their majority-label baselines, the share of tied steps, counts."""
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
    return {"step_accuracy": float(agreement(p[m], y[m], tie=0.5).mean()),
            "outcome_accuracy": float(agreement(outcome, min_label, tie=0.5).mean()),
            "step_loss": met["step_loss"],
            "step_accuracy_majority": majority_rate(y[m]), "outcome_accuracy_majority": majority_rate(min_label),
            "step_ties": float((p[m] == 0.5).float().mean()), "steps": float(m.sum()), "rows": float(len(examples))}


# ------------------------------------------------------------------------------------------ the task


def _tokenize(cfg: Config, tokenizer, fmt: PromptFormat, report) -> list[StepExample]:
    return tokenize_steps(report.rows, tokenizer, fmt, cfg.data.max_prompt_tokens, cfg.data.max_completion_tokens,
                          cfg.rm.step_separator, cfg.data.on_invalid, report)


def _modules(lm: LoadedModel, fmt: PromptFormat) -> OfflineModules:
    head = ProcessHead(lm.model.config.hidden_size).to(next(lm.model.parameters()).device)
    return OfflineModules(lm.model, nn.ModuleList([lm.model, head]), {HEAD_MODULE: head})


def _collate(run: OfflineRun, examples: list[StepExample]) -> list[StepBatch]:
    return [collate_steps(c, run.pad_id) for c in chunks(run, examples)]


def _loss(run: OfflineRun, batch: StepBatch, normalizer: float):
    return process_micro_loss(run.modules.model, run.modules.extras[HEAD_MODULE], run.device, batch, normalizer)


def _evaluate(run: OfflineRun, held: list[StepExample]) -> dict[str, float]:
    return process_accuracy(run.modules.model, run.modules.extras[HEAD_MODULE], held, run.cfg.rm.step_aggregate,
                            run.cfg.optim.batch_size, run.pad_id, run.device)


def _save_final(run: OfflineRun, examples: list[StepExample], note) -> None:
    """``final/``: the trunk, ``process_head.pt`` and ``process_reward_model.json``."""
    final = save_final(run.modules.model, run.lm.tokenizer, run.run_dir, run.final_state)
    save_process_head(final, run.modules.extras[HEAD_MODULE], run.cfg.rm.step_separator, run.cfg.rm.step_aggregate,
                      run.fmt)


PROCESS_REWARD_MODEL = OfflineTask(
    data_kind="steps", unit="rows", count="steps",
    tokenize=_tokenize,
    modules=_modules,
    collate=_collate,
    normalizer=labelled_steps,
    loss=_loss,
    evaluate=_evaluate,
    save_final=_save_final,
)

