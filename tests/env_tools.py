"""User tools for tests/test_env_tools.py (imported as 'env_tools:NAME')."""

import time


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def sleepy(seconds: float) -> str:
    """Sleep, then answer."""
    time.sleep(seconds)
    return "awake"


def broken(x: str) -> str:
    raise RuntimeError(f"cannot handle {x}")


def lookup(key: str) -> str:
    return {"a": "1"}[key]


lookup.schema = {"name": "lookup", "description": "Look a key up.",
                 "parameters": {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]}}
