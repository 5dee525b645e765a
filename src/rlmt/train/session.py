"""What every training run shares: seeding, the process settings (``cfg.runtime``), the model (with optional
LoRA), the run directory and the resume point.

Resuming (:func:`resume_checkpoint`) takes the newest checkpoint whose manifest verifies
(:func:`rlmt.checkpoint.verify_checkpoint`); newer ones that do not are set aside (renamed
``step-N.corrupt``) with one warning naming what was wrong, and none complete is an error rather than a
fresh start over the old records. The checkpoint's recorded run (:func:`run_record`: the config and the
sha256 of the data files) is compared with this run's: a training-relevant change
(:func:`rlmt.config.training_changes`, or a data file whose contents changed under the same path) is refused
with the list of changes unless ``run.allow_config_change`` is true."""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlmt.checkpoint import (SHARDED, capture_rng, checkpoint_tmp, file_sha256, latest_checkpoint, list_checkpoints,
                             save_checkpoint, set_aside, verify_checkpoint)
from rlmt.config import Config, ModelConfig, to_dict, training_changes
from rlmt.data import PromptFormat
from rlmt.models import EMBEDDED, LoadedModel, load_model, pick_device

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded model's name on the Hugging Face hub
from rlmt.parallel import World, broadcast_weights, check_same_config, init_world
from rlmt.records import QuietRecorder, RunRecorder
from rlmt.trackers import open_trackers, tracker_names
from rlmt.rollout.precision import autocast_dtype, slow_bf16_warning
from rlmt.runtime import apply_runtime


_WARNED: dict[str, bool] = {}  # one-time warnings already given in this process


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
    peft_model = get_peft_model(model, lcfg)
    # the adapters name the model as the user did (the embedded one by its hub id), not a path in rlmt's cache
    base = EMBEDDED_HUB_ID if cfg.name == EMBEDDED else cfg.name
    for adapter in peft_model.peft_config.values():
        adapter.base_model_name_or_path = base
    return peft_model


def shard_model(cfg: Config, lm: LoadedModel, world: World, trainable: list[torch.nn.Module],
                checkpoint: Path | None) -> bool:
    """On several ranks: make every rank start from rank 0's weights (``trainable``: the policy and its heads;
    :func:`rlmt.parallel.broadcast_weights`), refuse a sharded checkpoint written by another number of ranks,
    and with ``model.parallel=fsdp`` shard the policy's decoder layers (:mod:`rlmt.parallel.fsdp`); True if it
    did. Called by the loops after the reference copy is taken and before the optimizer is built."""
    if checkpoint is not None and (Path(checkpoint) / SHARDED).is_dir():
        written = json.loads((Path(checkpoint) / "state.json").read_text()).get("world_size")
        if written != world.size or cfg.model.parallel != "fsdp":
            raise RunError(f"run.resume: {checkpoint} holds the shards of {written} ranks (model.parallel=fsdp); "
                           f"resume it on {written} processes with model.parallel=fsdp")
    if world.size == 1:
        return False
    for module in trainable:
        broadcast_weights(world, module)
    if cfg.model.parallel != "fsdp":
        return False
    from rlmt.parallel.fsdp import shard_layers

    shard_layers(lm.model, world, lm.autocast, cfg.model.fsdp_cpu_offload)
    return True


def prepare_model(cfg: Config) -> LoadedModel:
    """Load the policy as configured: device, dtype, gradient checkpointing, LoRA, autocast."""
    lm = load_model(cfg.model.name, dtype=cfg.model.dtype, device=pick_device(cfg.model.device), seed=cfg.run.seed)
    if cfg.model.gradient_checkpointing:
        enable = getattr(lm.model, "activation_checkpointing_enable", None) or lm.model.gradient_checkpointing_enable
        enable()
        lm.model.config.use_cache = False
    if cfg.model.lora.r > 0:
        lm.model = apply_lora(lm.model, cfg.model)
    device = next(lm.model.parameters()).device
    lm.autocast = autocast_dtype(cfg.model.autocast, device)
    warning = slow_bf16_warning(cfg.model.autocast, device)  # measured once per process
    if warning and not _WARNED.get("bf16"):
        _WARNED["bf16"] = True
        _warn(warning)
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


