"""FSDP2 (``model.parallel: fsdp``): each decoder layer's weights, gradients and AdamW moments sharded across
the ranks with ``torch.distributed.fsdp.fully_shard``.

What is sharded: every decoder layer (``model.get_decoder().layers``), each its own FSDP unit: its weights
are gathered before its forward and freed after, its gradient reduce-scattered after its backward, so a rank
holds 1/N of the layers' weights, gradients and optimizer moments between passes. What stays replicated:
the embeddings, the final norm and the output layer, and any head (PPO's value head, a reward model's score
head). The loops reach those outside the model's own forward (the chunked output layer with its hand-written
backward, the packed prompt-group pass), where FSDP's root hooks would not run; their gradients are summed
across ranks like DDP's (:func:`rlmt.parallel.all_reduce_gradients`). The layers are most of a model's
weights (SmolLM2-135M: 106M of 135M; a 7B Llama: 6.5B of 6.7B).

The arithmetic is the replicated one: FSDP's reduce-scatter *averages* over ranks, so the sharded gradients
are multiplied back by N (:func:`rlmt.parallel.all_reduce_gradients`) and every gradient is the sum of the
ranks' shares of the global loss, as with DDP. The frozen reference model's layers are sharded the same way. The global norm for clipping adds the squared norms of the local shards over
ranks to those of the replicated gradients (:func:`global_grad_norm`).

FSDP's forward hooks all-gather a layer on every rank at once, so the ranks must run the same passes. What
runs on one rank alone or a different number of times per rank (sampling: each rank's rows finish at their
own step; the evaluation on rank 0; writing ``final/``) runs inside :func:`gathered`, where every layer is
gathered once and the hooks do nothing. The update's micro-batches are made equal in number across ranks by
the loops (a rank with fewer runs zero-weight passes).

Mixed precision follows ``model.autocast`` (layers compute in that dtype, gradients reduced in float32);
``model.fsdp_cpu_offload`` keeps the sharded weights, gradients and moments in CPU memory (GPU runs).
Checkpoints are ``torch.distributed.checkpoint`` directories (:func:`save_sharded`, :func:`load_sharded`):
every rank writes its shards; resume needs the same number of ranks.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from rlmt.parallel.world import World


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (``model.get_decoder().layers``)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"model.parallel=fsdp: cannot find the decoder layers of {type(model).__name__} "
                         "(expected model.get_decoder().layers)")
    return layers


def shard_layers(model: nn.Module, world: World, param_dtype: torch.dtype | None = None,
                 cpu_offload: bool = False) -> int:
    """``fully_shard`` every decoder layer of ``model`` over ``world`` (in place); returns the number of layers.

    Call it after any copy of the full weights is taken (the reference model) and before the optimizer is
    built (the optimizer must hold the sharded parameters)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(torch.device(world.device).type, (world.size,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mesh": mesh, "reshard_after_forward": True,
              "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy()}
    if mp is not None:
        kwargs["mp_policy"] = mp
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, **kwargs)
    return len(layers)


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` wrapped."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    return bool(fsdp_units(model))


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Every sharded layer of ``model`` gathered whole on every rank for the block (a collective: every rank
    enters), and no FSDP communication inside it, so ranks may run different passes there. Nothing on a
    model that is not sharded."""
    units = fsdp_units(model)
    for u in units:
        u.unshard()
        u.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for u in units:
            u.set_reshard_after_forward(True, recurse=False)
            u.reshard()


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def global_grad_norm(world: World, params: list[nn.Parameter]) -> torch.Tensor:
    """The 2-norm of every gradient, the sharded ones (local shards, squared norms summed over ranks) and the
    replicated ones (the same on every rank) together; float64 scalar on the CPU."""
    DTensor = _dtensor_type()
    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is None:
            continue
        if isinstance(p.grad, DTensor):
            sharded += torch.linalg.vector_norm(p.grad.to_local().double()).cpu() ** 2
        else:
            replicated += torch.linalg.vector_norm(p.grad.double()).cpu() ** 2
    sharded = world.all_reduce(sharded.reshape(1).to(world.device), "sum").cpu()[0]
    return torch.sqrt(sharded + replicated)


def clip_grad_norm(world: World, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """:func:`torch.nn.utils.clip_grad_norm_` over sharded and replicated gradients: scale every gradient by
    ``min(1, max_norm / (norm + 1e-6))``; returns the norm before clipping (float32 scalar)."""
    norm = global_grad_norm(world, params)
    if torch.isfinite(norm) and max_norm < float("inf"):
        coef = min(1.0, float(max_norm) / (float(norm) + 1e-6))
        if coef < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
    return norm.float()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole weights on rank 0, in CPU memory (an empty dict on the other ranks); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer | None, directory: Path) -> None:
    """The model's and the optimizer's state, each rank its shards, as one ``torch.distributed.checkpoint``
    directory (a collective: every rank calls it with the same ``directory``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=str(directory))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer | None, directory: Path) -> None:
    """Load what :func:`save_sharded` wrote into ``model`` and ``optimizer`` (same number of ranks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
