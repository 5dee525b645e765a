"""``guess_number``: find a secret integer from "higher" / "lower" feedback, in as few turns as possible.

The secret is the row's ``answer`` (or ``secret``) when it has one, else drawn from [low, high] by the episode's
seed (the G episodes of a group share it). Each turn the last integer in the reply is the guess; the environment answers
"higher", "lower" or, with no integer, asks for one. Finding it on turn k (1-based) of at most ``env.max_turns``
earns ``1 - penalty * (k - 1)`` (at least 0), given on that turn; running out of turns earns 0.
"""

from __future__ import annotations

import random
import re

from rlmt.envs.base import Environment, Step

INTEGER = re.compile(r"-?\d+")


class GuessNumber(Environment):
    name = "guess_number"
    thread_safe = True

    def __init__(self, low: int = 1, high: int = 100, penalty: float = 0.1):
        if not low < high:
            raise ValueError(f"low ({low}) must be below high ({high})")
        if not 0.0 <= penalty <= 1.0:
            raise ValueError(f"penalty must be in [0, 1], got {penalty}")
        self.low, self.high, self.penalty = int(low), int(high), float(penalty)

    @classmethod
    def required_fields(cls, args: dict) -> dict:
        return {}  # the secret is optional: the row's answer, or drawn from the seed

    def reset(self, row: dict, seed: int) -> list[dict]:
        known = row.get("answer", row.get("secret"))
        self.secret = int(known) if known is not None else random.Random(seed).randint(self.low, self.high)
        self.turn = 0
        prompt = row.get("prompt") or (f"I am thinking of an integer from {self.low} to {self.high}. Guess it: "
                                       f"reply with one number, and I will say higher or lower.")
        return [{"role": "user", "content": prompt}]

    def step(self, text: str) -> Step:
        self.turn += 1
        found = INTEGER.findall(text)
        if not found:
            return Step([{"role": "user", "content": "Reply with one integer."}], None, False, {"guess": None})
        guess = int(found[-1])
        if guess == self.secret:
            return Step([], max(0.0, 1.0 - self.penalty * (self.turn - 1)), True, {"guess": guess})
        hint = "higher" if guess < self.secret else "lower"
        return Step([{"role": "user", "content": f"{guess} is wrong: the number is {hint}."}], None, False,
                    {"guess": guess})
