"""``rlmt train``: ``algorithm`` -> the loop that runs it, chosen once here.

Online methods (rejection sampling, REINFORCE, GRPO, GSPO, PPO, TRPO, GRAPE) run the online loop with their
row of :data:`rlmt.train.methods.METHODS`; offline ones (SFT, DPO, the reward models) the offline loop with
their task (:mod:`rlmt.train.offline`); ``pipeline`` runs stages of either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable


from rlmt.config import Config, with_method_defaults
from rlmt.train.session import check_output_dir
from rlmt.train.sft import train_sft


def train(cfg: Config) -> Path:
    """Run ``cfg.algorithm`` and return the run directory."""
    cfg = with_method_defaults(cfg)
    check_output_dir(cfg)  # before any data or model loads
    return ALGORITHMS[cfg.algorithm](cfg)


# ------------------------------------------------------------------------------------- rejection sampling


def _online(cfg: Config) -> Path:
    from rlmt.train.methods import METHODS
    from rlmt.train.online import train_online

    return train_online(cfg, METHODS[cfg.algorithm])


def _dpo(cfg: Config) -> Path:
    from rlmt.train.dpo import train_dpo

    return train_dpo(cfg)


def _reward_model(cfg: Config) -> Path:
    from rlmt.train.reward_model import train_reward_model

    return train_reward_model(cfg)


def _pipeline(cfg: Config) -> Path:
    from rlmt.train.pipeline import train_pipeline

    return train_pipeline(cfg, train)


def _process_reward_model(cfg: Config) -> Path:
    from rlmt.train.process_reward_model import train_process_reward_model

    return train_process_reward_model(cfg)


ALGORITHMS: dict[str, Callable[[Config], Path]] = {
    "sft": train_sft,
    "rejection_sampling": _online,
    "reinforce": _online,
    "grpo": _online,
    "gspo": _online,
    "ppo": _online,
    "trpo": _online,
    "grape": _online,
    "dpo": _dpo,
    "process_reward_model": _process_reward_model,
    "reward_model": _reward_model,
    "pipeline": _pipeline,
}
