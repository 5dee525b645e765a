"""Wall time of a turn's tool calls against ``env.step_workers``: episodes whose every step runs a program in
the python tool (the code sandbox), some of them a program that never ends (killed at the tool timeout).

The policy is the tiny random model (sampling costs milliseconds), so the time is the environments' steps.

    python benchmarks/tool_steps.py [--episodes 32] [--hung 4] [--timeout 2] [--workers 1 4 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402,F401

from rlmt.data import PromptFormat  # noqa: E402
from rlmt.envs import Environment, Renderer, Step, Toolbox, run_episodes  # noqa: E402
from rlmt.envs.tools import ToolCall, python_tool  # noqa: E402
from rlmt.models import load_model  # noqa: E402
from rlmt.rollout import SamplingParams, sample_keys  # noqa: E402


def make_env(toolbox: Toolbox, hung: set[str]):
    class RunsPython(Environment):
        """One turn: runs a fixed program in the python tool (one that never ends for the rows in ``hung``)."""

        thread_safe = True

        def reset(self, row, seed):
            self.row = row["prompt"]
            return [{"role": "user", "content": row["prompt"]}]

        def step(self, text):
            code = "while True: pass" if self.row in hung else "print(sum(range(1000)))"
            out, failed = toolbox.call(ToolCall("python", {"code": code}))
            return Step([], 0.0 if failed else 1.0, True)

    return RunsPython


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--episodes", type=int, default=32, help="rows (one episode each)")
    ap.add_argument("--hung", type=int, default=4, help="episodes whose program never ends")
    ap.add_argument("--timeout", type=float, default=2.0, help="env.tool_timeout_s")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8], help="env.step_workers values")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    lm = load_model("tiny-random")
    renderer = Renderer(lm.tokenizer, PromptFormat())
    rows = [{"prompt": f"row {i}"} for i in range(args.episodes)]
    hung = {r["prompt"] for r in rows[:args.hung]}
    env = make_env(Toolbox([python_tool()], timeout_s=args.timeout), hung)
    params = SamplingParams(1, 1.0, 1.0, 4)
    times: dict[int, list[float]] = {w: [] for w in args.workers}
    for r in range(args.repeats):
        for w in args.workers[r % len(args.workers):] + args.workers[:r % len(args.workers)]:
            t0 = time.perf_counter()
            eb = run_episodes(lm.model, lm.tokenizer, renderer, env, rows, list(range(len(rows))), params,
                              sample_keys(0, r, range(len(rows)), 1), 1, 512, 8, workers=w)
            times[w].append(time.perf_counter() - t0)
            passed = int((eb.returns == 1.0).sum())
            assert passed == args.episodes - args.hung, f"{passed} programs ran"
    print(f"{args.episodes} episodes x 1 python call, {args.hung} of them hung (tool timeout {args.timeout} s), "
          f"{args.repeats} repeats, medians")
    base = statistics.median(times[args.workers[0]])
    for w in args.workers:
        m = statistics.median(times[w])
        print(f"step_workers={w:<3} {m:6.2f} s  ({' '.join(f'{t:.2f}' for t in times[w])})  "
              f"{base / m:.2f}x vs step_workers={args.workers[0]}")


if __name__ == "__main__":
    main()
