"""What may change when a run resumes: every key is training-relevant except the few listed here.

A resumed run is meant to be the run it continues. So a resume whose config differs from the checkpoint's in
a key that changes what is trained (the method, the model, the data and how it is read, the optimizer and
its schedule, batch sizes, steps, seeds, the rollout, the reward, the objectives' coefficients) is refused
with the list of changes, unless ``run.allow_config_change=true`` (then the list is printed and the new
values are the ones in effect, optimizer hyperparameters included: :func:`rlmt.checkpoint.load_checkpoint`).

The list is of the keys that may change, not of those that may not: a key added to the config later is
protected until someone decides otherwise. The keys that may change say where and how a run is recorded,
how the process runs (threads, device, memory mechanics that do not change a number: gradient
checkpointing), evaluation, and how a remote critic is reached.

Growing the run is allowed without the override when it is exact: ``optim.max_steps`` (or ``optim.epochs``
when max_steps is 0) may increase if ``optim.schedule`` is constant, since no other schedule's learning rate
at a step depends on the total; the data order, the sampler and the counters are pure functions of the step,
so the extended run equals one configured that long from the start. With a decaying schedule a longer run
changes the learning rate of the steps still to come, and that needs the override.
"""

from __future__ import annotations

from typing import Any

RESUME_SAFE: tuple[str, ...] = (
    "run.output_dir", "run.save_every", "run.keep_checkpoints", "run.resume", "run.allow_config_change",
    "run.log_every", "run.tensorboard", "run.trackers", "run.tracker_args", "run.progress", "run.eval_before_after",
    "eval", "data.eval", "data.eval_split",
    "runtime", "dist", "model.device", "model.fsdp_cpu_offload", "model.gradient_checkpointing",
    "grape.critic.base_url", "grape.critic.api_key_env", "grape.critic.concurrency", "grape.critic.timeout_s",
    "grape.critic.retries", "grape.critic.backoff_s", "grape.critic.cache_path", "grape.critic.price_input_per_1k",
    "grape.critic.price_output_per_1k", "grape.critic.device",
)
"""Dotted keys (or whole sections) that may differ on resume; every other key is training-relevant."""


def _leaves(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and prefix + str(k) not in _OPAQUE:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[prefix + str(k)] = v
    return out


_OPAQUE = {"reward.args"}  # free-form mappings compare as one value


def resume_safe(key: str) -> bool:
    """Whether ``key`` may change on resume (it, or a section above it, is in :data:`RESUME_SAFE`)."""
    return any(key == s or key.startswith(s + ".") for s in RESUME_SAFE)


def _as_list(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) of every leaf key that differs between two configs as plain dicts."""
    a, b = _leaves(old), _leaves(new)
    missing = object()
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = _as_list(a.get(key, missing)), _as_list(b.get(key, missing))
        if va != vb:
            out.append((key, None if va is missing else va, None if vb is missing else vb))
    return out


def _grows_exactly(key: str, old_value: Any, new_value: Any, old: dict, new: dict) -> bool:
    """A longer run under a constant schedule (see the module docstring)."""
    constant = old["optim"].get("schedule") == new["optim"].get("schedule") == "constant"
    if not constant or not isinstance(old_value, (int, float)) or not isinstance(new_value, (int, float)):
        return False
    if key == "optim.max_steps":
        return 0 < old_value < new_value
    if key == "optim.epochs":
        return old["optim"].get("max_steps") == new["optim"].get("max_steps") == 0 and old_value < new_value
    return False


def training_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The training-relevant changes from ``old`` (the checkpoint's config) to ``new`` as lines
    ``key: old -> new``; empty when the resume may go ahead without ``run.allow_config_change``."""
    from rlmt.config.parse import to_dict
    from rlmt.config.sections import Config

    recorded, defaults = _leaves(old), _leaves(to_dict(Config()))
    lines = []
    for key, a, b in config_changes(old, new):
        if resume_safe(key) or _grows_exactly(key, a, b, old, new):
            continue
        if key not in recorded and key in defaults and _as_list(defaults[key]) == b:
            continue  # a key added to rlmt after the checkpoint was written, at its default: the old behaviour
        why = ""
        if key in ("optim.max_steps", "optim.epochs") and new["optim"].get("schedule") != "constant":
            why = f" (the {new['optim'].get('schedule')} schedule's learning rate depends on the run's length)"
        lines.append(f"{key}: {a!r} -> {b!r}{why}")
    return lines
