"""What every training run shares: seeding, the process settings (``cfg.runtime``), the model (with optional
LoRA), the run directory and the resume point, and writing ``final/``."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from rlmt.checkpoint import latest_checkpoint, list_checkpoints
from rlmt.config import Config, ModelConfig
from rlmt.data import PromptFormat
from rlmt.models import LoadedModel, load_model, pick_device
from rlmt.rollout.precision import autocast_dtype
from rlmt.runtime import apply_runtime


class RunError(RuntimeError):
    """A run cannot start as configured (e.g. an existing run directory without resume)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def apply_lora(model: torch.nn.Module, cfg: ModelConfig) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters (peft); base weights are frozen and never written back."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise RunError("model.lora.r > 0 needs peft: pip install 'rlmt[lora]'") from e
    lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def prepare_model(cfg: Config) -> LoadedModel:
    """Load the policy as configured: device, dtype, gradient checkpointing, LoRA, autocast."""
    lm = load_model(cfg.model.name, dtype=cfg.model.dtype, device=pick_device(cfg.model.device), seed=cfg.run.seed)
    if cfg.model.gradient_checkpointing:
        enable = getattr(lm.model, "activation_checkpointing_enable", None) or lm.model.gradient_checkpointing_enable
        enable()
        lm.model.config.use_cache = False
    if cfg.model.lora.r > 0:
        lm.model = apply_lora(lm.model, cfg.model)
    lm.autocast = autocast_dtype(cfg.model.autocast, next(lm.model.parameters()).device)
    return lm


def prompt_format(cfg: Config) -> PromptFormat:
    return PromptFormat(chat=cfg.data.chat, system_prompt=cfg.data.system_prompt)


def check_output_dir(cfg: Config) -> Path:
    """Prove that ``run.output_dir`` can be created and written before anything loads: a :class:`RunError`
    naming the key and the reason otherwise (never a traceback from the recorder later). The directories this
    check creates are removed again, so a run stopped by a later error (bad data) leaves nothing behind."""
    path = Path(cfg.run.output_dir)
    where = f"run.output_dir={cfg.run.output_dir}"
    if path.exists() and not path.is_dir():
        raise RunError(f"{where}: exists and is not a directory")
    created = [p for p in [path, *path.parents] if not p.exists()]
    try:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"{where}: cannot create the directory ({e.strerror or e})") from None
        try:
            fd, probe = tempfile.mkstemp(prefix=".rlmt-write-test-", dir=path)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise RunError(f"{where}: cannot write in the directory ({e.strerror or e})") from None
    finally:
        for p in created:  # deepest first
            try:
                p.rmdir()
            except OSError:
                pass
    return path


def start_run(cfg: Config) -> tuple[Path, LoadedModel, PromptFormat]:
    """What every training loop does first: seed, apply ``cfg.runtime`` to the process, load the model as
    configured, pick the prompt format.

    What the runtime settings put in effect (whether huge pages are, and its one-line note when they were asked
    for and are not) is :func:`rlmt.runtime.applied` afterwards."""
    seed_everything(cfg.run.seed)
    apply_runtime(cfg.runtime, pick_device(cfg.model.device))
    return Path(cfg.run.output_dir), prepare_model(cfg), prompt_format(cfg)


def resume_checkpoint(cfg: Config) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run.

    ``run.resume=false`` on a directory that already holds checkpoints is an error rather than a silent
    overwrite; ``true`` with no checkpoint yet starts fresh.
    """
    run_dir = Path(cfg.run.output_dir)
    flag = cfg.run.resume.lower()
    if flag == "false":
        if list_checkpoints(run_dir):
            raise RunError(f"{run_dir} already holds checkpoints: pass run.resume=true to continue it, "
                           "or choose another run.output_dir")
        return None
    if flag == "true":
        return latest_checkpoint(run_dir)
    path = Path(cfg.run.resume)
    if not (path / "state.json").exists():
        raise RunError(f"run.resume={cfg.run.resume}: not a complete checkpoint (no state.json)")
    return path


