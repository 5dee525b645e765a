"""Atomic, verified checkpoints with everything needed to resume exactly.

``checkpoints/step-N/`` is a Hugging Face model directory: ``model.safetensors`` (a tied output projection
stored once, as ``save_pretrained`` writes it), ``config.json``, ``generation_config.json`` and the tokenizer,
so ``AutoModelForCausalLM.from_pretrained(step_dir)`` (and ``rlmt eval model.name=step_dir``) loads the policy
at that step. With LoRA it is a peft adapter directory instead (``adapter_model.safetensors`` with the trainable
adapters only, ``adapter_config.json``, the tokenizer): ``PeftModel.from_pretrained(base, step_dir)``. A
``model.parallel=fsdp`` run keeps each rank's shards of the weights and the optimizer under ``sharded/``
(torch.distributed.checkpoint), not a model directory. Beside the model: optimizer and scheduler states, every
RNG state, ``state.json`` (step, data position and the method's own counters), ``run.json`` (the run's config
and data fingerprints, for the resume check of :mod:`rlmt.config.changes`) and, written last,
``manifest.json``: the size and sha256 of every other file. The directory is written to a temporary sibling,
its files given the modes ``mkdir`` and ``open`` give under the umask, flushed to disk, the manifest written
(atomically, then flushed), and renamed into place.

A directory named ``step-N`` is complete when its manifest verifies (:func:`verify_checkpoint`): every file
listed, none shorter, longer or different. That catches what the atomic rename cannot: a file cut or altered
after the write (a full disk on a non-atomic filesystem, a partial copy, a bad block). A checkpoint without a
manifest (cut off before it, or written before checkpoints carried one) is not complete; one known to be
good can be adopted with :func:`write_manifest`. The manifest reads every byte back once, and verifying once
more at resume: measured 1.8 s each for a 1.5 GiB checkpoint the size of SmolLM2-135M's float32 weights and
AdamW moments, beside 5.7-9.4 s for ``torch.save`` + fsync of the same files (2-core CPU machine).

Loading restores the optimizer's moments and step counts and the schedule's position, but the
hyperparameters (learning rate, betas, eps, weight decay and the schedule's peak) are the ones the optimizer
was built with from the current config, so a config change allowed on resume is the one in effect; with an
unchanged config they are the same numbers and resume stays bit-exact.
"""

from __future__ import annotations

import hashlib
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

from rlmt.records import as_made_by_mkdir, as_made_by_umask, save_pretrained_quietly

_STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
SHARDED = "sharded"  # the torch.distributed.checkpoint directory of a model.parallel=fsdp run
ADAPTER_CONFIG = "adapter_config.json"  # peft's: the checkpoint of a LoRA run
ADAPTER_WEIGHTS = "adapter_model.safetensors"
WEIGHTS, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"  # transformers' (one file or shards)
LEGACY_WEIGHTS = "model.pt"  # checkpoints written before they were model directories


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


