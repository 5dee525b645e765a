"""Atomic checkpoints with everything needed to resume exactly.

``checkpoints/step-N/`` holds the model weights (only the trainable adapters with LoRA), optimizer and
scheduler states, every RNG state, and ``state.json`` (step, data position and the method's own counters).
It is written to a temporary sibling, flushed to disk, and renamed into place: a directory named ``step-N``
is always complete, and a run killed mid-write leaves the previous checkpoint untouched.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step-(\d+)$")


def capture_rng() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint must hold: all of them, or only the trainable ones with LoRA."""
    if getattr(model, "peft_config", None):
        return {k: v for k, v in model.named_parameters() if v.requires_grad}
    return model.state_dict()


def write_model_weights(model: torch.nn.Module, path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in trainable_state(model).items()}
    # tied weights appear under two names; keep one copy of each storage
    seen: dict[int, str] = {}
    unique, aliases = {}, {}
    for k, v in state.items():
        key = v.untyped_storage().data_ptr() if v.numel() else id(v)
        if key in seen:
            aliases[k] = seen[key]
        else:
            seen[key] = k
            unique[k] = v
    torch.save({"tensors": unique, "aliases": aliases}, path)


def read_model_weights(model: torch.nn.Module, path: Path) -> None:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    state = dict(blob["tensors"])
    for alias, src in blob["aliases"].items():
        state[alias] = state[src]
    strict = not getattr(model, "peft_config", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or (strict and missing):
        raise RuntimeError(f"checkpoint {path} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler: Any, state: dict[str, Any], keep: int = 2,
                    extra_modules: dict[str, torch.nn.Module] | None = None) -> Path:
    """Write ``run_dir/checkpoints/step-{step}`` atomically; prune to the ``keep`` newest.

    ``extra_modules`` (e.g. PPO's value head) are saved beside the model as ``{name}.pt``.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step}-", dir=root))
    write_model_weights(model, tmp / "model.pt")
    for name, module in (extra_modules or {}).items():
        torch.save(module.state_dict(), tmp / f"{name}.pt")
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(capture_rng(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
    _fsync_tree(tmp)
    if target.exists():  # a re-save of the same step (e.g. final == last periodic): replace it
        shutil.rmtree(target)
    os.replace(tmp, target)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):  # leftovers of a killed write
        shutil.rmtree(stale, ignore_errors=True)
    return target


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints in step order (partial writes live under ``.tmp-*`` names and are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / "state.json").exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler: Any, extra_modules: dict[str, torch.nn.Module] | None = None) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG states; return ``state.json``."""
    path = Path(path)
    read_model_weights(model, path / "model.pt")
    for name, module in (extra_modules or {}).items():
        module.load_state_dict(torch.load(path / f"{name}.pt", map_location="cpu", weights_only=True))
    if optimizer is not None and (path / "optimizer.pt").exists():
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    if scheduler is not None and (path / "scheduler.pt").exists():
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    restore_rng(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "state.json").read_text())
