"""The outcome reward model (RLHF stage 2): a scalar head on a causal-LM trunk, trained with Bradley-Terry.

    r(x, y) = w^T h_last(x, y)          h_last: the trunk's final hidden state (H,) at the last token of
                                        prompt + completion (the completion ends with the end-of-turn token)
    loss    = sum_pairs -log sigmoid(r(x, y_w) - r(x, y_l)) / N_step

The offline loop mirrors DPO's: a step takes ``batch_size * grad_accum`` pairs (a pure function of (seed,
step)); the chosen and rejected completions of a micro-batch run as one batch of 2B rows; each micro-batch's
loss is its pairs' sum divided by the step's pair count, so accumulation does not change the gradient.
Checkpoints hold the trunk and, as an extra module, the head (``reward_head.pt``), so resume is exact.

``final/`` holds the trunk (``AutoModelForCausalLM``-loadable, its tokenizer with it), ``reward_head.pt`` and
``reward_model.json`` (hidden size, the prompt format used in training, and with ``rm.normalize`` the mean
and std of the final model's scores over every train completion, chosen and rejected, so a reward source can
return z-scores). :func:`load_reward_model` reads it back.

Held-out pairwise accuracy (share of data.eval pairs with r_w > r_l; ties count as wrong) goes to
``eval-before.json`` (with ``run.eval_before_after``) and ``eval-after.json``, as in DPO.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from rlmt.checkpoint import load_checkpoint, save_checkpoint
from rlmt.config import Config, to_dict
from rlmt.data import LoadReport, PromptFormat, SFTExample, load_rows
from rlmt.logprobs import position_ids_from_mask
from rlmt.objectives.preference import bradley_terry_loss
from rlmt.records import RunRecorder, write_atomic
from rlmt.train.dpo import PreferencePair, collate_pairs, tokenize_preference
from rlmt.train.optim import build_optimizer, guarded_step
from rlmt.train.session import resume_checkpoint, save_final, start_run
from rlmt.train.sft import collate_sft, examples_per_step, step_indices, total_steps_for

HEAD_FILE = "reward_head.pt"
META_FILE = "reward_model.json"
HEAD_MODULE = "reward_head"  # its name among a checkpoint's extra modules


class RewardHead(nn.Module):
    """``r = w^T h``: (..., H) -> (...,) float32, whatever the trunk's dtype.

    No bias: Bradley-Terry depends only on reward differences, so a bias would get no gradient; the offset
    of the scores is fixed afterwards by the normalization stats. ``w ~ N(0, 1/H)``, so the first scores
    (of hidden states after the trunk's final norm, about unit scale per coordinate) are about N(0, 1).
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, bias=False)
        nn.init.normal_(self.linear.weight, std=hidden_size ** -0.5)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.linear(hidden.float()).squeeze(-1)


