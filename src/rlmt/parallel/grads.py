"""Data parallelism over replicated weights: each rank's gradient of its share of the global loss, summed
across ranks once per optimizer step.

Every rank holds the whole model (DDP's layout). A micro-batch's loss is its units' loss divided by the
*global* normalizer (the step's tokens, pairs or sequences over all ranks, :func:`rlmt.objectives.aggregate`),
so the sum over ranks of the accumulated gradients is the gradient of the global batch's loss, the gradient a
single process computes over the same batch (up to the order of the floating-point sums). After the sum every
rank holds the same gradient, so the clip on the global norm, AdamW and the schedule do the same step
everywhere and the weights stay identical without being sent.

This is DDP's arithmetic with its ``no_sync`` over gradient accumulation (one all-reduce per optimizer step,
not per micro-batch), without the ``DistributedDataParallel`` wrapper: the loops reach the model through
paths the wrapper's forward hooks do not see (the packed prompt-group pass, the functional decoder, the
hand-written output-layer backward), and a wrapper that misses a forward silently skips its reduction. The
gradients are flattened into buckets of ``bucket_mb`` and all-reduced one bucket at a time; a parameter that
got no gradient on any rank keeps ``grad = None`` (so AdamW leaves its moments alone, as on one process).

Parameters sharded by FSDP2 (``model.parallel: fsdp``, :mod:`rlmt.parallel.fsdp`) had their gradients
reduce-scattered in backward, averaged over the ranks: they are only scaled back to the sum here.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from rlmt.parallel.world import World


def all_reduce_gradients(world: World, params: Iterable[torch.nn.Parameter], bucket_mb: float = 25.0) -> None:
    """Sum ``p.grad`` over the ranks of ``world`` for every parameter that requires grad (in place).

    Every rank must pass the same parameters in the same order (the model's own ``parameters()``). A missing
    gradient counts as zeros; where no rank had one, it stays None. Nothing happens on one process."""
    if world.size == 1:
        return
    from torch.distributed.tensor import DTensor

    params = [p for p in params if p.requires_grad]
    for p in params:
        if isinstance(p, DTensor) and p.grad is not None:
            p.grad.mul_(world.size)  # FSDP's reduce-scatter averaged: back to the sum
    params = [p for p in params if not isinstance(p, DTensor)]
    has = torch.tensor([float(p.grad is not None) for p in params], dtype=torch.float32, device=world.device)
    world.all_reduce(has, "max")
    live = [p for p, h in zip(params, has.tolist()) if h > 0]
    limit = max(1, int(bucket_mb * 2**20))
    bucket: list[torch.nn.Parameter] = []
    size = 0
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        bucket.append(p)
        size += p.numel() * p.grad.element_size()
        if size >= limit:
            _reduce_bucket(world, bucket)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(world, bucket)


def _reduce_bucket(world: World, bucket: list[torch.nn.Parameter]) -> None:
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in bucket:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for ps in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        world.all_reduce(flat, "sum")
        offset = 0
        for p in ps:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


def broadcast_weights(world: World, module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (in place), so the replicas start identical even where a
    rank built them differently (a head initialised from another RNG state, a model file that changed between
    the ranks' reads). Before any sharding; nothing happens on one process."""
    if world.size == 1:
        return
    tensors = [t for t in list(module.parameters()) + list(module.buffers()) if t.numel()]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in dict.fromkeys(tensors):  # tied weights once
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in ts]).to(world.device)
        torch.distributed.broadcast(flat, src=0)
        offset = 0
        with torch.no_grad():
            for t in ts:
                n = t.numel()
                t.copy_(flat[offset:offset + n].view_as(t))
                offset += n
