"""Process supervision: where each reasoning step ends, the per-step loss, and how step scores combine.

A completion is a sequence of steps joined by a separator. A process reward model (PRM) reads the hidden
state at each step's last token and predicts the probability that the step is correct (Lightman et al.
2023, "Let's Verify Step by Step"). Step tensors are (B, S): S steps per row, right-padded, with a 0/1
``mask`` (B, S) on real steps.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rlmt.objectives.aggregate import Normalizer


def split_steps(text: str, separator: str) -> list[tuple[str, int]]:
    """Split ``text`` at ``separator`` into (step text, char_end) pairs; empty (all-whitespace) steps dropped.

    ``char_end`` is the exclusive end of the step in ``text``: ``text[char_end - len(step):char_end] == step``.
    ``split_steps("a\\n\\nb\\n", "\\n") == [("a", 1), ("b", 4)]``.
    """
    if not separator:
        raise ValueError("the step separator must not be empty")
    out, start = [], 0
    for part in text.split(separator):
        if part.strip():
            out.append((part, start + len(part)))
        start += len(part) + len(separator)
    return out


def step_end_positions(step_spans: Sequence[tuple[int, int]], token_ends: Sequence[int]) -> list[int]:
    """Token index of each step's last token.

    step_spans: (start, end) character spans of the steps (end exclusive); token_ends: the character
    offset reached after each token, non-decreasing (e.g. ``len(decode(ids[:t + 1]))``). The last token of
    a step ending at character e is the first token whose text reaches e:

        pos_k = min{t : token_ends[t] >= end_k},   or the last token when no token reaches end_k

    (a completion truncated to fewer tokens than its text). Raises on an empty token list.
    """
    if not len(token_ends):
        raise ValueError("no tokens to place steps on")
    last = len(token_ends) - 1
    out = []
    for _, end in step_spans:
        out.append(next((t for t, e in enumerate(token_ends) if e >= end), last))
    return out


def process_step_loss(logits: Tensor, labels: Tensor, mask: Tensor, normalizer: Normalizer | None = None
                      ) -> tuple[Tensor, dict[str, float]]:
    """Binary cross-entropy of step labels, summed over real steps and divided by ``normalizer``.

    logits (with grad), labels in [0, 1] (soft labels allowed), mask: (B, S). With p = sigmoid(logit):

        loss = sum_{b,s} mask_bs * -(y_bs log p_bs + (1 - y_bs) log(1 - p_bs)) / normalizer

    ``normalizer`` defaults to the number of real steps here (a mean); under gradient accumulation pass the
    optimizer step's total step count, so the summed micro-batch losses equal the step's mean whatever the
    split. Masked positions may hold any value (NaN included) and get zero gradient.
    Metrics: ``step_loss`` (this batch's term), ``step_accuracy`` (see :func:`step_accuracy`).
    """
    m = mask != 0
    safe_logits = torch.where(m, logits.float(), torch.zeros_like(logits, dtype=torch.float32))
    y = torch.where(m, labels.to(safe_logits.dtype), torch.zeros_like(safe_logits))
    per_step = F.binary_cross_entropy_with_logits(safe_logits, y, reduction="none")
    n = m.sum() if normalizer is None else normalizer
    loss = torch.where(m, per_step, torch.zeros_like(per_step)).sum() / torch.as_tensor(n, dtype=per_step.dtype).clamp_min(1)
    with torch.no_grad():
        acc = step_accuracy(torch.sigmoid(safe_logits), y, m)
    return loss, {"step_loss": float(loss.detach()), "step_accuracy": acc}


@torch.no_grad()
def agreement(scores: Tensor, labels: Tensor, threshold: float = 0.5, tie: float = 0.0) -> Tensor:
    """1 where a score and a label fall on the same side of ``threshold``, else 0; a score exactly at the
    threshold gets ``tie`` (0: wrong; 0.5: the expected credit of breaking the tie with a fair coin)."""
    agree = ((scores - threshold) * (labels.to(scores.dtype) - threshold) > 0).float()
    return torch.where(scores == threshold, torch.full_like(agree, tie), agree)


@torch.no_grad()
def majority_rate(labels: Tensor, threshold: float = 0.5) -> float:
    """The accuracy of the better constant prediction (always above ``threshold``, or always below) on
    ``labels`` (N,): the share of the more common side, the figure a classifier must beat."""
    if not labels.numel():
        return float("nan")
    y = labels.float()
    return max(float((y > threshold).float().mean()), float((y < threshold).float().mean()))


@torch.no_grad()
def step_accuracy(scores: Tensor, labels: Tensor, mask: Tensor, threshold: float = 0.5) -> float:
    """Share of real steps whose score is on the label's side of ``threshold`` (scores, labels, mask (B, S)).

    A score exactly at the threshold (a zero-initialised head says 0.5 everywhere) counts as wrong.
    """
    m = mask != 0
    return float(agreement(scores[m], labels[m], threshold).mean()) if m.any() else float("nan")


# ---------------------------------------------------------------------------------------------- aggregates


def aggregate_min(scores: Tensor, mask: Tensor) -> Tensor:
    """``R = min_s p_s``: a solution is as good as its weakest step. (B, S) -> (B,)."""
    return torch.where(mask != 0, scores, torch.full_like(scores, torch.inf)).amin(-1)


def aggregate_product(scores: Tensor, mask: Tensor) -> Tensor:
    """``R = prod_s p_s``: the probability every step is correct, if steps were independent. (B, S) -> (B,)."""
    return torch.where(mask != 0, scores, torch.ones_like(scores)).prod(-1)


def aggregate_mean(scores: Tensor, mask: Tensor) -> Tensor:
    """``R = (1/S_b) sum_s p_s`` over the row's real steps. (B, S) -> (B,)."""
    m = mask != 0
    return torch.where(m, scores, torch.zeros_like(scores)).sum(-1) / m.sum(-1).to(scores.dtype)


def aggregate_last(scores: Tensor, mask: Tensor) -> Tensor:
    """``R = p_last``: the score of the row's last real step. (B, S) -> (B,)."""
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(scores)
    last = torch.where(mask != 0, positions, torch.full_like(positions, -1)).amax(-1)  # (B,)
    return scores.gather(-1, last.clamp_min(0)[:, None]).squeeze(-1)


STEP_AGGREGATES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "min": aggregate_min,
    "product": aggregate_product,
    "mean": aggregate_mean,
    "last": aggregate_last,
}


def aggregate_steps(scores: Tensor, mask: Tensor, how: str) -> Tensor:
    """Outcome score of each row from its step scores: scores, mask (B, S) -> (B,) by the rule ``how``
    (``min``, ``product``, ``mean``, ``last``; see :data:`STEP_AGGREGATES`). Rows without steps are NaN."""
    if how not in STEP_AGGREGATES:
        raise ValueError(f"unknown step aggregate {how!r}; known: {sorted(STEP_AGGREGATES)}")
    out = STEP_AGGREGATES[how](scores, mask)
    return torch.where((mask != 0).any(-1), out, torch.full_like(out, float("nan")))
