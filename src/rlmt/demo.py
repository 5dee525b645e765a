"""``rlmt demo``: the embedded SmolLM2-135M-Instruct learns two-digit plus one-digit addition on a CPU.

What it shows: held-out accuracy *sampled at temperature 1* before and after training, on problems the
training never saw. The ladder used: rejection sampling at a lower temperature (sample G answers per
problem, keep the correct ones, fine-tune on them), which sharpens the model's noisy T=1 distribution
toward the answers it can already produce greedily.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rlmt.config import load_config
from rlmt.tasks import write_addition_split

DEMO_CONFIG = {
    "algorithm": "rejection_sampling",
    "model": {"name": "smollm2-135m-instruct"},
    "data": {"max_prompt_tokens": 96},
    "rollout": {"num_samples": 8, "temperature": 0.7, "max_new_tokens": 12, "batch_prompts": 8},
    "reward": {"source": "math_answer", "args": {"mode": "auto"}},
    "rejection": {"rounds": 3, "prompts_per_round": 48, "keep_top_k": 2, "threshold": 1.0, "sft_epochs": 2.0},
    "optim": {"lr": 2e-5, "batch_size": 8, "grad_accum": 1, "warmup_steps": 2, "max_grad_norm": 1.0},
    "eval": {"num_samples": 4, "temperature": 1.0, "max_new_tokens": 12, "max_prompts": 64},
    "run": {"seed": 0, "eval_before_after": True, "progress": False, "save_every": 0},
}


def run_demo(output_dir: str = "runs/demo", overrides: list[str] | None = None) -> int:
    out = Path(output_dir)
    train_path, eval_path = write_addition_split(out / "data", n_train=400, n_eval=100, seed=0)
    base = json.loads(json.dumps(DEMO_CONFIG))
    base["data"].update({"train": str(train_path), "eval": str(eval_path)})
    base["run"]["output_dir"] = str(out / "run")
    if (out / "run" / "checkpoints").exists():
        base["run"]["resume"] = "true"
    cfg = load_config(None, overrides, base=base)
    print(f"rlmt demo: {cfg.algorithm} on {cfg.model.name}, addition problems, held-out accuracy sampled at "
          f"T={cfg.eval.temperature} (K={cfg.eval.num_samples} per problem)", file=sys.stderr)
    from rlmt.train.runner import train

    t0 = time.time()
    run_dir = train(cfg)
    before = json.loads((run_dir / "eval-before.json").read_text()) if (run_dir / "eval-before.json").exists() else {}
    after = json.loads((run_dir / "eval-after.json").read_text())
    minutes = (time.time() - t0) / 60
    print("\n=== rlmt demo result ===")
    print(f"held-out sampled accuracy (pass@1, T={cfg.eval.temperature}): "
          f"{before.get('pass@1', float('nan')):.1%} -> {after['pass@1']:.1%}")
    print(f"held-out mean reward: {before.get('reward/mean', float('nan')):.3f} -> {after['reward/mean']:.3f}")
    print(f"wall time: {minutes:.1f} min; run directory: {run_dir}")
    return 0
