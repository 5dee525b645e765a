"""rlmt: Reinforcement Learning for Model Training.

One library and one training loop for the post-training ladder: SFT, rejection sampling, policy gradient
(REINFORCE, TRPO, PPO, GRPO), preferences (reward models, DPO) and GRAPE. The math lives in
``rlmt.objectives`` (pure functions of tensors), reward sources in ``rlmt.rewards``.

Importing rlmt on Linux sets ``THP_MEM_ALLOC_ENABLE=1`` unless the environment already sets it: torch's CPU
allocator reads it at its first allocation, so it must be set before any tensor exists (see
:mod:`rlmt.allocator` for what it does and what it measured). Set ``THP_MEM_ALLOC_ENABLE=0`` to keep torch's
default.
"""

import os as _os
import sys as _sys

if _sys.platform.startswith("linux"):
    _os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
