"""Curriculum: draw prompts by their running pass rate, favouring prompts whose groups still vary.

A group of G responses whose rewards are all equal has zero group-relative advantage: it costs a rollout
and teaches nothing. With a running pass rate p_i per prompt, the chance that a group of a prompt carries
signal grows with p_i (1 - p_i); prompts are drawn with weight

    w_i = p_i (1 - p_i) + floor        (unseen prompts: p_i = 1/2, the largest weight)

so solved and hopeless prompts are still revisited now and then (``floor``) but rarely.
"""

from __future__ import annotations

import torch


def curriculum_weights(pass_rates: torch.Tensor, floor: float) -> torch.Tensor:
    """(n,) running pass rates, NaN = never seen -> (n,) sampling weights p (1 - p) + floor."""
    p = torch.where(torch.isnan(pass_rates), torch.full_like(pass_rates, 0.5), pass_rates)
    return p * (1 - p) + floor


def update_pass_rates(pass_rates: torch.Tensor, prompts: torch.Tensor, group_pass: torch.Tensor,
                      momentum: float) -> torch.Tensor:
    """EMA update ``p <- momentum * p + (1 - momentum) * pass`` for the drawn ``prompts`` (k,) with this
    step's pass fractions ``group_pass`` (k,); a prompt's first observation sets p directly."""
    out = pass_rates.clone()
    old = out[prompts]
    out[prompts] = torch.where(torch.isnan(old), group_pass, momentum * old + (1 - momentum) * group_pass)
    return out


def draw_prompts(weights: torch.Tensor, k: int, generator: torch.Generator) -> list[int]:
    """k distinct prompt indices drawn with probability proportional to ``weights``."""
    return torch.multinomial(weights, min(k, weights.numel()), replacement=False, generator=generator).tolist()