def run_record(cfg: Config) -> dict[str, Any]:
    """What a checkpoint records of its run for the resume check: the config, and the sha256 of each data file
    the run trains on (``data.train``, ``data.demonstrations``), so an edit in place is seen too."""
    files = {f"data.{k}": getattr(cfg.data, k) for k in ("train", "demonstrations")}
    return {"config": to_dict(cfg),
            "data_sha256": {k: file_sha256(v) for k, v in files.items() if v and Path(v).is_file()}}


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def resume_changes(cfg: Config, checkpoint: Path) -> list[str]:
    """The training-relevant differences between ``cfg`` and the run recorded in ``checkpoint/run.json``,
    one line each (``key: old -> new``); empty when they agree (or the checkpoint records none: warned)."""
    recorded = Path(checkpoint) / "run.json"
    if not recorded.exists():
        _warn(f"{checkpoint} records no config: the resumed config is not checked against it")
        return []
    old = json.loads(recorded.read_text())
    new = run_record(cfg)
    lines = training_changes(old["config"], new["config"])
    for key, sha in new["data_sha256"].items():
        before = old.get("data_sha256", {}).get(key)
        section, name = key.split(".")
        path = new["config"][section][name]
        if before is not None and before != sha and old["config"].get(section, {}).get(name) == path:
            lines.append(f"{key}: the contents of {path} changed (sha256 {before[:12]}... -> {sha[:12]}...)")
    return lines


def _check_config(cfg: Config, checkpoint: Path) -> None:
    lines = resume_changes(cfg, checkpoint)
    if not lines:
        return
    listed = "".join(f"\n  {line}" for line in lines)
    if not cfg.run.allow_config_change:
        raise RunError(f"run.resume: the config differs from {checkpoint}'s in training-relevant keys:{listed}\n"
                       "restore them, or pass run.allow_config_change=true to resume with the changes in effect")
    _warn(f"resuming {checkpoint} with a changed config (run.allow_config_change=true):{listed}")


