"""``rlmt train``: ``algorithm`` -> the loop that runs it, chosen once here.

Online methods (rejection sampling, REINFORCE, GRPO, GSPO, PPO, TRPO, GRAPE) run the online loop with their
row of :data:`rlmt.train.methods.METHODS`; offline ones (SFT, DPO, the reward models) the offline loop with
their task (:mod:`rlmt.train.offline`); ``pipeline`` runs stages of either.

Started by torchrun (``rlmt train --nproc-per-node N``), every process runs this same function: it joins the
job (:func:`rlmt.train.session.join_world`), the config is checked identical on every rank, and the loops
split each global batch across the ranks.
"""

from __future__ import annotations

from pathlib import Path

from rlmt.config import Config, with_method_defaults
from rlmt.parallel import World, close_world
from rlmt.trackers import check_trackers
from rlmt.train.session import check_output_dir, join_world


def _offline_task(algorithm: str):
    if algorithm == "sft":
        from rlmt.train.sft import SFT as task
    elif algorithm == "dpo":
        from rlmt.train.dpo import DPO as task
    elif algorithm == "reward_model":
        from rlmt.train.reward_model import REWARD_MODEL as task
    else:
        from rlmt.train.process_reward_model import PROCESS_REWARD_MODEL as task
    return task


OFFLINE = ("sft", "dpo", "reward_model", "process_reward_model")


def train(cfg: Config, world: World | None = None) -> Path:
    """Run ``cfg.algorithm`` and return the run directory. ``world``: the job this process already joined
    (a pipeline's stages share one); by default joined here from torchrun's environment and left at the end."""
    cfg = with_method_defaults(cfg)
    own = world is None
    world = join_world(cfg) if own else world
    try:
        run_dir = _run(cfg, world)
    except BaseException:
        if own:
            close_world(world, together=False)
        raise
    if own:
        close_world(world)
    return run_dir


def _run(cfg: Config, world: World) -> Path:
    world.on_main(lambda: (check_output_dir(cfg), check_trackers(cfg.run)))  # before any data or model loads
    if cfg.algorithm == "pipeline":
        from rlmt.train.pipeline import train_pipeline

        return train_pipeline(cfg, lambda stage: train(stage, world), world)
    if cfg.algorithm in OFFLINE:
        from rlmt.train.offline import train_offline

        return train_offline(cfg, _offline_task(cfg.algorithm), world)
    from rlmt.train.methods import METHODS
    from rlmt.train.online import train_online

    return train_online(cfg, METHODS[cfg.algorithm], world)
