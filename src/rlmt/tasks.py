"""Built-in verifiable tasks, generated deterministically (no downloads): used by the demo and examples."""

from __future__ import annotations

import json
import random
from pathlib import Path

ADDITION_INSTRUCTION = "Reply with only the number."


def addition_rows(n: int, seed: int, exclude: set[tuple[int, int]] | None = None) -> list[dict]:
    """``n`` distinct two-digit plus one-digit problems: {"prompt": "What is 47 + 8? ...", "answer": 55}."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(0, 10) if not exclude or (a, b) not in exclude]
    rng.shuffle(pairs)
    if n > len(pairs):
        raise ValueError(f"only {len(pairs)} distinct problems available, asked for {n}")
    return [{"prompt": f"What is {a} + {b}? {ADDITION_INSTRUCTION}", "answer": a + b} for a, b in pairs[:n]]


def write_addition_split(directory: Path, n_train: int, n_eval: int, seed: int = 0) -> tuple[Path, Path]:
    """Disjoint train / held-out files of addition problems under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = addition_rows(n_train + n_eval, seed)
    train, held = rows[:n_train], rows[n_train:]
    paths = directory / "addition-train.jsonl", directory / "addition-heldout.jsonl"
    for path, part in zip(paths, (train, held)):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


def tool_arithmetic_rows(n: int, seed: int) -> list[dict]:
    """``n`` problems too long to do reliably in one's head, for the ``tool_arithmetic`` environment: a
    three-digit by two-digit product or a sum of two four-digit numbers, alternately:
    {"prompt": "What is 482 * 37?", "answer": 17834}."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        if len(rows) % 2 == 0:
            a, b, op = rng.randint(100, 999), rng.randint(11, 99), "*"
        else:
            a, b, op = rng.randint(1000, 9999), rng.randint(1000, 9999), "+"
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        rows.append({"prompt": f"What is {a} {op} {b}?", "answer": a * b if op == "*" else a + b})
    return rows


def tool_call_demonstrations(rows: list[dict], system: str) -> list[dict]:
    """SFT rows that show the calculator in use, two per problem: the call, and the answer after the tool's
    reply (``messages`` rows; the loss falls on the last assistant turn). ``system`` is the tool instructions
    the environment puts in its system message (:func:`rlmt.envs.tool_instructions`)."""
    out = []
    for row in rows:
        expression = row["prompt"].removeprefix("What is ").removesuffix("?")
        opening = [{"role": "system", "content": system}, {"role": "user", "content": row["prompt"]}]
        call = {"role": "assistant", "content": '<tool_call>{"name": "calculator", "arguments": {"expression": "'
                                                f'{expression}"}}}}</tool_call>'}
        out.append({"messages": opening + [call]})
        out.append({"messages": opening + [call, {"role": "tool", "content": str(row["answer"])},
                                           {"role": "assistant", "content": f"The answer is {row['answer']}."}]})
    return out
