"""Each rank's part of a global batch. Pure functions of (global order, rank, world size).

The global order comes from one seeded generator (:mod:`rlmt.data.order`), the same on every rank, so a run
on N ranks consumes exactly the rows a run on 1 rank consumes, in the same global batches, and a resume needs
only the global position (no per-rank sampler state to drift).

Split: contiguous blocks. Rank r of N takes rows ``[r * B/N, (r + 1) * B/N)`` of each global batch of B rows.
For the online loop a unit is a *prompt group* (one prompt and its G samples), so a group never straddles two
ranks and group-relative advantages need no communication.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


class ShardError(ValueError):
    """A batch size that does not split evenly across the ranks; the message names the config key."""


def check_divisible(value: int, world_size: int, key: str) -> int:
    """``value / world_size`` (the per-rank share), or :class:`ShardError` naming ``key`` when it does not divide."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if value % world_size:
        raise ShardError(f"{key}={value} does not divide across {world_size} processes; use a multiple of "
                         f"{world_size}")
    return value // world_size


def shard_rows(batch: Sequence[T], rank: int, world_size: int, key: str = "batch") -> list[T]:
    """Rank ``rank``'s contiguous block of one global batch (``len(batch)`` must divide by ``world_size``)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    per_rank = check_divisible(len(batch), world_size, key)
    return list(batch[rank * per_rank:(rank + 1) * per_rank])


def shard_groups(num_groups: int, rank: int, world_size: int, key: str = "rollout.prompts_per_step") -> range:
    """The prompt-group indices (positions in the global step's prompt list) rank ``rank`` rolls out and scores."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    per_rank = check_divisible(num_groups, world_size, key)
    return range(rank * per_rank, (rank + 1) * per_rank)
