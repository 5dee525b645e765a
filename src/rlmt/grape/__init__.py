"""GRAPE: Generalized Relative Advantage Policy Evolution (see shared DESIGN.md, section GRAPE).

- :mod:`rlmt.grape.rubric`: rubric files (categories, system prompts, weighted items, scoring flows);
- :mod:`rlmt.grape.critic`: critics (json or logprobs mode) that see the response as untrusted data;
- :mod:`rlmt.grape.scorer`: the ``rubric`` reward source (verifiers first, gates, cached critic batch,
  confidence-weighted aggregation);
- :mod:`rlmt.grape.oversight`: per-item statistics and the rubric report.

``algorithm: grape`` is the online loop with this reward source and GRPO's group-relative, PPO-clipped
update (with the KL term to the reference); its optional critique-revise step is :mod:`rlmt.train.revise`.
"""

from rlmt.grape.rubric import Rubric, RubricError, RubricItem, load_rubric

__all__ = ["Rubric", "RubricError", "RubricItem", "load_rubric"]
