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
