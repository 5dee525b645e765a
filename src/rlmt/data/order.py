"""The order rows are read in: a seeded permutation per epoch, a pure function of (seed, epoch), so the data
position of any step is known without replaying the run (resume is exact)."""

from __future__ import annotations

import torch


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """(n,) the row order of ``epoch``: ``randperm(n)`` from a generator seeded by (seed, epoch), or 0..n-1."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def step_indices(step: int, per_step: int, n: int, seed: int, shuffle: bool) -> list[int]:
    """Dataset indices of step ``step`` (``per_step`` rows a step, epochs of n rows read in order, an epoch's
    remainder continuing into the next). A pure function of (step, seed)."""
    out, orders = [], {}
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(k, n)
        if epoch not in orders:
            orders[epoch] = epoch_order(n, seed, epoch, shuffle)
        out.append(int(orders[epoch][offset]))
    return out
