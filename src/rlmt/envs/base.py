"""The environment contract: an episode is a conversation the policy plays one assistant turn at a time.

    messages = env.reset(row, seed)          # the opening messages (system/user), before the first turn
    step = env.step(assistant_text)          # -> Step(messages, reward, done, info)
    ...                                      # until step.done, env.max_turns or env.max_total_tokens
    r_trunc = env.truncated()                # only when the limits ended the episode first

One instance plays one episode; the loop builds a fresh one per episode (:func:`env_factory`). The G episodes
of a group share the row and the seed, so the group's baseline compares like with like; their openings may
still differ (a debate's two sides: a class method ``bind_group(envs)`` sees a group's environments before
they reset), and the common token prefix is the group's prompt. Environments that couple episodes define a
class method ``settle(envs, steps) -> steps``, called once a turn after every episode has stepped.

Rewards. ``Step.reward`` is the reward of the turn just played (None: none for this turn, counted as 0); the
episode's return is the sum of its turn rewards, plus ``truncated()`` when the limits ended it (0.0 unless an
environment says otherwise; None makes the episode unscored). Per-turn rewards reach PPO and REINFORCE as dense
token rewards on the last token of their turn; GRPO, GSPO and GRAPE use the return. An environment that raises
ends its episode unscored (the reward contract's None: excluded from the update, counted in ``env/errors``).

A single-turn reward source is the trivial environment (:class:`SingleTurn`: one step, done, scored by the
source). With ``env.source`` unset the online loop runs that case on its batched single-turn path, which
scores all responses of a step in one call to the source.
"""

from __future__ import annotations

import abc
import copy
import difflib
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from rlmt.config import ConfigError


@dataclass
class Step:
    """What an environment returns for one assistant turn."""

    messages: list[dict] = field(default_factory=list)  # appended after the assistant turn: {role, content}
    reward: float | None = None  # this turn's reward (None: none, counted as 0; NaN: the episode is unscored)
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # counted: tool_calls, tool_errors; "metrics": {name:
    # value} figures of the environment's own, logged as env/NAME (the mean over the episodes that report it)


class Environment(abc.ABC):
    """Base class of environments (see the module docstring). Subclasses implement ``reset`` and ``step``."""

    name = "environment"
    # True: the steps of different episodes (each its own instance) may run at once on threads
    # (env.step_workers), as nothing is shared between instances that a step changes. Opt in; the default
    # steps episodes one after another.
    thread_safe = False

    @abc.abstractmethod
    def reset(self, row: dict, seed: int) -> list[dict]:
        """The opening messages of an episode of ``row`` with environment seed ``seed``."""

    @abc.abstractmethod
    def step(self, text: str) -> Step:
        """The environment's answer to the assistant turn ``text``."""

    def truncated(self) -> float | None:
        """The reward added when ``env.max_turns`` or ``env.max_total_tokens`` ended the episode before it was
        done: 0.0 (no credit for an unfinished episode); None makes the episode unscored."""
        return 0.0


class SingleTurn(Environment):
    """The trivial environment: the row's prompt, one response, scored by a reward source (``source``: a
    registered name, built with ``args``, or a source object). The contract's base case; for training on a
    reward source, leaving ``env.source`` unset is the same thing done in batch (one scoring call a step, the
    source's ``prepare_rows`` and field checks, ``reward.invalid_as_none``)."""

    name = "single_turn"

    def __init__(self, source: Any = "math_answer", args: dict | None = None):
        if isinstance(source, str):
            from rlmt.rewards import build_reward_source

            source = build_reward_source(source, args)
        self.source = source

    def reset(self, row: dict, seed: int) -> list[dict]:
        self.row = row
        prompt = row["prompt"]
        return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]

    def step(self, text: str) -> Step:
        from rlmt.rewards import score_checked

        result = score_checked(self.source, [self.row], [text])
        return Step([], result.scores[0], True, result.details[0] if result.details else {})


