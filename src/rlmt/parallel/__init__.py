"""Scale-out on ``torch.distributed``: the process group a run joins, how its data is split across ranks,
and the checks that every rank runs the same job.

- :mod:`rlmt.parallel.world`: :class:`World` (rank, world size, backend, device) from torchrun's
  environment, and the collectives the loops use (no-ops on one process).
- :mod:`rlmt.parallel.shard`: pure functions that give each rank its part of a global batch (rows for the
  offline loop, whole prompt groups for the online loop) from one seeded global order.
- :mod:`rlmt.parallel.grads`: the gradients of every rank summed once per optimizer step (data parallel
  over replicated weights).
- :mod:`rlmt.parallel.consistency`: a digest of the resolved config, compared across ranks before any step.
"""

from rlmt.parallel.consistency import check_same_config, config_digest
from rlmt.parallel.grads import all_reduce_gradients, broadcast_weights
from rlmt.parallel.shard import check_divisible, shard_groups, shard_rows
from rlmt.parallel.world import World, close_world, init_world

__all__ = ["World", "all_reduce_gradients", "broadcast_weights", "check_divisible", "close_world", "check_same_config", "config_digest", "init_world", "shard_groups",
           "shard_rows"]
