"""Write examples/data/addition-pref-{train,heldout}.jsonl: preference pairs for the reward model.

Prompts come from the addition task files (train: rows 200-399 of addition-train.jsonl, which the SFT file
does not use; held-out: the first 60 rows of addition-heldout.jsonl). ``chosen`` is the correct answer as a
bare number, as the prompt asks. ``rejected`` is a wrong number (off by 1, 2 or 10) in three rows of four,
and in the fourth the right number in a sentence that ignores the "only the number" instruction. The rows
keep ``answer``, so they also serve as prompt rows. Run: python examples/make_preference_data.py
"""

import json
import random
from pathlib import Path


def pair(rng: random.Random, row: dict) -> dict:
    answer = row["answer"]
    if rng.random() < 0.25:
        rejected = f"The answer is {answer}."
    else:
        rejected = str(answer + rng.choice([-10, -2, -1, 1, 2, 10]))
    return {"prompt": row["prompt"], "chosen": str(answer), "rejected": rejected, "answer": answer}


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    rng = random.Random(0)
    data = Path(__file__).parent / "data"
    splits = {"addition-pref-train.jsonl": read(data / "addition-train.jsonl")[200:400],
              "addition-pref-heldout.jsonl": read(data / "addition-heldout.jsonl")[:60]}
    for name, rows in splits.items():
        (data / name).write_text("".join(json.dumps(pair(rng, r)) + "\n" for r in rows))
