"""Typed run configuration: YAML + ``key=value`` overrides, validated once at the edge.

Every field carries a one-line doc (``rlmt train --help-config`` prints them). Unknown keys are errors that
name the key and the closest valid one. After :func:`load_config` the config is frozen and passed as a value.

- :mod:`rlmt.config.sections`: the sections (``Config`` and its parts);
- :mod:`rlmt.config.parse`: reading, overrides, validation, the methods' defaults, ``--help-config``;
- :mod:`rlmt.config.changes`: which keys may change when a run resumes.
"""

from rlmt.config.changes import RESUME_SAFE, config_changes, training_changes
from rlmt.config.parse import (METHOD_DEFAULTS, apply_override, config_from_dict, critic_spec, deep_merge, describe,
                               load_config, parse_override, to_dict, validate, with_method_defaults)
from rlmt.config.sections import (Config, ConfigError, CriticConfig, DataConfig, DPOConfig, EvalConfig, GrapeConfig, LoraConfig,
                                  ModelConfig, OptimConfig, PolicyGradientConfig, PPOConfig, RejectionConfig,
                                  RewardConfig, RewardModelConfig, RolloutConfig, RunConfig, RuntimeConfig, DistConfig, EnvConfig,
                                  SFTConfig, TRPOConfig, doc, section)

__all__ = ["METHOD_DEFAULTS", "RESUME_SAFE", "config_changes", "training_changes", "Config", "ConfigError", "CriticConfig", "DPOConfig", "DataConfig", "EvalConfig", "GrapeConfig",
           "LoraConfig", "ModelConfig", "OptimConfig", "PPOConfig", "PolicyGradientConfig", "RejectionConfig",
           "RewardConfig", "RewardModelConfig", "RolloutConfig", "RunConfig", "RuntimeConfig", "DistConfig", "EnvConfig", "SFTConfig",
           "TRPOConfig", "apply_override", "config_from_dict", "critic_spec", "deep_merge", "describe", "doc", "load_config",
           "parse_override", "section", "to_dict", "validate", "with_method_defaults"]
