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


def open_descriptors() -> str:
    """The descriptors open in the tool's process above 2, as 'pipes: ...; others: ...'."""
    import os
    import stat

    pipes, others = [], []
    for fd in sorted(int(x) for x in os.listdir("/proc/self/fd")):
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            continue
        if fd > 2:
            (pipes if stat.S_ISFIFO(mode) else others).append(str(fd))
    return f"pipes: {' '.join(pipes)}; others: {' '.join(others)}"
