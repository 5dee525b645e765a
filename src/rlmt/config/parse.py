"""Reading a config: YAML + ``key=value`` overrides, types checked and cross-field rules validated once at
the edge, with errors that name the key (and file) and the closest valid key; then the unset keys are filled
by the method's convention (:func:`with_method_defaults`)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from rlmt.config.sections import TRACKER_SETTINGS, Config, ConfigError


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        if _is_section(hints[f.name]):
            keys.extend(_all_keys(hints[f.name], prefix + f.name + "."))
    return keys


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    everywhere = _all_keys(Config)
    leaf = key.split(".")[-1]
    # the same leaf in another section (`run.lr` -> `optim.lr`) beats a fuzzy match in this one (`run.log_every`)
    close = (sorted((k for k in everywhere if k.split(".")[-1] == leaf), key=lambda k: k.count("."))[:1]
             or difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
             or difflib.get_close_matches(key, everywhere, n=1, cutoff=0.5))
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{where}unknown config key {key!r}{hint}")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and ("on" if value else "off") in choices:
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}{key}: {value!r} is not one of {list(choices)}{hint}")
        return value
    bad = ConfigError(f"{where}{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if not isinstance(value, (str, int, float)):
            raise bad
        return str(value)
    if tp is list:
        if not isinstance(value, list):
            raise bad
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise bad
        return value
    raise bad


def _build(cls: type, data: dict, prefix: str, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise _unknown_key(prefix + str(key), [prefix + n for n in names], where)
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        if _is_section(tp):
            kwargs[name] = _build(tp, data[name] if data[name] is not None else {}, prefix + name + ".", where)
        else:
            kwargs[name] = _coerce(data[name], tp, prefix + name, where)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from e
    return key.strip().split("."), value


def apply_override(data: dict, path: list[str], value: Any) -> None:
    """Set ``data[path[0]][path[1]]... = value``, creating mappings on the way; a number indexes into a list
    (``stages.0.optim.max_steps``: the first pipeline stage's)."""
    node: Any = data
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[:i])} is a list of {len(node)} "
                                  f"entries; {part!r} is not an index into it")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[:i])} is a {type(node).__name__}, not a "
                              "mapping or list")
        if last:
            node[part] = value
        else:
            child = node[part] if isinstance(node, list) else node.get(part)
            if not isinstance(child, (dict, list)):
                child = {}
                node[part] = child
            node = child


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    """Read YAML at ``path`` (optional), apply ``base`` defaults then ``overrides``, validate, freeze."""
    data: dict = {}
    where = ""
    if base:
        data = yaml.safe_load(yaml.safe_dump(base))
    if path is not None:
        where = f"{path}: "
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}invalid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{where}top level must be a mapping of config keys")
        deep_merge(data, loaded)
    given = {}
    for text in overrides or []:
        keys, value = parse_override(text)
        apply_override(data, keys, value)
        given[".".join(keys)] = text
    try:
        return config_from_dict(data, "", where)
    except ConfigError as e:  # a value from the command line: name the override, not the file it overrides
        message = str(e)
        for key, text in given.items():
            if where and message.startswith(f"{where}{key}:"):
                raise ConfigError(f"override {text!r}: {message[len(where):]}") from None
        raise


def config_from_dict(data: dict, prefix: str = "", where: str = "") -> Config:
    """Build, validate and complete (:func:`with_method_defaults`) a config from plain data; errors name
    ``where`` (a file) and ``prefix`` + the key."""
    cfg = _build(Config, data, prefix, where)
    validate(cfg, where + prefix)
    return with_method_defaults(cfg)


# The settings each online method takes when the config leaves them unset (None).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "ppo": {"kl_estimator": "k1", "kl_in_reward": True, "aggregation": "token_mean"},
    "gspo": {"kl_estimator": "k3", "kl_in_reward": False, "aggregation": "seq_mean"},
}
_PG_DEFAULTS = {"kl_estimator": "k3", "kl_in_reward": False, "aggregation": "token_mean"}


