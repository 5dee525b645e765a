"""``algorithm: pipeline``: several training stages from one config, e.g. the RLHF ladder SFT -> RM -> PPO.

    stages:
      - {name: sft, algorithm: sft, data: {train: sft.jsonl}}
      - {name: rm, algorithm: reward_model, model: {name: "${sft}"}, data: {train: prefs.jsonl}}
      - {name: ppo, algorithm: ppo, model: {name: "${sft}"}, reward: {source: reward_model, args: {path: "${rm}"}}}

Stage i's config is the top-level config (without ``stages``; its ``algorithm`` is not inherited, every stage
names its own) deep-merged with the stage's keys: mappings merge key by key (so ``reward.args`` gains keys
rather than being replaced), lists and scalars replace. In a stage's values ``${NAME}`` becomes earlier stage
NAME's ``final/`` directory; a reference to an unknown or later stage is an error. The pipeline sets each
stage's ``run.output_dir`` to ``<run.output_dir>/<name>`` (a stage may not set it) and ``run.resume`` to true.

Every stage config is built and validated before the first stage runs, so a typo in the last stage fails at
once, naming ``stages[i].key``. A finished stage writes ``<stage dir>/STAGE_DONE`` (atomically, after its
``final/``) with its final path and a hash of its config, and is skipped when the pipeline runs again; if its
config has changed since, the pipeline stops rather than reuse stale weights. An interrupted stage resumes
from its own latest checkpoint. ``<run.output_dir>/pipeline.json`` lists the stages and their status. So the
pipeline always continues what is in its directory: its own ``run.resume`` (true or false) changes nothing.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from rlmt.config import Config, ConfigError, config_from_dict, deep_merge, to_dict
from rlmt.parallel import World
from rlmt.records import write_atomic

STAGE_MARKER = "STAGE_DONE"
PIPELINE_FILE = "pipeline.json"
_REF = re.compile(r"\$\{([^}]*)\}")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# run keys that change how a run is shown or kept, not what it computes: not part of a stage's identity
_COSMETIC = ("progress", "log_every", "tensorboard", "trackers", "tracker_args", "save_every", "keep_checkpoints")


@dataclass(frozen=True)
class Stage:
    """One planned stage: its name and its complete, validated config."""

    name: str
    config: Config

    @property
    def dir(self) -> Path:
        return Path(self.config.run.output_dir)

    @property
    def final(self) -> Path:
        return self.dir / "final"


def substitute_refs(value: Any, finals: dict[str, str], later: set[str], key: str, where: str) -> Any:
    """``value`` with every ``${NAME}`` in its strings (nested in dicts and lists) replaced by ``finals[NAME]``.

    ``key`` is the dotted config key of ``value`` for error messages; ``later`` names the stages that come
    after this one (a reference to them is a forward reference).
    """
    if isinstance(value, dict):
        return {k: substitute_refs(v, finals, later, f"{key}.{k}", where) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_refs(v, finals, later, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        ref = m.group(1)
        if ref in finals:
            return finals[ref]
        why = "a later stage (forward reference)" if ref in later else "no stage of that name"
        raise ConfigError(f"{where}{key}: '${{{ref}}}' names {why}; earlier stages: {sorted(finals) or 'none'}")

    return _REF.sub(one, value)


def _has_ref(value: Any) -> str | None:
    """The dotted path of the first ``${...}`` inside ``value``, or None."""
    if isinstance(value, dict):
        for k, v in value.items():
            if (sub := _has_ref(v)) is not None:
                return f"{k}.{sub}" if sub else str(k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if (sub := _has_ref(v)) is not None:
                return f"[{i}]" + (f".{sub}" if sub else "")
    elif isinstance(value, str) and _REF.search(value):
        return ""
    return None


def plan_stages(cfg: Config, where: str = "") -> list[Stage]:
    """Build and validate every stage's config of pipeline ``cfg`` (see the module docstring); runs nothing."""
    if not cfg.stages:
        raise ConfigError(f"{where}stages: algorithm pipeline needs at least one stage")
    base = to_dict(cfg)
    del base["stages"], base["algorithm"]
    if (bad := _has_ref(base)) is not None:
        raise ConfigError(f"{where}{bad}: '${{...}}' stage references belong inside a stage, not the shared config")
    root = Path(cfg.run.output_dir)
    names = [s.get("name") if isinstance(s, dict) else None for s in cfg.stages]
    finals: dict[str, str] = {}
    stages = []
    for i, raw in enumerate(cfg.stages):
        at = f"stages[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}{at}: expected a mapping with a name and config keys, got {raw!r}")
        name = raw.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"{where}{at}.name: needs a name of letters, digits, '_', '-' or '.', got {name!r}")
        if name in finals or name in ("checkpoints", "final"):
            raise ConfigError(f"{where}{at}.name: {name!r} is used by an earlier stage or reserved")
        body = {k: v for k, v in raw.items() if k != "name"}
        if body.get("algorithm") in (None, "pipeline"):
            raise ConfigError(f"{where}{at}.algorithm: every stage sets its own algorithm (not 'pipeline'), "
                              f"got {body.get('algorithm')!r}")
        if isinstance(body.get("run"), dict) and "output_dir" in body["run"]:
            raise ConfigError(f"{where}{at}.run.output_dir: set by the pipeline (<run.output_dir>/{name})")
        body = {k: substitute_refs(v, finals, set(names[i + 1:]), f"{at}.{k}", where) for k, v in body.items()}
        data = copy.deepcopy(base)
        deep_merge(data, body)
        data["run"]["output_dir"] = str(root / name)
        data["run"]["resume"] = "true"
        stage_cfg = config_from_dict(data, f"{at}.", where)
        _check_reward_source(stage_cfg, at, where)
        stages.append(Stage(name, stage_cfg))
        finals[name] = str(root / name / "final")
    return stages


