"""Reward sources: verifiers (RLVR), and later reward models, judges and rubrics.

``build_reward_source(name, args)`` maps a config name to a source; modules are imported lazily so that a
verifier does not pay for a judge's dependencies.
"""

from __future__ import annotations

import importlib
from typing import Any

from rlmt.rewards.base import RewardError, RewardResult, RewardSource, score_checked

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


def build_reward_source(name: str, args: dict[str, Any] | None = None) -> RewardSource:
    """Instantiate the reward source registered as ``name`` with keyword ``args``."""
    from rlmt.config import ConfigError

    if name not in REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"reward.source: unknown reward source {name!r}{hint} (known: {sorted(REGISTRY)})")
    module, cls = REGISTRY[name]
    try:
        return getattr(importlib.import_module(module), cls)(**(args or {}))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"reward.args: bad arguments for reward source {name!r} {args}: {e}") from e


def reward_source_for(cfg) -> RewardSource:
    """The run's reward source: for ``algorithm: grape`` the rubric source built from the ``grape`` section,
    otherwise ``reward.source`` with ``reward.args``."""
    if cfg.algorithm == "grape":
        g = cfg.grape
        return build_reward_source("rubric", {"rubric": g.rubric, "critic": g.critic, "critic_mode": g.critic_mode,
                                              "gate_on_verifiable": g.gate_on_verifiable, "guard": g.guard,
                                              "nonce_key": f"rlmt-critic-{cfg.run.seed}",
                                              "low_confidence": g.low_confidence, "min_score_std": g.min_score_std})
    return build_reward_source(cfg.reward.source, cfg.reward.args)


__all__ = ["reward_source_for", "REGISTRY", "RewardError", "RewardResult", "RewardSource", "build_reward_source", "score_checked"]