def with_method_defaults(cfg: Config) -> Config:
    """``cfg`` with the unset (None) keys that stand for another value filled with that value, so the config a
    run records (``config.yaml``, a checkpoint's ``run.json``) is the one it ran: the ``pg`` keys by its
    algorithm's convention (:data:`METHOD_DEFAULTS`), ``pg.clip_eps_high`` by ``pg.clip_eps``, and for PPO
    ``ppo.critic_lr`` by ``optim.lr``. Idempotent."""
    defaults = METHOD_DEFAULTS.get(cfg.algorithm, _PG_DEFAULTS)
    fill = {k: v for k, v in defaults.items() if getattr(cfg.pg, k) is None}
    if cfg.pg.clip_eps_high is None:
        fill["clip_eps_high"] = cfg.pg.clip_eps
    if fill:
        cfg = dataclasses.replace(cfg, pg=dataclasses.replace(cfg.pg, **fill))
    if cfg.algorithm == "ppo" and cfg.ppo.critic_lr is None:
        cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, critic_lr=cfg.optim.lr))
    return cfg


def deep_merge(into: dict, new: dict) -> None:
    """Merge ``new`` into ``into`` in place: mappings key by key, anything else replaced."""
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            deep_merge(into[k], v)
        else:
            into[k] = v


