"""Reward sources: verifiers (RLVR), reward models, judges and GRAPE rubrics.

``build_reward_source(name, args)`` maps a config name to a source; modules are imported lazily so that a
verifier does not pay for a judge's dependencies.
"""

from __future__ import annotations

import importlib
from typing import Any

from rlmt.rewards.base import (RewardError, RewardResult, RewardSource, declared_fields, declared_range,
                               score_checked)

# config name -> (module, class). Each class takes its config ``args`` as keyword arguments.
REGISTRY: dict[str, tuple[str, str]] = {
    "math_answer": ("rlmt.rewards.math_answer", "MathAnswerReward"),
    "regex": ("rlmt.rewards.regex", "RegexReward"),
    "code_tests": ("rlmt.rewards.code_tests", "CodeTestsReward"),
    "rubric": ("rlmt.grape.scorer", "RubricReward"),
    "judge": ("rlmt.judge", "JudgeReward"),
    "process_reward_model": ("rlmt.rewards.process_reward_model", "ProcessRewardModelReward"),
    "reward_model": ("rlmt.rewards.reward_model", "RewardModelReward"),
}


# methods that score with a reward source of their own, whatever reward.source says (GRAPE: its rubric)
METHOD_SOURCES: dict[str, str] = {"grape": "rubric"}
# the algorithms that sample and score responses online (the rest learn from fixed data)
ONLINE_ALGORITHMS = frozenset({"rejection_sampling", "reinforce", "grpo", "gspo", "ppo", "trpo", "grape"})


def reward_source_class(name: str, args: dict[str, Any] | None = None, key: str = "reward.args") -> type:
    """The class registered as ``name``, after checking ``args`` against its constructor: an unknown source or
    an argument it does not take is a ConfigError naming ``reward.source`` or ``{key}.ARG`` (no source is built,
    no model loaded)."""
    import difflib
    import inspect

    from rlmt.config import ConfigError

    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"reward.source: unknown reward source {name!r}{hint} (known: {sorted(REGISTRY)})")
    module, cls_name = REGISTRY[name]
    cls = getattr(importlib.import_module(module), cls_name)
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        known = [p for p in params if p != "self"]
        for arg in args or {}:
            if arg not in known:
                close = difflib.get_close_matches(str(arg), known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{key}.{arg}: not an argument of reward source {name!r}{hint} (it takes: {known})")
    return cls


def build_reward_source(name: str, args: dict[str, Any] | None = None) -> RewardSource:
    """Instantiate the reward source registered as ``name`` with keyword ``args`` (checked first by
    :func:`reward_source_class`)."""
    from rlmt.config import ConfigError

    cls = reward_source_class(name, args)
    try:
        return cls(**(args or {}))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"reward.args: bad arguments for reward source {name!r} {args}: {e}") from e


def reward_source_for(cfg, name: str | None = None) -> RewardSource:
    """The run's reward source: ``name`` (the method's own source, e.g. GRAPE's ``rubric``) or else
    ``reward.source``. The ``rubric`` source is built from the typed ``grape`` section; any other from
    ``reward.args``."""
    name = name or cfg.reward.source
    if name == "rubric":
        g = cfg.grape
        from rlmt.config import critic_spec

        return build_reward_source("rubric", {"rubric": g.rubric, "critic": critic_spec(cfg), "critic_mode": g.critic_mode,
                                              "gate_on_verifiable": g.gate_on_verifiable, "guard": g.guard,
                                              "nonce_key": f"rlmt-critic-{cfg.run.seed}",
                                              "low_confidence": g.low_confidence, "min_score_std": g.min_score_std})
    return build_reward_source(name, cfg.reward.args)


def check_reward_source(cfg, name: str | None = None) -> None:
    """The checks of :func:`reward_source_for` that need nothing loaded: the source exists and takes
    ``reward.args`` (the ``rubric`` source's typed ``grape`` section is checked by the config itself)."""
    name = name or cfg.reward.source
    if name != "rubric":
        reward_source_class(name, cfg.reward.args)


def reward_fields(cfg, name: str | None = None) -> dict:
    """The row fields the run's reward source (``name``, else ``reward.source``) reads, each with its check
    (:func:`declared_fields`), from its class alone: no source is built, no model loaded. The ``rubric``
    source reads the rubric's own fields, checked when the rubric prepares its rows."""
    name = name or cfg.reward.source
    return {} if name == "rubric" else declared_fields(reward_source_class(name, cfg.reward.args), cfg.reward.args)


def check_reward_fields(cfg, rows, report, name: str | None = None, on_invalid: str | None = None) -> list:
    """``rows`` (of ``report``) whose fields the reward source reads pass its checks: a bad row is a
    :class:`rlmt.data.DataError` naming file, line and field, or with ``data.on_invalid=skip`` dropped and
    counted (none left is an error too)."""
    from rlmt.data import check_fields

    name = name or cfg.reward.source
    kept = check_fields(rows, reward_fields(cfg, name), f"reward source {name!r}", on_invalid or cfg.data.on_invalid,
                        report)
    report.require(len(kept))
    return kept


__all__ = ["check_reward_fields", "check_reward_source", "declared_fields", "declared_range", "reward_fields", "reward_source_class", "reward_source_for", "REGISTRY", "RewardError", "RewardResult", "RewardSource", "build_reward_source", "score_checked"]
