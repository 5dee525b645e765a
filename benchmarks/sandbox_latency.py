"""Wall time of one sandboxed run (start, isolate, run a tiny program, tear down), optionally side by side with
the sandbox of another checkout.

    python benchmarks/sandbox_latency.py [--runs 40] [--against OTHER_CHECKOUT/src]

Runs alternate between the two sandboxes in one process, so machine load affects both alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def load(src: str, name: str):
    path = os.path.join(src, "rlmt", "rewards", "sandbox.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--against", help="the src/ directory of another checkout")
    args = parser.parse_args()
    sides = {"this": load(HERE, "sandbox_this")}
    if args.against:
        sides["other"] = load(args.against, "sandbox_other")
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(args.runs):
        for name, module in sides.items():
            start = time.perf_counter()
            res = module.run_sandboxed("print(sum(range(1000)))")
            times[name].append(time.perf_counter() - start)
            assert res.stdout.strip() == "499500", res
    for name, values in times.items():
        q = statistics.quantiles(values, n=10)
        print(f"{name}: median {1e3 * statistics.median(values):.1f} ms (p10 {1e3 * q[0]:.1f}, p90 {1e3 * q[-1]:.1f})")
    if "other" in times:
        print(f"ratio this/other (medians): {statistics.median(times['this']) / statistics.median(times['other']):.2f}")


if __name__ == "__main__":
    main()
