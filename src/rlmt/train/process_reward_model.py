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
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from rlmt.checkpoint import load_checkpoint, save_checkpoint
from rlmt.config import Config, to_dict
from rlmt.data import LoadReport, PromptFormat, Row, SFTExample, encode_completion, load_rows, prompt_ids_within_limit
from rlmt.logprobs import position_ids_from_mask
from rlmt.objectives.process import agreement, aggregate_steps, process_step_loss, step_end_positions
from rlmt.records import RunRecorder, write_atomic
from rlmt.train.dense import token_char_ends
from rlmt.train.optim import build_optimizer, guarded_step
from rlmt.train.session import resume_checkpoint, save_final, start_run
from rlmt.train.ppo import ValueHead
from rlmt.train.sft import collate_sft, examples_per_step, step_indices, total_steps_for

HEAD_FILE = "process_head.pt"
META_FILE = "process_reward_model.json"


class ProcessHead(ValueHead):
    """Step logit ``w^T h + b`` on final hidden states: (..., H) -> (...,) float32; the same zero-initialised
    linear head as PPO's value head, so every step scores 0.5 before training."""


@dataclass
class StepExample:
    """Token ids of one row; ``positions[k]`` indexes step k's last token in ``completion_ids``."""

    prompt_ids: list[int]
    completion_ids: list[int]
    positions: list[int]
    labels: list[float]


@dataclass
class StepBatch:
    """Right-padded rows (B, L) and their steps (B, S): absolute token positions, labels, 0/1 mask."""

    input_ids: Tensor
    attention_mask: Tensor
    positions: Tensor
    labels: Tensor
    mask: Tensor

    def to(self, device) -> "StepBatch":
        return StepBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.positions,
                                                   self.labels, self.mask)))


def step_example(tokenizer, prompt_ids: list[int], completion_ids: list[int], step_ends: Sequence[int],
                 labels: Sequence[float]) -> StepExample:
    """Place steps ending at characters ``step_ends`` of the decoded completion on its tokens; steps past
    the (possibly truncated) completion's text are dropped with their labels."""
    ends = token_char_ends(tokenizer, completion_ids)
    kept = [(e, y) for e, y in zip(step_ends, labels) if ends and e <= ends[-1]]
    positions = step_end_positions([(0, e) for e, _ in kept], ends) if kept else []
    return StepExample(prompt_ids, completion_ids, positions, [float(y) for _, y in kept])


def tokenize_steps(rows: Sequence[Row], tokenizer, fmt: PromptFormat, max_prompt_tokens: int,
                   max_completion_tokens: int, separator: str, on_invalid: str = "error",
                   report: LoadReport | None = None) -> list[StepExample]:
    """Step rows -> examples; over-long prompts are an error (or skipped); steps cut off by truncation are
    dropped (counted), and a row left without steps is skipped (counted)."""
    out = []
    for row in rows:
        p_ids = prompt_ids_within_limit(row, row.data["prompt"], tokenizer, fmt, max_prompt_tokens, on_invalid, report)
        if p_ids is None:
            continue
        steps = row.data["steps"]
        step_ends = [sum(len(s) for s in steps[:k + 1]) + k * len(separator) for k in range(len(steps))]
        c_ids = encode_completion(tokenizer, separator.join(steps), max_completion_tokens, report, "steps")
        ex = step_example(tokenizer, p_ids, c_ids, step_ends, row.data["labels"])
        if report is not None and len(ex.labels) < len(steps):
            report.skip("steps past data.max_completion_tokens dropped")
        if ex.labels:
            out.append(ex)
    return out


def collate_steps(examples: Sequence[StepExample], pad_id: int) -> StepBatch:
    tokens = collate_sft([SFTExample(e.prompt_ids, e.completion_ids) for e in examples], pad_id)
    S = max(len(e.labels) for e in examples)
    positions = torch.zeros((len(examples), S), dtype=torch.long)
    labels = torch.zeros((len(examples), S))
    mask = torch.zeros((len(examples), S), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.labels)
        positions[i, :n] = torch.tensor(e.positions) + len(e.prompt_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = True
    return StepBatch(tokens.input_ids, tokens.attention_mask, positions, labels, mask)


def step_logits(model: nn.Module, head: nn.Module, batch: StepBatch) -> Tensor:
    """(B, S) step logits: the head on the final hidden state at each step's last token (one trunk pass)."""
    hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 position_ids=position_ids_from_mask(batch.attention_mask),
                                 use_cache=False).last_hidden_state  # (B, L, H)
    h = hidden.gather(1, batch.positions[:, :, None].expand(-1, -1, hidden.shape[-1]))  # (B, S, H)
    return head(h)


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


@torch.no_grad()
def step_scores(model: nn.Module, head: nn.Module, examples: Sequence[StepExample], batch_size: int, pad_id: int,
                device) -> list[list[float]]:
    """sigmoid step scores of every example (eval mode, no grad), one list per example."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = list(examples[i:i + batch_size])
        b = collate_steps(chunk, pad_id).to(device)
        p = torch.sigmoid(step_logits(model, head, b)).cpu()
        out += [p[j, :len(e.labels)].tolist() for j, e in enumerate(chunk)]
    model.train(was_training)
    return out


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


def save_process_head(target: Path, head: nn.Module, separator: str, aggregate: str, fmt: PromptFormat) -> None:
    """Write ``process_head.pt`` and ``process_reward_model.json`` into ``target`` (a ``final/`` directory)."""
    torch.save({k: v.detach().cpu() for k, v in head.state_dict().items()}, target / HEAD_FILE)
    meta = {"format": 1, "separator": separator, "aggregate": aggregate, "chat": fmt.chat,
            "system_prompt": fmt.system_prompt, "hidden_size": int(head.linear.in_features)}
    write_atomic(target / META_FILE, json.dumps(meta, indent=1))


def load_process_reward_model(path: str | Path, device: str = "cpu"):
    """(LoadedModel, ProcessHead, meta dict) from a ``final/`` directory written by this trainer."""
    from rlmt.models import load_model

    path = Path(path)
    if not (path / META_FILE).exists():
        raise FileNotFoundError(f"{path}: not a process reward model (no {META_FILE}); train one with "
                                "algorithm: process_reward_model")
    meta = json.loads((path / META_FILE).read_text())
    lm = load_model(str(path), device=device)
    lm.model.eval().requires_grad_(False)
    head = ProcessHead(lm.model.config.hidden_size)
    head.load_state_dict(torch.load(path / HEAD_FILE, map_location="cpu", weights_only=True))
    return lm, head.to(device).eval(), meta


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
