"""Every rank must run the same job: a digest of the resolved config, compared across ranks at start-up.

Ranks resolve the config on their own (each reads the YAML and the overrides), so a file that differs between
machines, or an override given to one node only, would silently train different models on different ranks.
Rank 0's digest is broadcast and each rank compares it with its own; a mismatch stops every rank before any
step with the keys that differ on that rank.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from rlmt.parallel.world import World


class ConfigMismatch(RuntimeError):
    """Ranks resolved different configs; the message names the rank and the differing keys."""


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def config_digest(config: dict) -> str:
    """sha256 of the config's canonical JSON (sorted keys; values that are not JSON as their ``repr``)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def check_same_config(world: World, config: dict, ignore: tuple[str, ...] = ()) -> None:
    """Raise :class:`ConfigMismatch` on every rank if any rank's ``config`` differs from rank 0's.

    ``ignore`` lists dotted keys allowed to differ (none by default). On one process this does nothing."""
    if world.size == 1:
        return
    flat = {k: v for k, v in _flat(config).items() if k not in ignore}
    digest = config_digest(flat)
    reference = world.broadcast_object((digest, flat))
    mismatch = [k for k in sorted(set(flat) | set(reference[1])) if flat.get(k) != reference[1].get(k)]
    agree = world.all_reduce_min(float(not mismatch))
    if mismatch:
        shown = ", ".join(f"{k}={flat.get(k)!r} (rank 0: {reference[1].get(k)!r})" for k in mismatch[:8])
        raise ConfigMismatch(f"rank {world.rank} resolved a different config than rank 0: {shown}")
    if agree < 1.0:
        raise ConfigMismatch(f"rank {world.rank}: another rank resolved a different config than rank 0 "
                             "(its error names the keys)")
