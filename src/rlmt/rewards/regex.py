"""Verifier that rewards responses matching a regular expression (format checks, required tags).

The pattern and flags are checked once at construction, so a typo in a config fails before training
starts. Matching time is bounded by scanning at most ``scan_chars`` characters of each response.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

from rlmt.rewards.base import RewardResult

MODES = ("search", "fullmatch")
FLAGS: dict[str, re.RegexFlag] = {
    "IGNORECASE": re.IGNORECASE,
    "MULTILINE": re.MULTILINE,
    "DOTALL": re.DOTALL,
    "VERBOSE": re.VERBOSE,
    "ASCII": re.ASCII,
}


def _finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"regex: {name} must be finite, got {value}")
    return value


class RegexReward:
    """Reward ``reward`` when a response matches ``pattern``, else ``penalty``.

    ``mode`` "search" looks for the pattern anywhere, "fullmatch" requires the whole response to match;
    a response longer than ``scan_chars`` cannot be checked whole, so under "fullmatch" it gets the
    penalty. ``flags`` are names from :data:`FLAGS`. Responses longer than ``max_chars`` get the penalty.
    """

    name = "regex"

    @classmethod
    def score_range(cls, args: dict[str, Any]) -> tuple[float, float]:
        """The lower and the higher of ``reward`` and ``penalty``: the only scores it gives."""
        scores = (float(args.get("reward", 1.0)), float(args.get("penalty", 0.0)))
        return min(scores), max(scores)

    def __init__(self, pattern: str, mode: str = "search", flags: Sequence[str] | None = None,
                 reward: float = 1.0, penalty: float = 0.0, max_chars: int | None = None,
                 scan_chars: int = 20000) -> None:
        if mode not in MODES:
            raise ValueError(f"regex: unknown mode {mode!r}; expected one of {MODES}")
        if isinstance(flags, str):
            raise ValueError(f"regex: flags must be a list of names, got the string {flags!r}")
        combined = re.RegexFlag(0)
        for flag in flags or []:
            if str(flag).upper() not in FLAGS:
                raise ValueError(f"regex: unknown flag {flag!r}; expected names from {sorted(FLAGS)}")
            combined |= FLAGS[str(flag).upper()]
        if not isinstance(pattern, str):
            raise ValueError(f"regex: pattern must be a string, got {type(pattern).__name__}")
        try:
            self.regex = re.compile(pattern, combined)
        except re.error as e:
            raise ValueError(f"regex: invalid pattern {pattern!r}: {e}") from e
        if max_chars is not None and (isinstance(max_chars, bool) or int(max_chars) < 0):
            raise ValueError(f"regex: max_chars must be a non-negative integer or None, got {max_chars!r}")
        if isinstance(scan_chars, bool) or int(scan_chars) < 1:
            raise ValueError(f"regex: scan_chars must be a positive integer, got {scan_chars!r}")
        self.mode = mode
        self.reward = _finite("reward", reward)
        self.penalty = _finite("penalty", penalty)
        self.max_chars = None if max_chars is None else int(max_chars)
        self.scan_chars = int(scan_chars)

    def _check(self, response: str) -> dict[str, Any]:
        """Details for one response: ``matched``, ``match`` (first 200 chars), ``too_long``, ``truncated``."""
        too_long = self.max_chars is not None and len(response) > self.max_chars
        truncated = len(response) > self.scan_chars
        match = None
        if not too_long and not (truncated and self.mode == "fullmatch"):
            text = response[: self.scan_chars]
            match = self.regex.search(text) if self.mode == "search" else self.regex.fullmatch(text)
        return {"matched": match is not None, "match": match.group(0)[:200] if match else None,
                "too_long": too_long, "truncated": truncated}

    def score(self, rows: Sequence[dict], responses: Sequence[str]) -> RewardResult:
        """One score per response (``rows`` are not used), with details from :meth:`_check`."""
        details = [self._check(response or "") for response in responses]
        return RewardResult([self.reward if d["matched"] else self.penalty for d in details], details)