def resume_checkpoint(cfg: Config) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run (see the module docstring).

    ``run.resume=false`` on a directory that already holds checkpoints is an error rather than a silent
    overwrite; ``true`` with no checkpoint yet starts fresh; an explicit path must verify.
    """
    run_dir = Path(cfg.run.output_dir)
    flag = cfg.run.resume.lower()
    if flag == "false":
        if list_checkpoints(run_dir):
            raise RunError(f"{run_dir} already holds checkpoints: pass run.resume=true to continue it, "
                           "or choose another run.output_dir")
        return None
    if flag == "true":
        path, bad = latest_checkpoint(run_dir)
        if bad and path is None:
            raise RunError(f"run.resume=true: no complete checkpoint in {run_dir / 'checkpoints'}: "
                           + "; ".join(f"{p.name}: {why}" for p, why in bad))
        if bad:
            moved = [(p.name, why, set_aside(p).name) for p, why in bad]
            _warn(f"resuming from {path.name}, the newest complete checkpoint: "
                  + "; ".join(f"{name} is incomplete or corrupt ({why}), set aside as {to}" for name, why, to in moved))
        if path is None:
            return None
    else:
        path = Path(cfg.run.resume)
        problem = verify_checkpoint(path)
        if problem:
            raise RunError(f"run.resume={cfg.run.resume}: not a complete checkpoint ({problem})")
    _check_config(cfg, path)
    return path


# ------------------------------------------------------------------------------------ several processes

def check_distributed(cfg: Config, world_size: int) -> None:
    """What a run on ``world_size > 1`` processes cannot do, and batch sizes that do not split evenly across
    them (a :class:`RunError` naming the key). Needs only the config: the launcher checks it before it
    starts any process."""
    if world_size == 1:
        return
    where = f"on {world_size} processes"
    if cfg.algorithm == "pipeline":  # each stage is a run of its own
        from rlmt.train.pipeline import plan_stages

        for stage in plan_stages(cfg):
            check_distributed(stage.config, world_size)
        return
    if cfg.optim.step_in_backward:
        raise RunError(f"optim.step_in_backward {where}: the gradients must be summed across ranks before any "
                       "update; set optim.step_in_backward=false")
    if cfg.model.parallel == "fsdp":
        if cfg.algorithm == "trpo":
            raise RunError(f"model.parallel=fsdp with algorithm=trpo {where}: TRPO's flat parameter vector and "
                           "double backward need whole weights; use model.parallel=ddp")
        if cfg.model.lora.r > 0:
            raise RunError(f"model.parallel=fsdp with model.lora.r > 0 {where}: LoRA trains a small share of the "
                           "weights; use model.parallel=ddp")
    offline = cfg.algorithm in ("sft", "dpo", "reward_model", "process_reward_model")
    batches = []  # (key, value) of each batch size that is split across the ranks
    if offline or cfg.algorithm == "rejection_sampling":  # examples a step (rejection: its SFT steps)
        batches.append(("optim.batch_size * optim.grad_accum", cfg.optim.batch_size * cfg.optim.grad_accum))
    if cfg.algorithm == "rejection_sampling":  # 0: every prompt, checked against the data by the loop
        batches.append(("rejection.prompts_per_round", cfg.rejection.prompts_per_round))
    elif not offline:
        batches.append(("rollout.batch_prompts", cfg.rollout.batch_prompts))
    for key, value in batches:
        if value % world_size:
            raise RunError(f"{key}={value} does not divide across {world_size} processes; use a multiple of "
                           f"{world_size}")


def join_world(cfg: Config) -> World:
    """Join the job torchrun started (a world of one without torchrun): the backend from ``dist.backend`` or
    the device, collectives timing out after ``dist.timeout_s``; then the resolved config is checked to be
    the same on every rank, and what cannot run on several processes is refused, before any data loads."""
    device = pick_device(cfg.model.device)
    world = init_world(cfg.dist.backend, "cuda" if str(device).startswith("cuda") else "cpu", cfg.dist.timeout_s)
    check_same_config(world, to_dict(cfg))
    check_distributed(cfg, world.size)
    return world


def recorder(world: World, run_dir: Path, cfg: Config, resume_step: int | None,
             total_steps: int | None) -> RunRecorder | QuietRecorder:
    """The run's recorder on rank 0 (:class:`RunRecorder`, with the trackers of ``run.trackers``); one that
    writes nothing on the other ranks."""
    if not world.is_main:
        return QuietRecorder()
    config = to_dict(cfg)
    trackers = open_trackers(tracker_names(cfg.run), cfg.run.tracker_args, run_dir, config, resume_step)
    return RunRecorder(run_dir, config, resume_step, trackers, cfg.run.log_every, total_steps, cfg.run.progress)


def save_on_main(world: World, run_dir: Path, step: int, state: dict[str, Any], *, model, optimizer, scheduler,
                 keep: int, extras: dict | None, record: dict[str, Any], trainable=None, tokenizer=None) -> None:
    """A checkpoint, written by rank 0; every rank waits until it is complete, so a rank killed afterwards
    leaves a checkpoint every rank has passed. A sharded model (``model.parallel=fsdp``): every rank first
    writes its shards of the weights and the optimizer into the checkpoint's temporary directory
    (:func:`rlmt.parallel.fsdp.save_sharded`), then rank 0 the rest, the manifest and the rename, so the
    checkpoint is complete or absent as on one process. ``trainable``: the module the optimizer steps (the
    model and its heads), whose state the shards hold; ``tokenizer``: saved with the model (a model directory,
    :func:`rlmt.checkpoint.write_model`)."""
    from rlmt.parallel.fsdp import is_sharded, save_sharded

    rngs = world.all_gather_object(capture_rng()) if world.size > 1 else None  # every rank's, rank 0 writes
    state = {**state, "world_size": world.size}
    if is_sharded(model):
        tmp = Path(world.broadcast_object(str(checkpoint_tmp(run_dir, step)) if world.is_main else None))
        save_sharded(trainable if trainable is not None else model, optimizer, tmp / SHARDED)
        world.barrier()
        if world.is_main:
            save_checkpoint(run_dir, step, None, None, scheduler, state, keep, extras, record, tmp, rngs)
    elif world.is_main:
        save_checkpoint(run_dir, step, model, optimizer, scheduler, state, keep, extras, record, rank_rngs=rngs,
                        tokenizer=tokenizer)
    world.wait()
