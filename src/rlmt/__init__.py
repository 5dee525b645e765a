"""rlmt: Reinforcement Learning for Model Training.

One library and one training loop for the post-training ladder: SFT, rejection sampling, policy gradient
(REINFORCE, TRPO, PPO, GRPO), preferences (reward models, DPO) and GRAPE. The math lives in
``rlmt.objectives`` (pure functions of tensors), reward sources in ``rlmt.rewards``.
"""

__version__ = "0.1.0"
