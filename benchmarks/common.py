"""Shared pieces of the side-by-side benchmarks: per-process peak RSS and running one side in a child.

Importing it turns on huge pages for torch's CPU tensors (``THP_MEM_ALLOC_ENABLE=1``, rlmt's
``runtime.huge_pages`` default, unless the environment says otherwise): torch reads the variable once, at its
first allocation, so every benchmark imports this module before torch. The benchmarks are scripts that own
their process; rlmt itself changes nothing on import.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if sys.platform.startswith("linux"):
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what the platform says."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def matmul_gflops(dtype: str, n: int = 1024, reps: int = 4) -> float:
    import torch

    a, b = (torch.randn(n, n).to(getattr(torch, dtype)) for _ in range(2))
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return reps * 2 * n**3 / (time.perf_counter() - t) / 1e9


def machine_header() -> str:
    """The benchmark's first line: the CPU, its cores and its float32 and bfloat16 matmul rates measured now
    (1024^3 and 512^3): these machines differ several-fold, and bfloat16 is emulated on some."""
    return (f"CPU: {cpu_model()}, {os.cpu_count()} cores; matmul float32 {matmul_gflops('float32'):.0f} GFLOP/s, "
            f"bfloat16 {matmul_gflops('bfloat16', 512, 2):.0f} GFLOP/s")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def extra_overrides() -> list[str]:
    """``--rlmt-set`` overrides of the parent process, for a worker's rlmt config (e.g. to measure rlmt
    without gradient checkpointing beside the default run)."""
    return json.loads(os.environ.get("RLMT_BENCH_SET", "[]"))


def bf16() -> bool:
    """``--bf16``: both sides in bfloat16 mixed precision (TRL ``bf16=True``, rlmt ``model.autocast=bfloat16``):
    float32 weights and optimizer, forward passes under torch.autocast."""
    return os.environ.get("RLMT_BENCH_BF16", "0") == "1"


def max_grad_norm() -> float:
    """Gradient clipping of both sides (``--max-grad-norm``; 1.0 is TRL's default)."""
    return float(os.environ.get("RLMT_BENCH_MAX_GRAD_NORM", "1.0"))


def run_child(script: str, which: str, steps: int, rlmt_set: list[str] | None = None,
              clip: float = 1.0, bf16: bool = False) -> dict:
    """Run ``script --worker which`` in a fresh process (so peak RSS is that side's alone); parse RESULT."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, script, "--worker", which, "--steps", str(steps), "--work", tmp]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RLMT_BENCH_SET": json.dumps(rlmt_set or []),
               "RLMT_BENCH_MAX_GRAD_NORM": str(clip), "RLMT_BENCH_BF16": "1" if bf16 else "0"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode != 0 or not line:
            raise RuntimeError(f"{which} failed:\n{out.stderr[-3000:]}")
        return json.loads(line[-1][len("RESULT "):])


def side_by_side(script: str, doc: str, default_steps: int, run_rlmt, run_trl, title: str,
                 step_target: float, rss_target: float = 0.6, in_backward_set: tuple[str, ...] = ()) -> dict | None:
    """The shared command line of a side-by-side benchmark.

    As a worker (``--worker rlmt|trl``) it runs one side and prints ``RESULT {json}``; otherwise it runs each
    side in its own process, prints seconds per step (median after the first), peak RSS, wall time and the
    ratios against the targets, and returns the results (None in a worker).
    """
    import argparse
    import statistics
    from pathlib import Path

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=default_steps)
    ap.add_argument("--only", choices=["rlmt", "trl"], help="run one side only")
    ap.add_argument("--rlmt-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra rlmt config override, e.g. model.gradient_checkpointing=false (repeatable)")
    ap.add_argument("--max-grad-norm", type=float, default=1.0,
                    help="gradient clipping of both sides (default 1.0, TRL's default; 0: off)")
    ap.add_argument("--step-in-backward", action="store_true",
                    help="rlmt with optim.step_in_backward (one model size less memory); it cannot clip the global "
                         "norm, so clipping is turned off on both sides")
    ap.add_argument("--bf16", action="store_true",
                    help="both sides in bfloat16 mixed precision (TRL bf16=True, rlmt model.autocast=bfloat16); "
                         "fast only where the CPU has bf16 matrix units (AMX)")
    ap.add_argument("--worker", choices=["rlmt", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        fn = run_rlmt if a.worker == "rlmt" else run_trl
        print("RESULT " + json.dumps(fn(a.steps, Path(a.work))), flush=True)
        return None
    clip = 0.0 if a.step_in_backward else a.max_grad_norm
    os.environ["RLMT_BENCH_BF16"] = "1" if a.bf16 else "0"  # bf16() answers in this process too
    rlmt_set = ([*in_backward_set, "optim.step_in_backward=true"] if a.step_in_backward else []) + a.rlmt_set
    print(machine_header(), flush=True)
    results = {w: run_child(script, w, a.steps, rlmt_set, clip, a.bf16)
               for w in (["rlmt", "trl"] if not a.only else [a.only])}
    print(title + f", {'bfloat16 autocast' if a.bf16 else 'float32'}, max_grad_norm {clip:g} (both)"
          + (f" (rlmt with {' '.join(rlmt_set)})" if rlmt_set else ""))
    print(f"{'':8}{'s/step (median, after 1st)':>28}{'peak RSS MB':>14}{'wall s':>9}{'steps':>7}")
    med = {}
    for w, r in results.items():
        med[w] = statistics.median(r["step_s"][1:] or r["step_s"])
        print(f"{w:8}{med[w]:>28.2f}{r['peak_rss_mb']:>14.0f}{r['total_s']:>9.1f}{len(r['step_s']):>7}")
    if len(results) == 2:
        print(f"ratio rlmt/TRL: step time {med['rlmt'] / med['trl']:.2f}x (target <= {step_target}), "
              f"peak RSS {results['rlmt']['peak_rss_mb'] / results['trl']['peak_rss_mb']:.2f}x "
              f"(target <= {rss_target})")
    return results


def trl_step_timer(times: list[float]):
    """A transformers ``TrainerCallback`` that appends each optimizer step's wall time to ``times``."""
    import time

    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    return StepTimer()
