"""The reward-source contract shared by verifiers, reward models, judges and rubrics.

A reward source is called with the dataset rows (dicts: ``prompt`` plus task fields such as ``answer``)
and one response text per row, and returns one score per response, or ``None`` where it could not score
(excluded from the update and counted, never silently 0), plus per-response details (parsed answers,
errors, per-item scores, critiques) that go into the run's records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

if TYPE_CHECKING:  # a type only: importing the verifiers stays free of torch
    from rlmt.data.rows import FieldCheck


def declared_fields(source_cls: type, args: dict[str, Any] | None = None) -> dict[str, FieldCheck]:
    """The row fields ``source_cls`` declares it reads with ``args`` (its ``required_fields`` classmethod),
    each with its check; {} for a class that declares none. Nothing is built."""
    hook = getattr(source_cls, "required_fields", None)
    return dict(hook(dict(args or {}))) if hook is not None else {}


def declared_range(source_cls: type, args: dict[str, Any] | None = None) -> tuple[float, float] | None:
    """The (lowest, highest) score ``source_cls`` can give with ``args`` (its ``score_range`` classmethod);
    None for a class that declares none (a reward model's scores have no fixed bounds). Nothing is built."""
    hook = getattr(source_cls, "score_range", None)
    return hook(dict(args or {})) if hook is not None else None


class RewardError(RuntimeError):
    """A reward source misbehaved (raised, returned non-finite values or the wrong number of scores)."""


@dataclass
class RewardResult:
    """``scores[i]`` is the reward of response i, or None when it could not be scored.

    ``token_rewards[i]`` (optional, dense sources such as a process RM) lists ``(char_end, reward)`` pairs:
    a reward placed on the token that ends at character ``char_end`` of response i. ``metrics`` (optional)
    are step-level figures (e.g. per-rubric-item statistics) that the online loop logs as they are.
    """

    scores: list[float | None]
    details: list[dict[str, Any]] = field(default_factory=list)
    token_rewards: list[list[tuple[int, float]]] | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class RewardSource(Protocol):
    """Anything with a ``name`` and a ``score(rows, responses) -> RewardResult`` method.

    A source may also define ``finish(run_dir: Path) -> None``: the online loop calls it once after training
    (GRAPE writes its rubric report there); and, on its class, ``required_fields(args: dict) -> {field: check}``
    (a classmethod taking its config ``args``): the row fields it reads, each with a check of the value that
    returns None or the problem in words (:data:`rlmt.data.FieldCheck`). The run checks them with the data,
    naming file, line and field, before any model loads (:func:`declared_fields`); and
    ``score_range(args: dict) -> (lowest, highest)``, the bounds of its scores (:func:`declared_range`; the
    report clips the reward band to them).
    """

    name: str

    def score(self, rows: Sequence[dict], responses: Sequence[str]) -> RewardResult: ...


def score_checked(source: RewardSource, rows: Sequence[dict], responses: Sequence[str],
                  invalid_as_none: bool = False) -> RewardResult:
    """Call ``source`` and check what it returned.

    Raises :class:`RewardError` naming the source when it raises, returns the wrong number of scores or a
    non-finite score. With ``invalid_as_none`` a non-finite score becomes ``None`` (excluded and counted in
    ``details[i]["error"]``) instead; a wrong count or an exception is always an error.
    """
    if len(rows) != len(responses):
        raise RewardError(f"reward source {source.name!r}: {len(rows)} rows but {len(responses)} responses")
    try:
        result = source.score(rows, responses)
    except RewardError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the source's name
        raise RewardError(f"reward source {source.name!r} raised {type(e).__name__}: {e}") from e
    if not isinstance(result, RewardResult):
        raise RewardError(f"reward source {source.name!r} returned {type(result).__name__}, not RewardResult")
    if len(result.scores) != len(responses):
        raise RewardError(
            f"reward source {source.name!r} returned {len(result.scores)} scores for {len(responses)} responses"
        )
    details = list(result.details) if result.details else [{} for _ in responses]
    if len(details) != len(responses):
        raise RewardError(f"reward source {source.name!r} returned {len(details)} details for {len(responses)} responses")
    scores: list[float | None] = []
    for i, s in enumerate(result.scores):
        if s is None:
            scores.append(None)
            continue
        try:
            v = float(s)
        except (TypeError, ValueError):
            raise RewardError(f"reward source {source.name!r} returned a non-number score {s!r} for response {i}")
        if not math.isfinite(v):
            if not invalid_as_none:
                raise RewardError(f"reward source {source.name!r} returned a non-finite score {v} for response {i}")
            details[i] = {**details[i], "error": f"non-finite score {v}"}
            scores.append(None)
            continue
        scores.append(v)
    token_rewards = result.token_rewards
    if token_rewards is not None and len(token_rewards) != len(responses):
        raise RewardError(f"reward source {source.name!r} returned {len(token_rewards)} token-reward lists for "
                          f"{len(responses)} responses")
    return RewardResult(scores, details, token_rewards, dict(result.metrics or {}))
