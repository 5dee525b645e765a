"""A trained process reward model as a reward source: one score per step, aggregated into the outcome.

Each response is split into steps at the separator (empty steps dropped); the PRM scores every step at
its last token (:mod:`rlmt.train.process_reward_model`). The outcome score is the aggregate of the step
scores (min, product, mean or last); with ``dense=True`` the source also returns, per response,
``token_rewards = [(char_end_k, p_k), ...]``: step k's score placed at the character where step k ends, which
PPO and REINFORCE add at that token (:mod:`rlmt.train.dense`). A response without any step is unscored (None).
"""

from __future__ import annotations

from typing import Sequence

import torch

from rlmt.objectives.process import STEP_AGGREGATES, aggregate_steps, split_steps
from rlmt.rewards.base import RewardResult


class ProcessRewardModelReward:
    """``ProcessRewardModelReward(path)``: ``path`` is the ``final/`` directory of a process-RM run.

    Args:
        aggregate: ``min`` | ``product`` | ``mean`` | ``last``; None uses the one saved with the model.
        separator: step separator; None uses the one the model was trained with.
        dense: also return per-step rewards at the step-end characters.
        batch_size: responses per forward pass.
        device: "auto" (cuda if available), "cpu", "cuda", ...
    """

    name = "process_reward_model"

    def __init__(self, path: str, aggregate: str | None = None, separator: str | None = None, dense: bool = True,
                 batch_size: int = 16, device: str = "auto"):
        from rlmt.data import PromptFormat
        from rlmt.models.process_reward_model import load_process_reward_model
        from rlmt.models import pick_device

        if aggregate is not None and aggregate not in STEP_AGGREGATES:
            raise ValueError(f"aggregate {aggregate!r} is not one of {sorted(STEP_AGGREGATES)}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.device = pick_device(device)
        lm, self.head, meta = load_process_reward_model(path, self.device)
        self.model, self.tokenizer = lm.model, lm.tokenizer
        self.aggregate = aggregate or meta["aggregate"]
        self.separator = separator if separator is not None else meta["separator"]
        if not self.separator:
            raise ValueError("separator must not be empty")
        self.format = PromptFormat(chat=meta.get("chat", True), system_prompt=meta.get("system_prompt"))
        self.dense, self.batch_size = dense, batch_size

    @torch.no_grad()
    def step_scores(self, rows: Sequence[dict], responses: Sequence[str]) -> list[list[tuple[str, int, float]]]:
        """Per response, (step text, char_end, score) for each non-empty step."""
        from rlmt.data import encode_prompt
        from rlmt.objectives.process import step_end_positions
        from rlmt.data import token_char_ends
        from rlmt.data import StepExample
        from rlmt.models.process_reward_model import step_scores

        steps = [split_steps(r, self.separator) for r in responses]
        todo = [i for i, s in enumerate(steps) if s]
        examples = []
        for i in todo:
            ids = self.tokenizer(responses[i], add_special_tokens=False)["input_ids"]
            p_ids = encode_prompt(self.tokenizer, self.format, rows[i]["prompt"])
            # a step past the decoded text (it should not be) lands on the last token, never dropped
            pos = step_end_positions([(0, e) for _, e in steps[i]], token_char_ends(self.tokenizer, ids))
            examples.append(StepExample(p_ids, ids, pos, [0.0] * len(pos)))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        scores = step_scores(self.model, self.head, examples, self.batch_size, pad, self.device) if examples else []
        out: list[list[tuple[str, int, float]]] = [[] for _ in responses]
        for i, s in zip(todo, scores):
            out[i] = [(text, end, p) for (text, end), p in zip(steps[i], s)]
        return out

    def score(self, rows: Sequence[dict], responses: Sequence[str]) -> RewardResult:
        per_step = self.step_scores(rows, responses)
        S = max((len(s) for s in per_step), default=0)
        p = torch.zeros((len(responses), max(S, 1)))
        m = torch.zeros((len(responses), max(S, 1)), dtype=torch.bool)
        for i, s in enumerate(per_step):
            if s:
                p[i, :len(s)], m[i, :len(s)] = torch.tensor([x for _, _, x in s]), True
        outcome = aggregate_steps(p, m, self.aggregate).tolist()
        scores = [None if not s else float(o) for s, o in zip(per_step, outcome)]
        details = [{"steps": [t for t, _, _ in s], "step_scores": [x for _, _, x in s], "aggregate": self.aggregate}
                   if s else {"steps": [], "step_scores": [], "error": "no steps"} for s in per_step]
        dense = [[(end, x) for _, end, x in s] for s in per_step] if self.dense else None
        return RewardResult(scores, details, dense)
