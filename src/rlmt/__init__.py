"""rlmt: Reinforcement Learning for Model Training.

One library and one training loop for the post-training ladder: SFT, rejection sampling, policy gradient
(REINFORCE, TRPO, PPO, GRPO), preferences (reward models, DPO) and GRAPE. The math lives in
``rlmt.objectives`` (pure functions of tensors), reward sources in ``rlmt.rewards``.

Importing rlmt changes nothing in the process. The process settings of a run (``cfg.runtime``: threads, glibc's
mmap threshold, heap trims) are applied when the run starts (:func:`rlmt.runtime.apply_runtime`). Huge pages
for CPU tensors (``runtime.huge_pages``) are the environment variable ``THP_MEM_ALLOC_ENABLE=1``, which torch's
CPU allocator reads once, at its first allocation: the ``rlmt`` command line sets it before torch loads (unless
the environment already sets it); a program that uses rlmt as a library sets it before it starts or before it
imports torch. The run reports whether they are in effect (:attr:`rlmt.runtime.RuntimeState.huge_pages_active`).
"""

__version__ = "0.1.0"
