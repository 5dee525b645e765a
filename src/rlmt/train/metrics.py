"""One reduction for the metrics of an update made of micro-batches and optimizer steps.

Each micro-batch reports its metrics with a weight (its tokens, pairs or labelled steps). By the key's name:

- ``*_max``: the maximum over all micro-batches (a max of maxima is the max of the whole update);
- ``*_min``: the minimum;
- ``*loss``: each micro-batch holds its *share* of its optimizer step's loss (the micro-batch loss is divided
  by the step's global normalizer, :func:`rlmt.objectives.aggregate.loss_normalizer`), so shares are summed
  within a step, and the steps' losses averaged;
- anything else: the mean over micro-batches weighted by their weights, which equals the metric computed over
  the whole update at once for any per-token (per-pair, per-step) mean.

So the reduced figures do not depend on how the update was split into micro-batches, nor (with
:meth:`MetricReduction.result_across`) across how many ranks: weighted sums and weights are summed over ranks,
extremes maxed or mined, and the loss shares summed (each rank's share is of the *global* normalizer), while
the step count is the same on every rank.
"""

from __future__ import annotations

from typing import Any

import torch


class MetricReduction:
    """Accumulates micro-batch metrics; :meth:`end_step` after each optimizer step, :meth:`result` at the end."""

    def __init__(self) -> None:
        self.weighted: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.extreme: dict[str, float] = {}
        self.step_loss: dict[str, float] = {}
        self.loss_sum: dict[str, float] = {}
        self.steps = 0

    def add(self, metrics: dict[str, float], weight: float = 1.0) -> None:
        """One micro-batch's metrics, weighted by ``weight`` (> 0) in the means."""
        for k, v in metrics.items():
            v = float(v)
            if k.endswith("_max"):
                self.extreme[k] = max(self.extreme.get(k, v), v)
            elif k.endswith("_min"):
                self.extreme[k] = min(self.extreme.get(k, v), v)
            elif k.endswith("loss"):
                self.step_loss[k] = self.step_loss.get(k, 0.0) + v
            else:
                self.weighted[k] = self.weighted.get(k, 0.0) + v * weight
                self.weights[k] = self.weights.get(k, 0.0) + weight

    def end_step(self) -> None:
        """Close an optimizer step: its loss shares become one step's loss."""
        for k, v in self.step_loss.items():
            self.loss_sum[k] = self.loss_sum.get(k, 0.0) + v
        self.step_loss = {}
        self.steps += 1

    def result(self) -> dict[str, float]:
        """The reduced metrics (an unclosed step counts as one)."""
        if self.step_loss:
            self.end_step()
        out = {k: v / self.weights[k] for k, v in self.weighted.items() if self.weights[k] > 0}
        out.update(self.extreme)
        out.update({k: v / max(self.steps, 1) for k, v in self.loss_sum.items()})
        return out

    def result_across(self, world: Any) -> dict[str, float]:
        """:meth:`result` over every rank of ``world`` (a :class:`rlmt.parallel.World`); the same on all ranks.

        A key reported on some ranks only is reduced over the ranks that have it."""
        if world.size == 1:
            return self.result()
        if self.step_loss:
            self.end_step()
        names = world.all_gather_object((sorted(self.weighted), sorted(k for k in self.extreme if k.endswith("_max")),
                                         sorted(k for k in self.extreme if k.endswith("_min")), sorted(self.loss_sum)))
        weighted, maxed, mined, losses = (sorted(set().union(*(n[i] for n in names))) for i in range(4))
        dev = torch.device(world.device)
        sums = torch.tensor([self.weighted.get(k, 0.0) for k in weighted] + [self.weights.get(k, 0.0) for k in weighted]
                            + [self.loss_sum.get(k, 0.0) for k in losses], dtype=torch.float64, device=dev)
        world.all_reduce(sums, "sum")
        inf = float("inf")
        highs = torch.tensor([self.extreme.get(k, -inf) for k in maxed], dtype=torch.float64, device=dev)
        lows = torch.tensor([self.extreme.get(k, inf) for k in mined], dtype=torch.float64, device=dev)
        if maxed:
            world.all_reduce(highs, "max")
        if mined:
            world.all_reduce(lows, "min")
        s = sums.tolist()
        n = len(weighted)
        out = {k: s[i] / s[n + i] for i, k in enumerate(weighted) if s[n + i] > 0}
        out.update(zip(maxed, highs.tolist()))
        out.update(zip(mined, lows.tolist()))
        out.update({k: s[2 * n + i] / max(self.steps, 1) for i, k in enumerate(losses)})
        return out


COUNTS = frozenset({"reward/unscored", "groups/zero_variance", "guard/flagged", "guard/content_free",
                    "reward/missing_as_zero", "rollout/tokens", "train/sequence_tokens", "train/packed_tokens",
                    "env/tool_calls", "env/tool_errors", "env/truncated", "env/errors"})
"""Per-rank figures that are counts over the rank's share of the step: summed across ranks."""


def reduce_across(world: Any, metrics: dict[str, float]) -> dict[str, float]:
    """Per-rank step figures -> the step's: :data:`COUNTS` and the critic's counters summed, ``*_max`` maxed, ``*_min`` mined,
    ``time/*`` and ``*/seconds`` maxed (the slowest rank is the step's time), anything else the mean over the
    ranks that report it (each rank holds the same number of prompt groups, so a per-sequence mean is exact;
    a per-token mean is weighted by sequences, not tokens). The same on every rank; ``metrics`` on one process."""
    if world.size == 1:
        return metrics
    everyone = world.all_gather_object({k: float(v) for k, v in metrics.items()})
    out: dict[str, float] = {}
    for k in dict.fromkeys(k for m in everyone for k in m):  # every rank's keys, in order
        vals = [m[k] for m in everyone if k in m]
        if k in COUNTS or (k.startswith("critic/") and not k.endswith("_rate")):  # the critic's counters
            out[k] = sum(vals)
        elif k.endswith("_max") or k.startswith("time/") or k.endswith("/seconds"):
            out[k] = max(vals)
        elif k.endswith("_min"):
            out[k] = min(vals)
        else:
            out[k] = sum(vals) / len(vals)
    return out