def validate(cfg: Config, where: str = "") -> None:
    """Cross-field checks that types alone cannot express."""
    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{where}{key}: {msg}")

    need(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    need(cfg.optim.batch_size >= 1, "optim.batch_size", "must be >= 1")
    need(cfg.optim.grad_accum >= 1, "optim.grad_accum", "must be >= 1")
    need(cfg.optim.max_steps >= 0, "optim.max_steps", "must be >= 0")
    need(len(cfg.optim.betas) == 2, "optim.betas", "must be two numbers")
    need(cfg.rollout.num_samples >= 1, "rollout.num_samples", "must be >= 1")
    need(cfg.rollout.temperature >= 0, "rollout.temperature", "must be >= 0")
    need(0 < cfg.rollout.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
    need(cfg.rollout.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    need(cfg.eval.num_samples >= 1, "eval.num_samples", "must be >= 1")
    need(cfg.data.max_prompt_tokens >= 1, "data.max_prompt_tokens", "must be >= 1")
    for name, column in cfg.data.columns.items():
        need(isinstance(column, str) and bool(column), f"data.columns.{name}",
             f"a source column name (a string), got {column!r}")
    need(cfg.rejection.keep_top_k >= 0, "rejection.keep_top_k", "must be >= 0")
    need(cfg.algorithm != "rejection_sampling" or cfg.optim.max_steps == 0, "optim.max_steps",
         "rejection sampling runs rejection.rounds rounds, each with the SFT steps its kept set needs "
         "(rejection.sft_epochs); leave optim.max_steps at 0")
    need(cfg.rejection.keep_top_k > 0 or cfg.rejection.threshold is not None, "rejection.keep_top_k",
         "0 (keep all) needs rejection.threshold")
    need(cfg.run.resume.lower() in ("true", "false") or Path(cfg.run.resume).exists(), "run.resume",
         f"'true', 'false' or an existing checkpoint path, got {cfg.run.resume!r}")
    need(cfg.model.lora.r >= 0, "model.lora.r", "must be >= 0")
    _validate_trackers(cfg, where)
    need(cfg.pg.epochs >= 1, "pg.epochs", "must be >= 1")
    need(cfg.pg.minibatches >= 1, "pg.minibatches", "must be >= 1")
    need(cfg.pg.beta >= 0, "pg.beta", "must be >= 0")
    revise = cfg.algorithm == "grape" and cfg.grape.revise
    need(cfg.pg.nll_coef == 0 or bool(cfg.data.demonstrations) or revise, "data.demonstrations",
         "pg.nll_coef > 0 needs a demonstrations file (or grape.revise)")
    need(not revise or cfg.pg.nll_coef > 0, "pg.nll_coef", "grape.revise needs pg.nll_coef > 0 (the weight of the "
         "revisions' NLL)")
    need(cfg.pg.nll_tau is None or cfg.pg.nll_tau > 0, "pg.nll_tau", "must be > 0")
    need(cfg.trpo.max_kl > 0, "trpo.max_kl", "must be > 0")
    need(0 < cfg.trpo.backtrack_ratio < 1, "trpo.backtrack_ratio", "must be in (0, 1)")
    need(cfg.trpo.cg_iters >= 1, "trpo.cg_iters", "must be >= 1")
    need(cfg.trpo.cg_damping >= 0, "trpo.cg_damping", "must be >= 0")
    need(0 < cfg.trpo.fisher_fraction <= 1, "trpo.fisher_fraction", "must be in (0, 1]")
    need(cfg.trpo.backtrack_steps >= 0, "trpo.backtrack_steps", "must be >= 0")
    need(cfg.dpo.beta > 0, "dpo.beta", "must be > 0")
    need(0 <= cfg.dpo.label_smoothing < 0.5, "dpo.label_smoothing", "must be in [0, 0.5)")
    need(0 <= cfg.ppo.lam <= 1 and 0 <= cfg.ppo.gamma <= 1, "ppo.lam", "gamma and lam must be in [0, 1]")
    need(cfg.ppo.critic_lr is None or cfg.ppo.critic_lr > 0, "ppo.critic_lr", "must be > 0 (or unset: optim.lr)")
    if cfg.algorithm == "grape" or cfg.reward.source == "rubric":
        need(bool(cfg.grape.rubric), "grape.rubric", "the rubric reward source needs a rubric file")
        critic_spec(cfg, where)
    need(cfg.algorithm == "pipeline" or not cfg.stages, "stages", "only algorithm pipeline runs stages")
    if cfg.algorithm == "pipeline":
        need(bool(cfg.stages), "stages", "algorithm pipeline needs at least one stage")
        need(cfg.run.resume.lower() in ("true", "false"), "run.resume",
             "a pipeline resumes each stage from its own checkpoints; use true/false, not a path")
    if cfg.optim.step_in_backward:
        _validate_step_in_backward(cfg, need)
    if cfg.algorithm in ("grpo", "gspo", "reinforce", "trpo", "grape") and cfg.pg.advantage in ("group", "group_no_std", "leave_one_out"):
        need(cfg.rollout.num_samples >= 2, "rollout.num_samples", f"pg.advantage={cfg.pg.advantage} needs >= 2 samples per prompt")


# grape.critic keys and where they apply: (backends, critic modes)
_CRITIC_KEYS = {
    **{k: ({"http"}, {"json"}) for k in ("base_url", "api_key_env", "concurrency", "timeout_s", "retries", "backoff_s",
                                         "cache_path", "price_input_per_1k", "price_output_per_1k")},
    **{k: ({"local"}, {"json"}) for k in ("max_batch", "dtype", "cache")},
    "batch_size": ({"local"}, {"logprobs"}),
    **{k: ({"local"}, {"json", "logprobs"}) for k in ("device", "seed")},
    **{k: ({"local", "http"}, {"json"}) for k in ("max_tokens", "require_ref")},
}


def critic_spec(cfg: Config, where: str = "") -> dict:
    """``grape.critic`` as the keyword arguments its backend takes (:func:`rlmt.grape.critic.build_critic`): the
    backend, the model, and every key that is set; a set key that does not apply to the backend and
    ``grape.critic_mode`` is a :class:`ConfigError` naming it."""
    c, mode = cfg.grape.critic, cfg.grape.critic_mode
    spec: dict = {"backend": c.backend, "model": c.model}
    for key, (backends, modes) in _CRITIC_KEYS.items():
        value = getattr(c, key)
        if value is None:
            continue
        if c.backend not in backends or mode not in modes:
            raise ConfigError(f"{where}grape.critic.{key}: applies to backend {'/'.join(sorted(backends))} in "
                              f"critic_mode {'/'.join(sorted(modes))}, not backend {c.backend} in {mode}")
        spec[key] = value
    if c.backend == "http" and "base_url" not in spec:
        raise ConfigError(f"{where}grape.critic.base_url: an http critic needs the server's base URL")
    if mode == "logprobs" and c.backend != "local":
        raise ConfigError(f"{where}grape.critic_mode: logprobs needs a local critic (grape.critic.backend: local)")
    return spec


def _validate_trackers(cfg: Config, where: str) -> None:
    """``run.trackers`` names known trackers, once each; ``run.tracker_args`` maps tracker names to mappings of
    the keys each takes (:data:`TRACKER_SETTINGS`; W&B's are checked against ``wandb.init`` when the run starts)."""
    names = list(TRACKER_SETTINGS)
    for name in cfg.run.trackers:
        if name not in TRACKER_SETTINGS:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}run.trackers: {name!r} is not one of {names}{hint}")
        if cfg.run.trackers.count(name) > 1:
            raise ConfigError(f"{where}run.trackers: {name!r} is listed twice")
    for name, args in cfg.run.tracker_args.items():
        if name not in TRACKER_SETTINGS:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}run.tracker_args: {name!r} is not one of {names}{hint}")
        if not isinstance(args, dict):
            raise ConfigError(f"{where}run.tracker_args.{name}: expected a mapping of settings, got {args!r}")
        takes = TRACKER_SETTINGS[name]
        unknown = sorted(set(args) - set(takes)) if takes is not None else []
        if unknown:
            raise ConfigError(f"{where}run.tracker_args.{name}: unknown keys {unknown}; it takes {', '.join(takes)}")


def _validate_step_in_backward(cfg: Config, need: Callable[[bool, str, str], None]) -> None:
    """optim.step_in_backward updates each parameter inside one backward pass: no global clipping, no
    accumulation over several backward passes, no step of its own (TRPO)."""
    need(cfg.optim.max_grad_norm == 0, "optim.max_grad_norm",
         "must be 0 with optim.step_in_backward (the global gradient norm is known only after backward)")
    need(cfg.algorithm != "trpo", "optim.step_in_backward", "TRPO takes its own trust-region step")
    need(cfg.optim.grad_accum == 1, "optim.grad_accum", "must be 1 with optim.step_in_backward")
    if cfg.algorithm in ("grpo", "gspo", "reinforce", "ppo", "grape"):
        per_step = math.ceil(cfg.rollout.batch_prompts * cfg.rollout.num_samples / cfg.pg.minibatches)
        need(cfg.optim.batch_size >= per_step, "optim.batch_size",
             f"must be >= {per_step} (the sequences of one optimizer step) with optim.step_in_backward, so one "
             "backward pass makes the step")
        need(cfg.pg.nll_coef == 0, "pg.nll_coef", "the demonstration NLL is a second backward pass per step; "
             "it cannot run with optim.step_in_backward")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every field, for ``--help-config``."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            rows.append((prefix + f.name, "", f.metadata.get("doc", "")))
            rows.extend(describe(tp, prefix + f.name + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            choices = _choices(tp)
            doc = f.metadata.get("doc", "") + (f" [one of: {', '.join(map(repr, choices))}]" if choices else "")
            rows.append((prefix + f.name, repr(default), doc))
    return rows


def _choices(tp: Any) -> tuple:
    """The values a ``Literal`` (or optional ``Literal``) field takes; () for any other type."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(c for a in typing.get_args(tp) if a is not type(None) for c in _choices(a))
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else ()
