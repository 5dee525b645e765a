"""Scalar heads on a causal LM's final hidden states: PPO's value head, the outcome reward head, the
process (per-step) head. Each maps (..., H) -> (...,) in float32, whatever the trunk's dtype."""

from __future__ import annotations

from torch import Tensor, nn


class ValueHead(nn.Module):
    """``V(s_t) = w^T h_t + b`` on the policy's final hidden states: (..., H) -> (...,) float32.

    Initialised to w = 0, b = 0, so every value starts at 0 and the value loss sends no gradient into the
    trunk before the head has learned something. Kept in float32 whatever the policy's dtype.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.linear(hidden.float()).squeeze(-1)


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


class ProcessHead(ValueHead):
    """Step logit ``w^T h + b`` on final hidden states: (..., H) -> (...,) float32; the same zero-initialised
    linear head as PPO's value head, so every step scores 0.5 before training."""