def last_token_hidden(trunk: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, L) right-padded ids and 0/1 mask -> (B, H) final hidden state at each row's last real token.

    Runs the trunk's decoder only (no full-vocabulary logits).
    """
    h = trunk.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    last = attention_mask.long().sum(-1) - 1  # (B,)
    return h[torch.arange(h.shape[0], device=h.device), last]  # (B, H)


class RewardModel(nn.Module):
    """A causal-LM ``trunk`` and a :class:`RewardHead`; ``forward(ids, mask) -> (B,)`` raw scores.

    ``score_mean`` / ``score_std`` (None when not stored) are the train-set statistics for z-scores;
    ``tokenizer`` and ``prompt_format`` are what the model was trained with (set by the loader).
    """

    def __init__(self, trunk: nn.Module, head: RewardHead, tokenizer=None,
                 prompt_format: PromptFormat | None = None, score_mean: float | None = None,
                 score_std: float | None = None, max_completion_tokens: int | None = None):
        super().__init__()
        self.trunk, self.head = trunk, head
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format or PromptFormat()
        self.score_mean, self.score_std = score_mean, score_std
        self.max_completion_tokens = max_completion_tokens

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.head(last_token_hidden(self.trunk, input_ids, attention_mask))  # (B,)

    @torch.no_grad()
    def score(self, prompt_ids_list: Sequence[list[int]], completion_ids_list: Sequence[list[int]],
              batch_size: int = 16) -> Tensor:
        """Raw scores (B,) float32 on CPU of prompt_i + completion_i, in eval mode, ``batch_size`` at a time."""
        was_training = self.training
        self.eval()
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else 0
        device = next(self.parameters()).device
        out = []
        for i in range(0, len(prompt_ids_list), batch_size):
            examples = [SFTExample(list(p), list(c)) for p, c in
                        zip(prompt_ids_list[i:i + batch_size], completion_ids_list[i:i + batch_size])]
            batch = collate_sft(examples, pad).to(device)
            out.append(self(batch.input_ids, batch.attention_mask).cpu())
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)


# -------------------------------------------------------------------------------------------- the math


def rm_update(rm: RewardModel, micro_batches: list[list[PreferencePair]], optimizer, scheduler,
              max_grad_norm: float, pad_id: int, device) -> dict[str, float]:
    """One optimizer step of Bradley-Terry over micro-batches of pairs; metrics over the whole step."""
    t0 = time.perf_counter()
    n_pairs = sum(len(pairs) for pairs in micro_batches)
    rm.train()
    chosen, rejected = [], []
    for pairs in micro_batches:
        b = len(pairs)
        batch = collate_pairs(pairs, pad_id).to(device)
        r = rm(batch.input_ids, batch.attention_mask)  # (2b,): chosen rows, then rejected rows
        loss, _ = bradley_terry_loss(r[:b], r[b:], normalizer=n_pairs)
        loss.backward()
        chosen.append(r[:b].detach())
        rejected.append(r[b:].detach())
    _, metrics = bradley_terry_loss(torch.cat(chosen), torch.cat(rejected))
    return {**metrics, **guarded_step(rm, optimizer, scheduler, max_grad_norm), "pairs": float(n_pairs),
            "time/step_s": time.perf_counter() - t0}


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


# ---------------------------------------------------------------------------------------- save and load


def save_reward_model(rm: RewardModel, tokenizer, run_dir: Path, meta: dict) -> Path:
    """``final/``: the trunk (:func:`save_final`), ``reward_head.pt`` and ``reward_model.json`` (last, so a
    directory with the json is complete)."""
    final = save_final(rm.trunk, tokenizer, run_dir)
    tmp = final / f".{HEAD_FILE}.tmp"
    torch.save({k: v.detach().cpu() for k, v in rm.head.state_dict().items()}, tmp)
    os.replace(tmp, final / HEAD_FILE)
    write_atomic(final / META_FILE, json.dumps(meta, indent=1))
    return final


def load_reward_model(path: str | Path, device: str = "cpu", dtype: str = "float32") -> RewardModel:
    """Load a reward model written by ``algorithm: reward_model`` (its ``final/`` directory), in eval mode."""
    from rlmt.models import load_model
    from rlmt.train.session import pick_device

    path = Path(path)
    if not (path / META_FILE).exists():
        raise ValueError(f"{path}: not a reward model directory (no {META_FILE}; train one with "
                         "algorithm: reward_model)")
    meta = json.loads((path / META_FILE).read_text())
    lm = load_model(str(path), dtype=dtype, device=pick_device(device))
    head = RewardHead(int(meta["hidden_size"]))
    head.load_state_dict(torch.load(path / HEAD_FILE, map_location="cpu", weights_only=True))
    fmt = PromptFormat(chat=bool(meta.get("chat", True)), system_prompt=meta.get("system_prompt"))
    rm = RewardModel(lm.model, head.to(next(lm.model.parameters()).device), lm.tokenizer, fmt,
                     meta.get("score_mean"), meta.get("score_std"), meta.get("max_completion_tokens"))
    return rm.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------- the loop


def _load_pairs(cfg: Config, path: str, tokenizer, fmt: PromptFormat, limit: int,
                ) -> tuple[list[PreferencePair], LoadReport]:
    report = load_rows(path, "preference", cfg.data.on_invalid, limit)
    return tokenize_preference(report.rows, tokenizer, fmt, cfg.data.max_prompt_tokens,
                               cfg.data.max_completion_tokens, cfg.data.on_invalid, report), report


def train_reward_model(cfg: Config) -> Path:
    run_dir, lm, fmt = start_run(cfg)
    tok, pad_id = lm.tokenizer, lm.tokenizer.pad_token_id
    device = next(lm.model.parameters()).device
    rm = RewardModel(lm.model, RewardHead(lm.model.config.hidden_size).to(device), tok, fmt)
    pairs, report = _load_pairs(cfg, cfg.data.train, tok, fmt, cfg.data.limit)
    held = _load_pairs(cfg, cfg.data.eval, tok, fmt, cfg.eval.max_prompts)[0] if cfg.data.eval else []
    total = total_steps_for(cfg, len(pairs))
    opt, sched = build_optimizer(rm, cfg.optim, total)
    ckpt = resume_checkpoint(cfg)
    extras = {HEAD_MODULE: rm.head}
    start = load_checkpoint(ckpt, rm.trunk, opt, sched, extras)["step"] if ckpt else 0
    rec = RunRecorder(run_dir, to_dict(cfg), start if ckpt else None, cfg.run.tensorboard, cfg.run.log_every,
                      total, cfg.run.progress)
    if report.skipped:
        rec.note(f"data: {len(pairs)} pairs; filtered/adjusted: {report.skipped}")
    bs = cfg.optim.batch_size

    def evaluate(tag: str) -> None:
        metrics = pairwise_accuracy(pair_scores(rm, held, bs, pad_id, device))
        write_atomic(run_dir / f"eval-{tag}.json", json.dumps(metrics, indent=1))
        rec.note(f"eval {tag}: {json.dumps(metrics)}")

    if cfg.run.eval_before_after and held and not ckpt:
        evaluate("before")
    per_step = examples_per_step(cfg)
    for step in range(start, total):
        idx = step_indices(step, per_step, len(pairs), cfg.run.seed, cfg.data.shuffle)
        mbs = [[pairs[i] for i in idx[j:j + bs]] for j in range(0, len(idx), bs)]
        metrics = rm_update(rm, mbs, opt, sched, cfg.optim.max_grad_norm, pad_id, device)
        rec.log(step + 1, {**metrics, "epoch": (step + 1) * per_step / len(pairs)})
        if cfg.run.save_every and (step + 1) % cfg.run.save_every == 0 and step + 1 < total:
            save_checkpoint(run_dir, step + 1, rm.trunk, opt, sched, {"pairs_seen": (step + 1) * per_step},
                            cfg.run.keep_checkpoints, extras)
    save_checkpoint(run_dir, total, rm.trunk, opt, sched, {"pairs_seen": total * per_step},
                    cfg.run.keep_checkpoints, extras)
    meta = {"hidden_size": rm.trunk.config.hidden_size, "head": HEAD_FILE, "chat": fmt.chat,
            "system_prompt": fmt.system_prompt, "max_completion_tokens": cfg.data.max_completion_tokens,
            "train_pairs": len(pairs)}
    if cfg.rm.normalize:
        mean, std = score_stats(pair_scores(rm, pairs, bs, pad_id, device))
        meta.update(score_mean=mean, score_std=std)
        rec.note(f"train scores: mean {mean:.4g}, std {std:.4g} (stored for z-scores)")
    save_reward_model(rm, tok, run_dir, meta)
    if held:
        evaluate("after")
    rec.close()
    return run_dir


__all__ = ["RewardHead", "RewardModel", "load_reward_model", "pair_scores", "pairwise_accuracy", "rm_update",
           "save_reward_model", "score_stats", "train_reward_model"]
