"""``rlmt demo``: GRPO teaches the embedded SmolLM2-135M-Instruct two-digit plus one-digit addition on a CPU.

What it shows: held-out accuracy *sampled at temperature 1* (4 samples per problem, on 100 problems the
training never sees) before and after a few minutes of GRPO: 8 problems x 8 samples per step, reward 1 for
a correct final number, group-relative advantages, the clipped surrogate and a KL penalty to the starting
model. The model can already add when decoding greedily (~31%) but samples noisily at T=1 (a few percent);
GRPO moves probability onto the answers it can produce, so sampled accuracy climbs.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from rlmt.config import load_config
from rlmt.tasks import write_addition_split

DEMO_CONFIG = {
    "algorithm": "grpo",
    "model": {"name": "smollm2-135m-instruct"},
    "data": {"max_prompt_tokens": 96},
    "rollout": {"num_samples": 8, "temperature": 1.0, "max_new_tokens": 12, "batch_prompts": 8},
    "reward": {"source": "math_answer"},
    "pg": {"advantage": "group", "clip_eps": 0.2, "beta": 0.04},
    "optim": {"lr": 2e-5, "batch_size": 16, "max_steps": 15, "max_grad_norm": 1.0},
    "eval": {"num_samples": 4, "temperature": 1.0, "max_new_tokens": 12, "max_prompts": 100},
    "run": {"seed": 0, "eval_before_after": True, "progress": True, "save_every": 5},
}


def run_demo(output_dir: str = "runs/demo", overrides: list[str] | None = None) -> int:
    out = Path(output_dir)
    train_path, eval_path = write_addition_split(out / "data", n_train=400, n_eval=100, seed=0)
    base = json.loads(json.dumps(DEMO_CONFIG))
    base["data"].update({"train": str(train_path), "eval": str(eval_path)})
    base["run"]["output_dir"] = str(out / "run")
    if (out / "run" / "final").exists():  # a finished demo: start over (it is regenerated, not user data)
        shutil.rmtree(out / "run")
    elif (out / "run" / "checkpoints").exists():  # an interrupted demo continues where it stopped
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
    from rlmt.report import write_report

    report = write_report(run_dir)
    print(f"wall time: {minutes:.1f} min on {machine()}; run directory: {run_dir}; report: {report}")
    return 0


def machine() -> str:
    """The CPU (or GPU) and its float32 matrix-product rate measured now (1024^3, ~0.1 s): wall times differ
    several-fold between machines, and this says which kind a figure came from."""
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.processor() or "CPU"
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    t = time.perf_counter()
    for _ in range(4):
        a @ b
    gflops = 4 * 2 * 1024**3 / (time.perf_counter() - t) / 1e9
    return f"{name}, {torch.get_num_threads()} threads, float32 matmul {gflops:.0f} GFLOP/s"
