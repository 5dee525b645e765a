"""Step time on 1 and 2 processes at the same global batch: GRPO and SFT, through ``rlmt train
--nproc-per-node``, side by side in one run.

Each configuration runs as its own ``rlmt train`` (one process, or two gloo processes started by torchrun
with one thread each), with the same config and global batch. Reported per method and process count: the
median seconds per step (steps after the first), the share of it spent summing gradients across ranks
(``time/grad_sync_s``, waiting for the slower rank included), and the ratio 2-process / 1-process time.
The final weights of the two runs are compared as a check (max abs difference).

On a small CPU machine the two processes share the same cores, so this measures the cost of splitting a
step across processes (collectives, per-process overhead, one thread each), not a speed-up: a speed-up
needs a core (or a GPU) per process. The header prints the CPU and its measured matmul rates.

    python benchmarks/scaling.py                          # SmolLM2-135M, 3 steps each
    python benchmarks/scaling.py --model tiny-random --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_header  # noqa: E402


def configs(model: str, steps: int, data: Path) -> dict[str, list[str]]:
    from rlmt.tasks import write_addition_split

    train, _ = write_addition_split(data, 64, 4)
    sft = data / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"What is {i} + {i % 9}?", "completion": str(i + i % 9)}) + "\n"
                           for i in range(64)))
    common = [f"model.name={model}", f"optim.max_steps={steps}", "run.progress=false", "optim.lr=1e-5"]
    return {
        "grpo": ["algorithm=grpo", f"data.train={train}", "rollout.num_samples=8", "rollout.batch_prompts=4",
                 "rollout.max_new_tokens=32", "optim.batch_size=8", "reward.source=math_answer"] + common,
        "sft": ["algorithm=sft", f"data.train={sft}", "optim.batch_size=8", "optim.grad_accum=2"] + common,
    }


def run(args: list[str], out: Path, nproc: int) -> dict:
    launch = ["--nproc-per-node", str(nproc)] if nproc > 1 else []
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rlmt", "train", *launch, *args, f"run.output_dir={out}"],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"rlmt train failed ({nproc} processes):\n{proc.stderr[-3000:]}")
    from rlmt.records import read_metrics

    rows = read_metrics(out)[1:] or read_metrics(out)
    step = statistics.median(r["time/step_s"] for r in rows)
    sync = statistics.median(r.get("time/grad_sync_s", 0.0) for r in rows)
    return {"step_s": step, "sync_s": sync, "wall_s": wall}


def max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--only", choices=["grpo", "sft"], default=None)
    a = p.parse_args()
    print(machine_header())
    print(f"model {a.model}, {a.steps} steps, same global batch on 1 and 2 processes (gloo, the cores shared "
          "among the processes)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for method, args in configs(a.model, a.steps, tmp).items():
            if a.only and method != a.only:
                continue
            one = run(args, tmp / f"{method}-1", 1)
            two = run(args, tmp / f"{method}-2", 2)
            diff = max_weight_diff(tmp / f"{method}-1", tmp / f"{method}-2")
            print(f"{method}: 1 process {one['step_s']:.2f} s/step | 2 processes {two['step_s']:.2f} s/step, "
                  f"gradient sum {two['sync_s']:.3f} s ({100 * two['sync_s'] / two['step_s']:.1f}% of the step) | "
                  f"ratio 2/1 {two['step_s'] / one['step_s']:.2f}x | wall {one['wall_s']:.0f} s vs "
                  f"{two['wall_s']:.0f} s | max weight difference {diff:.1e}")


if __name__ == "__main__":
    main()
