"""The process group a run joins: torchrun's environment in, a :class:`World` out.

``torchrun --nproc-per-node N -m rlmt train CONFIG`` (or ``rlmt train --nproc-per-node N CONFIG``) starts N
processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set. A process
without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) is a world of one: no process group, and every collective
below returns its input, so the single-process path runs exactly the code it ran before.

Backend: ``gloo`` on CPU, ``nccl`` on CUDA, unless given. Collectives time out after ``timeout_s`` (a rank
that died or hangs ends the job with an error instead of a hang).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the job."""

    rank: int = 0  # global rank, 0 .. size - 1
    size: int = 1  # number of processes in the job (all nodes)
    local_rank: int = 0  # rank on this node (picks the GPU)
    backend: str | None = None  # "gloo" / "nccl"; None for a world of one
    device: str = "cpu"  # where this rank computes, and where collective tensors live
    waiting: Any = None  # a gloo group without a practical timeout, for ranks that wait on rank 0's work

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the records, checkpoints of replicated state and ``final/``."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def wait(self) -> None:
        """A barrier while rank 0 works alone (an evaluation, ``final/``, a checkpoint's write and checksums):
        on the :attr:`waiting` group, whose timeout is a day, not ``dist.timeout_s``. A rank that dies
        meanwhile still ends the job: torchrun stops the others."""
        if self.size > 1:
            dist.barrier(group=self.waiting)

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``values`` over ranks (in place, also returned)."""
        return self.all_reduce(values, "sum")

    def all_reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Element-wise ``op`` ("sum", "max" or "min") of ``values`` over ranks (in place, also returned)."""
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        if op not in ops:
            raise ValueError(f"op must be one of {sorted(ops)}, got {op!r}")
        if self.size > 1:
            dist.all_reduce(values, op=ops[op])
        return values

    def _scalar(self, value: float, op: Any) -> float:
        if self.size == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return float(t.item())

    def all_reduce_min(self, value: float) -> float:
        return self._scalar(value, dist.ReduceOp.MIN) if self.size > 1 else float(value)

    def all_reduce_max(self, value: float) -> float:
        return self._scalar(value, dist.ReduceOp.MAX) if self.size > 1 else float(value)

    def sum_scalar(self, value: float) -> float:
        return self._scalar(value, dist.ReduceOp.SUM) if self.size > 1 else float(value)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (picklable objects)."""
        if self.size == 1:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=torch.device(self.device) if self.backend == "nccl" else None)
        return box[0]

    def agree(self, ok: bool) -> bool:
        """True on every rank when ``ok`` is true on every rank."""
        return self.all_reduce_min(float(ok)) > 0 if self.size > 1 else bool(ok)

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` run by rank 0 alone, its result (or its exception) given to every rank.

        For what must happen once (renaming a corrupt checkpoint, probing the output directory) and whose
        outcome every rank needs; an exception on rank 0 is raised on every rank, so no rank waits for a
        collective the others never reach."""
        if self.size == 1:
            return fn()
        result: Any = None
        error: BaseException | None = None
        if self.is_main:
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised on every rank
                error = e
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0, group=self.waiting)  # rank 0's fn may take long: no timeout
        result, error = box[0]
        if error is not None:
            raise error
        return result

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def init_world(backend: str | None = None, device: str = "cpu", timeout_s: float = 600.0) -> World:
    """Join the job described by torchrun's environment; a :class:`World` of one without it.

    ``device``: "cpu" or "cuda" (the rank's GPU is ``cuda:LOCAL_RANK``). ``backend`` defaults to nccl on CUDA
    and gloo otherwise."""
    size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if size == 1:
        return World(0, 1, 0, None, device)
    if not 0 <= rank < size:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={size})")
    backend = backend or ("nccl" if device.startswith("cuda") else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    waiting = dist.new_group(backend="gloo", timeout=timedelta(days=1))
    return World(rank, size, local_rank, backend, device, waiting)


def close_world(world: World, together: bool = True) -> None:
    """Leave the process group (idempotent; nothing for a world of one). ``together``: first wait for every
    rank (gloo aborts a process whose peer tore its connections down under it); False after an error, when
    the other ranks may never arrive."""
    if world.size > 1 and dist.is_initialized():
        try:
            if together:
                dist.barrier()
        finally:
            dist.destroy_process_group()