# config name -> (module, class); anything else of the form 'module:Class' is imported as given
REGISTRY: dict[str, tuple[str, str]] = {
    "single_turn": ("rlmt.envs.base", "SingleTurn"),
    "tool_arithmetic": ("rlmt.envs.arithmetic", "ToolArithmetic"),
    "guess_number": ("rlmt.envs.guess", "GuessNumber"),
    "debate": ("rlmt.envs.debate", "Debate"),
}


def env_class(name: str) -> type:
    """The environment class named ``name`` (a registry name or 'module:Class'); a ConfigError naming
    ``env.source`` when there is none."""
    if name in REGISTRY:
        module, cls_name = REGISTRY[name]
    elif ":" in name:
        module, cls_name = name.split(":", 1)
    else:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"env.source: unknown environment {name!r}{hint} (known: {sorted(REGISTRY)}, or "
                          f"'module:Class')")
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"env.source: cannot import {name!r}: {e}") from e
    if not (isinstance(cls, type) and callable(getattr(cls, "reset", None)) and callable(getattr(cls, "step", None))):
        raise ConfigError(f"env.source: {name!r} is not an environment class (it needs reset and step methods)")
    return cls


def check_env_fields(cfg, rows: list, report, on_invalid: str | None = None) -> list:
    """``rows`` whose fields the environment reads (its class's ``required_fields(args) -> {field: check}``,
    as reward sources declare theirs) pass their checks: a bad row is a DataError naming file, line and field
    before any model loads, or with ``data.on_invalid=skip`` dropped and counted."""
    from rlmt.data import check_fields

    cls = env_class(cfg.env.source)
    hook = getattr(cls, "required_fields", None)
    fields = dict(hook(dict(cfg.env.args))) if hook is not None else {}
    kept = check_fields(rows, fields, f"environment {cfg.env.source!r}", on_invalid or cfg.data.on_invalid, report)
    report.require(len(kept))
    return kept


def env_factory(cfg, toolbox=None) -> Callable[[], Environment]:
    """A function building one fresh environment per episode from ``env.source`` and ``env.args``; a class that
    takes ``toolbox`` gets the run's tools (``env.tools``). Arguments are checked against the constructor first
    (a ConfigError naming ``env.args.ARG``)."""
    cls = env_class(cfg.env.source)
    args = dict(cfg.env.args)
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        known = [p for p in params if p not in ("self", "toolbox")]
        for arg in args:
            if arg not in known:
                close = difflib.get_close_matches(str(arg), known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"env.args.{arg}: not an argument of environment {cfg.env.source!r}{hint} "
                                  f"(it takes: {known})")
    if "toolbox" in params:
        args["toolbox"] = toolbox
    elif cfg.env.tools:
        raise ConfigError(f"env.tools: environment {cfg.env.source!r} does not use tools")
    tools = {"toolbox": args.pop("toolbox")} if "toolbox" in args else {}

    def make() -> Environment:  # each episode its own copy of the arguments; the tools are shared
        return cls(**copy.deepcopy(args), **tools)

    try:
        probe = make()  # the arguments are good now, not at the first episode
    except (TypeError, ValueError) as e:
        raise ConfigError(f"env.args: bad arguments for environment {cfg.env.source!r} {cfg.env.args}: {e}") from e
    needs = int(getattr(probe, "min_turns", 1))  # debate: its rounds
    if needs > cfg.env.max_turns:
        raise ConfigError(f"env.max_turns: environment {cfg.env.source!r} needs {needs} turns, got "
                          f"{cfg.env.max_turns}")
    multiple = int(getattr(cls, "group_multiple", 1))  # debate: episodes come in pairs
    for key, n in (("rollout.num_samples", cfg.rollout.num_samples), ("eval.num_samples", cfg.eval.num_samples)):
        if n % multiple:
            raise ConfigError(f"{key}: environment {cfg.env.source!r} needs a multiple of {multiple}, got {n}")
    return make
