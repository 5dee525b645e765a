"""Write examples/data/steps-{train,eval}.jsonl: multi-step addition with per-step correctness labels.

Each row adds 3 or 4 numbers one at a time, one step per line ("12 + 7 = 19", "19 + 5 = 24"). About a
third of the solutions slip once (a partial sum off by 1 to 10); the slip and every step after it are
labelled 0 (the solution can no longer be right), the steps before it 1. ``answer`` is the true total,
so the rows also serve as prompt rows. Run: python examples/make_steps_data.py
"""

import json
import random
from pathlib import Path


def solution(rng: random.Random, numbers: list[int]) -> tuple[list[str], list[int]]:
    slip = rng.randrange(1, len(numbers)) if rng.random() < 0.35 else None
    steps, labels, total, ok = [], [], numbers[0], True
    for k, n in enumerate(numbers[1:], 1):
        result = total + n
        if k == slip:
            result += rng.choice([-1, 1]) * rng.randint(1, 10)
            ok = False
        steps.append(f"{total} + {n} = {result}")
        labels.append(int(ok))
        total = result
    return steps, labels


def rows(rng: random.Random, count: int) -> list[dict]:
    out = []
    for _ in range(count):
        numbers = [rng.randint(1, 60) for _ in range(rng.choice([3, 4]))]
        steps, labels = solution(rng, numbers)
        out.append({"prompt": f"What is {' + '.join(map(str, numbers))}? Add one number per line.",
                    "steps": steps, "labels": labels, "answer": sum(numbers)})
    return out


if __name__ == "__main__":
    rng = random.Random(0)
    data = Path(__file__).parent / "data"
    for name, count in (("steps-train.jsonl", 320), ("steps-eval.jsonl", 80)):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows(rng, count)))
