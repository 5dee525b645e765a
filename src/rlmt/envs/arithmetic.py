"""``tool_arithmetic``: arithmetic too long to do reliably in one's head, with tools at hand.

A row is ``{"prompt": "What is 482 * 37?", "answer": 17834}`` (:func:`rlmt.tasks.tool_arithmetic_rows`). The
model may call the run's tools (``env.tools``: ``calculator``, ``python``) any number of turns; a turn without
a tool call is its final answer, rewarded 1.0 when its last number equals ``answer``
(:func:`rlmt.rewards.math_answer.answers_match`) and 0.0 otherwise. Running out of turns or tokens first
(truncation) earns 0.0. Without tools the first turn is the answer.
"""

from __future__ import annotations

import abc

from rlmt.envs.base import Environment, Step
from rlmt.envs.tools import Toolbox, parse_tool_calls


class ToolEnvironment(Environment):
    """An environment whose turns are tool calls until a turn without one, which :meth:`finish` scores."""

    def __init__(self, toolbox: Toolbox | None = None):
        self.toolbox = toolbox

    def step(self, text: str) -> Step:
        calls = parse_tool_calls(text) if self.toolbox is not None and self.toolbox.tools else []
        if not calls:
            reward = self.finish(text)
            return Step([], reward, True, {"tool_calls": 0, "tool_errors": 0})
        replies, errors = [], 0
        for call in calls:
            out, failed = self.toolbox.call(call)
            errors += failed
            replies.append({"role": "tool", "content": out})
        return Step(replies, None, False, {"tool_calls": len(calls), "tool_errors": errors})

    @abc.abstractmethod
    def finish(self, text: str) -> float | None:
        """The reward of the final answer ``text`` (a turn without a tool call)."""


class ToolArithmetic(ToolEnvironment):
    name = "tool_arithmetic"
    thread_safe = True

    @classmethod
    def required_fields(cls, args: dict) -> dict:
        from rlmt.rewards.math_answer import gold_answer_problem

        return {"answer": gold_answer_problem}

    def reset(self, row: dict, seed: int) -> list[dict]:
        if "answer" not in row:
            raise ValueError("tool_arithmetic rows need an 'answer'")
        self.answer = row["answer"]
        prompt = row["prompt"]
        return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]

    def finish(self, text: str) -> float:
        from rlmt.rewards.math_answer import answers_match, extract_answer

        return 1.0 if answers_match(extract_answer(text), self.answer) else 0.0
