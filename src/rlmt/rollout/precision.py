"""Mixed precision: float32 weights, gradients and optimizer state; forward passes in bfloat16 (autocast).

``model.autocast`` picks it (:func:`autocast_dtype`). The run keeps the choice beside the model
(``LoadedModel.autocast``, ``Reference.autocast``, ``UpdateContext.autocast``) and passes it to every
forward pass it runs: the reference pass and the training passes open
:func:`compute_autocast` (:mod:`rlmt.rollout.logprobs`); the rollout samples from a bfloat16 copy of the weights
(the functional decoder's own for the Llama family, :mod:`rlmt.rollout.decode`; else :func:`sampling_weights`). Backward runs outside autocast, as it requires;
gradient checkpointing replays a layer under the autocast state of its first pass.

The output projection and log-softmax that turn hidden states into log-probs stay in the weights' dtype
(:func:`rlmt.rollout.logprobs.scored_positions` turns autocast off there), because they enter every ratio and KL
directly. Measured on SmolLM2-135M against float32 log-probs (the GRPO benchmark's batch): mean |error|
0.016 nats with the float32 head, 0.029 with a bfloat16 one. Packed attention also runs in float32
(:mod:`rlmt.rollout.attention`: CPU flash attention's bfloat16 backward was 3x slower).

Measured on a 2-core CPU with AMX (SmolLM2-135M, the GRPO benchmark's step): square bfloat16 products run
at ~1.7 TFLOP/s against ~250 GFLOP/s in float32; decode GEMMs at 8-32 rows run ~3x faster. On a CPU without
bfloat16 matrix units autocast is slower than float32, which is why ``auto`` checks for AMX.
"""

from __future__ import annotations

import contextlib
import functools

import torch


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware: a CUDA GPU that supports bfloat16, or
    a CPU with AMX tiles (Intel Sapphire Rapids and later)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private: absent in some builds
        return bool(probe()) if probe is not None else False
    return False


@functools.lru_cache(maxsize=None)
def bf16_slowdown(n: int = 512, reps: int = 3) -> float:
    """Measured on this CPU now: the time of an n x n x n bfloat16 matrix product over float32's (best of
    ``reps`` after a warm-up; ~0.1 s where bfloat16 is emulated). Below 1 where bfloat16 runs faster; on CPUs
    that emulate it, tens of times above."""
    import time

    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        return min(times)

    return best(torch.bfloat16) / max(best(torch.float32), 1e-9)


def slow_bf16_warning(setting: str, device: torch.device | str) -> str | None:
    """For ``model.autocast=bfloat16`` on a CPU without bfloat16 matrix units: one line with the measured
    slowdown and what to use instead, when bfloat16 products are slower than float32 here; else None."""
    if setting != "bfloat16" or torch.device(device).type != "cpu" or native_bf16(device):
        return None
    slowdown = bf16_slowdown()
    if slowdown <= 1.2:
        return None
    return (f"model.autocast=bfloat16: this CPU has no bfloat16 matrix units and a bfloat16 matrix product ran "
            f"{slowdown:.1f}x slower than float32 here; model.autocast=none (or auto, which picks none here) is "
            "faster")


def autocast_dtype(setting: str, device: torch.device | str) -> torch.dtype | None:
    """``model.autocast`` -> the dtype forward passes run in, or None (no autocast).

    'none' -> None; 'bfloat16' -> torch.bfloat16 on any device; 'auto' -> torch.bfloat16 where
    :func:`native_bf16` holds, else None.
    """
    if setting == "none":
        return None
    if setting == "bfloat16":
        return torch.bfloat16
    if setting == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    raise ValueError(f"model.autocast: expected 'none', 'bfloat16' or 'auto', got {setting!r}")


def compute_autocast(model: torch.nn.Module, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """The autocast context for one forward pass of ``model`` to ``dtype`` (None: a no-op). Each weight is
    cast where it is used: autocast's cache would only keep a bfloat16 copy of the model alive until the pass
    ends, since a forward pass uses each weight once."""
    if dtype is None:
        return contextlib.nullcontext()
    device = next(model.parameters()).device
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


@contextlib.contextmanager
def sampling_weights(model: torch.nn.Module, dtype: torch.dtype | None):
    """For a rollout through the model's own forward (models :class:`rlmt.rollout.decode.LlamaDecoder` does not
    support): while open, ``model``'s floating-point parameters hold their autocast dtype (a cast copy); on exit the original tensors are put back, bit for bit, whatever happened inside. A no-op unless
    ``dtype`` is set.

    A decode step under autocast would cast every activation, run rotary in float32 and cast the whole
    float32 key cache down again at every step; sampling from a bfloat16 copy of the weights does none of
    that (measured on SmolLM2-135M, 32 rows: ~1.4x float32's tokens/s under autocast, ~1.7x with the copy).
    The copy costs one cast of the weights per rollout and, while the rollout runs, the memory autocast's
    weight cache would take. The sampler's log-probs are then those of a bfloat16 model; on-policy updates
    take their ratio against the training pass (:mod:`rlmt.train.update`).
    """
    if dtype is None:
        yield model
        return
    originals: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
    try:
        for p in model.parameters():  # tied weights are one Parameter: cast once
            if p.is_floating_point() and p.dtype != dtype and id(p) not in originals:
                originals[id(p)] = (p, p.data)
                p.data = p.data.to(dtype)
        yield model
    finally:
        for p, data in originals.values():
            p.data = data