def _check_reward_source(cfg: Config, at: str, where: str) -> None:
    """An online stage's reward source exists and takes its ``reward.args``: known from the config alone, so a
    typo in the last stage stops the pipeline before the first one trains."""
    from rlmt.rewards import METHOD_SOURCES, ONLINE_ALGORITHMS, check_reward_source

    if cfg.algorithm in ONLINE_ALGORITHMS and not cfg.env.source:  # an environment stage: checked when it starts
        try:
            check_reward_source(cfg, METHOD_SOURCES.get(cfg.algorithm))
        except ConfigError as e:
            raise ConfigError(f"{where}{at}.{e}") from None


def config_hash(cfg: Config) -> str:
    """sha256 of a stage's config, leaving out the run keys that only change how it is shown."""
    d = to_dict(cfg)
    d["run"] = {k: v for k, v in d["run"].items() if k not in _COSMETIC}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _write_status(root: Path, stages: list[Stage], status: dict[str, dict]) -> None:
    rows = [{"name": s.name, "algorithm": s.config.algorithm, "output_dir": str(s.dir), "final": str(s.final),
             **status[s.name]} for s in stages]
    write_atomic(root / PIPELINE_FILE, json.dumps({"stages": rows}, indent=1))


def train_pipeline(cfg: Config, train: Callable[[Config], Path], world: World = World()) -> Path:
    """Run the stages in order with ``train`` (:func:`rlmt.train.runner.train`; finished stages skipped);
    returns the pipeline's directory. On several ranks every rank runs every stage and rank 0 alone writes
    the pipeline's files."""
    stages = plan_stages(cfg)  # every stage validated before any runs
    root = Path(cfg.run.output_dir)
    main = world.is_main
    if main:
        root.mkdir(parents=True, exist_ok=True)
        write_atomic(root / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    status = {s.name: {"status": "pending", "skipped": False} for s in stages}
    for s in stages:
        marker = s.dir / STAGE_MARKER
        world.wait()  # rank 0 has written the previous stage's marker
        if marker.exists():
            done = json.loads(marker.read_text())
            if done.get("config_sha256") != config_hash(s.config):
                raise ConfigError(f"stages: stage {s.name!r} finished with a different config ({marker}); delete "
                                  f"{s.dir} to re-run it, or restore its config")
            status[s.name] = {"status": "done", "skipped": True}
            if main:
                print(f"pipeline: stage {s.name!r} already done ({s.final}); skipped", flush=True)
            continue
        status[s.name] = {"status": "running", "skipped": False}
        if main:
            _write_status(root, stages, status)
            print(f"pipeline: stage {s.name!r} ({s.config.algorithm}) -> {s.dir}", flush=True)
        try:
            train(s.config)
        except BaseException:
            status[s.name] = {"status": "failed", "skipped": False}
            if main:
                _write_status(root, stages, status)
            raise
        if main:
            write_atomic(marker, json.dumps({"final": str(s.final), "config_sha256": config_hash(s.config)},
                                            indent=1))
        status[s.name] = {"status": "done", "skipped": False}
        gc.collect()  # the stage's models are garbage now; free them before the next stage loads its own
    if main:
        _write_status(root, stages, status)
    world.wait()
    return root