def write_model(model: torch.nn.Module, tokenizer: Any, directory: Path) -> None:
    """``model.save_pretrained(directory)`` (a peft model writes its adapters only) and the tokenizer beside it."""
    save_pretrained_quietly(model, directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def _mismatch(directory: Path, missing: list[str], unexpected: list[str]) -> RuntimeError:
    return RuntimeError(f"checkpoint {directory} does not match the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")


def read_model(model: torch.nn.Module, directory: Path) -> None:
    """Load the weights :func:`write_model` wrote (or a legacy ``model.pt``) into ``model``, exactly.

    A whole model: every tensor of the model must be in the files, or share its storage with one that is (the
    tied output projection). LoRA: the adapters in the file must be exactly the model's."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if (directory / ADAPTER_CONFIG).exists():
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        state = load_file(directory / ADAPTER_WEIGHTS)
        expected = set(get_peft_model_state_dict(model, save_embedding_layers=False))
        if set(state) != expected:
            raise _mismatch(directory, sorted(expected - set(state)), sorted(set(state) - expected))
        set_peft_model_state_dict(model, state)
        return
    if (directory / LEGACY_WEIGHTS).exists():
        blob = torch.load(directory / LEGACY_WEIGHTS, map_location="cpu", weights_only=True)
        state = dict(blob["tensors"])
        state.update({alias: state[src] for alias, src in blob["aliases"].items()})
    elif (directory / WEIGHTS_INDEX).exists():
        shards = sorted(set(json.loads((directory / WEIGHTS_INDEX).read_text())["weight_map"].values()))
        state = {k: v for shard in shards for k, v in load_file(directory / shard).items()}
    else:
        state = load_file(directory / WEIGHTS)
    peft = bool(getattr(model, "peft_config", None))
    missing, unexpected = model.load_state_dict(state, strict=False)
    own = model.state_dict()
    loaded = {own[k].untyped_storage().data_ptr() for k in state if k in own}
    untied = [k for k in missing if own[k].untyped_storage().data_ptr() not in loaded]
    if unexpected or (untied and not peft):
        raise _mismatch(directory, untied, unexpected)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    """Every file the manifest vouches for: all but the manifest and dot-files at the top (its temporary);
    dot-files below it count (``sharded/.metadata`` of a sharded checkpoint)."""
    return sorted(f for f in directory.rglob("*") if f.is_file() and f.name != MANIFEST
                  and not (f.parent == directory and f.name.startswith(".")))


def write_manifest(directory: Path) -> Path:
    """Write ``directory/manifest.json``: {"files": {relative path: {"bytes", "sha256"}}} of every other file,
    through a temporary file renamed into place and flushed (so a manifest is whole or absent)."""
    directory = Path(directory)
    files = {f.relative_to(directory).as_posix(): {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
             for f in _files(directory)}
    tmp = directory / f".{MANIFEST}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, directory / MANIFEST)
    _fsync_dir(directory)
    return directory / MANIFEST


def verify_checkpoint(path: Path) -> str | None:
    """None when ``path`` is a complete checkpoint (its manifest verifies), else what is wrong with it, in words:
    no or unreadable manifest, a file missing, of the wrong size, or whose sha256 differs."""
    path = Path(path)
    try:
        listed = json.loads((path / MANIFEST).read_text())["files"]
        assert isinstance(listed, dict) and listed
    except FileNotFoundError:
        return f"no {MANIFEST} (cut off before it was written, or written before checkpoints carried one)"
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return f"{MANIFEST} is unreadable"
    for name, want in listed.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != want.get("bytes"):
            return f"{name} is {size} bytes, the manifest says {want.get('bytes')}"
        if file_sha256(f) != want.get("sha256"):
            return f"{name} does not match its sha256 in the manifest"
    return None


def checkpoint_tmp(run_dir: Path, step: int) -> Path:
    """A fresh temporary directory beside the checkpoints, where step ``step`` is written before its rename."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    return as_made_by_mkdir(Path(tempfile.mkdtemp(prefix=f".tmp-step-{step}-", dir=root)))


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None,
                    scheduler: Any, state: dict[str, Any], keep: int = 2,
                    extra_modules: dict[str, torch.nn.Module] | None = None,
                    record: dict[str, Any] | None = None, tmp: Path | None = None,
                    rank_rngs: list[dict[str, Any]] | None = None, tokenizer: Any = None) -> Path:
    """Write ``run_dir/checkpoints/step-{step}`` atomically, its manifest last; prune to the ``keep`` newest.

    ``model`` (a transformers causal LM, or a peft model over one) and ``tokenizer`` are written as a model
    directory (:func:`write_model`); ``extra_modules`` (e.g. PPO's value head) beside them as ``{name}.pt``;
    ``record`` (the run's config and data fingerprints, :func:`rlmt.train.session.run_record`) as ``run.json``.
    ``tmp``: a directory from :func:`checkpoint_tmp` that already holds part of the checkpoint (the sharded
    state every rank wrote, :func:`rlmt.parallel.fsdp.save_sharded`; then ``model`` and ``optimizer`` are
    None). ``rank_rngs``: on several ranks, every rank's RNG states (:func:`capture_rng`), rank r's written as
    ``rng-r.pt`` (r > 0).
    """
    root = Path(run_dir) / "checkpoints"
    target = root / f"step-{step}"
    tmp = tmp if tmp is not None else checkpoint_tmp(run_dir, step)
    if model is not None:
        write_model(model, tokenizer, tmp)
    for name, module in (extra_modules or {}).items():
        torch.save(module.state_dict(), tmp / f"{name}.pt")
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(capture_rng(), tmp / "rng.pt")
    for r, rng in enumerate(rank_rngs or []):
        if r > 0:
            torch.save(rng, tmp / f"rng-{r}.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
    if record is not None:
        (tmp / "run.json").write_text(json.dumps(record, indent=1, default=str))
    as_made_by_umask(tmp)
    _fsync_tree(tmp)
    write_manifest(tmp)  # last: a manifest vouches for files already on disk
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
    """The ``step-N`` checkpoint directories in step order, by name (writes in progress live under ``.tmp-*``
    names and are ignored); whether one is complete is :func:`verify_checkpoint`'s question."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint of ``run_dir`` (None if there is none) and, newest first, the newer ones
    that are not complete, each with what is wrong with it."""
    bad = []
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, bad
        bad.append((path, problem))
    return None, bad


def set_aside(path: Path) -> Path:
    """Rename a checkpoint that failed verification to ``step-N.corrupt`` (``.corrupt-2``, ...): kept for
    inspection, out of the resume and pruning order."""
    path = Path(path)
    target, k = path.with_name(f"{path.name}.corrupt"), 1
    while target.exists():
        k += 1
        target = path.with_name(f"{path.name}.corrupt-{k}")
    os.replace(path, target)
    return target


def _fresh_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def _apply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: Any, fresh: list[dict[str, Any]]) -> None:
    """Put the optimizer's configured hyperparameters back after loading a state, and the learning rate the
    configured schedule gives at the loaded step (a LambdaLR: ``initial_lr * lambda(last_epoch)``)."""
    if len(fresh) != len(optimizer.param_groups):
        raise RuntimeError(f"checkpoint has {len(optimizer.param_groups)} parameter groups, the run {len(fresh)}")
    for group, hyper in zip(optimizer.param_groups, fresh):
        group.update(hyper)
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if scheduler is None or lambdas is None:
        return
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    lrs = [base * lam(scheduler.last_epoch) for base, lam in zip(scheduler.base_lrs, lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler: Any, extra_modules: dict[str, torch.nn.Module] | None = None,
                    trainable: torch.nn.Module | None = None, rank: int = 0) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG states; return ``state.json``. The optimizer keeps the
    hyperparameters it was built with (see the module docstring); ``path`` is expected to have been verified
    (:func:`verify_checkpoint`). ``trainable``: the module the optimizer steps (the model, or the model and its
    heads), whose state a sharded checkpoint holds. ``rank``: whose RNG states to restore (``rng-r.pt``)."""
    path = Path(path)
    fresh = _fresh_hyperparameters(optimizer) if optimizer is not None else []
    if (path / SHARDED).is_dir():  # model.parallel=fsdp: every rank reads its shards (a collective)
        from rlmt.parallel.fsdp import load_sharded

        load_sharded(trainable if trainable is not None else model, optimizer, path / SHARDED)
    else:
        read_model(model, path)
    for name, module in (extra_modules or {}).items():
        module.load_state_dict(torch.load(path / f"{name}.pt", map_location="cpu", weights_only=True))
    if optimizer is not None and (path / "optimizer.pt").exists():
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    if scheduler is not None and (path / "scheduler.pt").exists():
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if optimizer is not None:
        _apply_hyperparameters(optimizer, scheduler, fresh)
    own = path / f"rng-{rank}.pt"
    restore_rng(torch.load(own if rank > 0 and own.exists() else path / "rng.pt", weights_only=False))
    return json.loads((path / "state.json").read_text())
