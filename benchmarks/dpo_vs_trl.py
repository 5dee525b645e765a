"""DPO step time and peak memory: rlmt vs TRL's DPOTrainer, side by side in one run.

Same model (SmolLM2-135M-Instruct, float32, CPU), same data (128 arithmetic pairs: chosen states the right
sum, rejected is off by a little), same settings: 8 pairs per step, lr 5e-6, beta 0.1, gradient
checkpointing (TRL's default). Each side runs in its own process. rlmt computes the reference log-probs of
all pairs once before training (TRL runs the reference model every step); the one-off cost is printed
separately and also shown amortized over the steps run.

    python benchmarks/dpo_vs_trl.py --steps 6          # needs `pip install -e .[bench]`
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import bf16, extra_overrides, max_grad_norm, peak_rss_mb, side_by_side, trl_step_timer  # noqa: E402

PAIRS_PER_STEP, LR, BETA = 8, 5e-6, 0.1


def _pairs(n: int = 128) -> list[dict]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(1, 9)
        wrong = a + b + rng.choice([-2, -1, 1, 2, 10])
        out.append({"prompt": f"What is {a} + {b}? Reply with only the number.",
                    "chosen": f"The answer is {a + b}.", "rejected": f"The answer is {wrong}."})
    return out


def rlmt_overrides(data: Path, steps: int, work: Path) -> list[str]:
    """rlmt's settings (also used by memory_profile.py). Gradient checkpointing as in TRL, whose DPOConfig
    turns it on by default (the math is the same; it trades recompute for activation memory)."""
    return ["algorithm=dpo", "model.name=smollm2-135m-instruct", f"data.train={data}", f"optim.lr={LR}",
            f"dpo.beta={BETA}", f"optim.batch_size={PAIRS_PER_STEP}", f"optim.max_steps={steps}",
            "model.gradient_checkpointing=true", f"run.output_dir={work / 'run'}", "run.progress=false"]


def run_rlmt(steps: int, work: Path) -> dict:
    from rlmt.config import load_config
    from rlmt.records import read_metrics
    from rlmt.train.runner import train

    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _pairs()))
    cfg = load_config(None, rlmt_overrides(data, steps, work) + [f"optim.max_grad_norm={max_grad_norm()}"]
                      + (["model.autocast=bfloat16"] if bf16() else [])
                      + extra_overrides())
    t0 = time.perf_counter()
    run = train(cfg)
    total = time.perf_counter() - t0
    step_s = [r["time/step_s"] for r in read_metrics(run)]
    return {"step_s": step_s, "total_s": total, "peak_rss_mb": peak_rss_mb(), "train_s": sum(step_s)}


def run_trl(steps: int, work: Path) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from rlmt.models import embedded_model_dir

    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in _pairs()]
    times: list[float] = []

    args = DPOConfig(output_dir=str(work / "trl"), use_cpu=True, bf16=bf16(), per_device_train_batch_size=PAIRS_PER_STEP,
                     gradient_accumulation_steps=1, max_steps=steps, logging_steps=1, learning_rate=LR, beta=BETA,
                     report_to=[], save_strategy="no", seed=0, max_grad_norm=max_grad_norm())
    trainer = DPOTrainer(model=str(embedded_model_dir()), args=args, train_dataset=Dataset.from_list(rows),
                         callbacks=[trl_step_timer(times)])
    t0 = time.perf_counter()
    trainer.train()
    return {"step_s": times, "total_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(), "train_s": sum(times)}


def main() -> None:
    results = side_by_side(__file__, __doc__, 6, run_rlmt, run_trl,
                           f"DPO step: {PAIRS_PER_STEP} pairs, beta {BETA}, lr {LR}, CPU", step_target=0.5)
    if results and "rlmt" in results:
        rl = results["rlmt"]
        print(f"rlmt one-off work outside the steps (model load, reference log-probs of all 128 pairs, saving): "
              f"{rl['total_s'] - rl['train_s']:.1f} s")


if __name__ == "__main__":
    main()
