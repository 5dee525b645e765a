"""Multi-turn environments and tools for the online loop: the contract (:mod:`rlmt.envs.base`), token-in
token-out conversations (:mod:`rlmt.envs.render`), tools (:mod:`rlmt.envs.tools`), batched episodes
(:mod:`rlmt.envs.episodes`) and the environments shipped (``tool_arithmetic``, ``guess_number``)."""

from rlmt.envs.base import REGISTRY, Environment, SingleTurn, Step, env_class, env_factory
from rlmt.envs.episodes import Episode, EpisodeBatch, run_episodes
from rlmt.envs.render import Renderer, tool_instructions
from rlmt.envs.tools import Tool, ToolCall, ToolError, Toolbox, calculate, parse_tool_calls, toolbox_for

__all__ = ["REGISTRY", "Environment", "Episode", "EpisodeBatch", "Renderer", "SingleTurn", "Step", "Tool", "ToolCall",
           "ToolError", "Toolbox", "calculate", "env_class", "env_factory", "parse_tool_calls", "run_episodes",
           "tool_instructions", "toolbox_for"]
