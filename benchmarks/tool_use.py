"""Multi-turn tool use on the embedded SmolLM2-135M-Instruct: held-out success at T=1, with and without the
calculator, before and after ``examples/tool_arithmetic.yaml`` (a short SFT warm-up on tool-call
demonstrations, then GRPO in the ``tool_arithmetic`` environment).

    python benchmarks/tool_use.py [--out runs/bench-tool-use] [--prompts 50] [--rlmt-set KEY=VALUE ...]

Prints the machine, then a table of pass@1 (K episodes per held-out problem, T=1) for the base model, after the
SFT stage and after GRPO, each with the tool and without it, and the pipeline's wall time (training, with the
GRPO stage's own before/after evaluation). The evaluations of the base model and of the finished model are
outside that time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_header  # noqa: E402  (sets THP before torch loads)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tool_arithmetic.yaml"


def rlmt(*args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "rlmt.cli", *args], capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"rlmt {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return p.stdout


def evaluate(model: str, tools: bool, prompts: int, out: Path, extra: list[str]) -> dict:
    """pass@1 of ``model`` on the held-out problems, in the environment with the calculator or without tools."""
    tag = "tool" if tools else "no-tool"
    args = ["eval", f"model.name={model}", "data.eval=examples/data/tool-arith-heldout.jsonl",
            "env.source=tool_arithmetic", f"env.tools={'[calculator]' if tools else '[]'}", "env.max_turns=3",
            "env.max_total_tokens=192", "eval.num_samples=2", "eval.temperature=1.0", "eval.max_new_tokens=40",
            f"eval.max_prompts={prompts}", "rollout.batch_prompts=10", f"eval.output={out / f'{tag}.jsonl'}",
            "run.progress=false", *extra]
    text = rlmt(*args)
    return json.loads(text[text.index("{"):text.rindex("}") + 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench-tool-use")
    ap.add_argument("--prompts", type=int, default=50, help="held-out problems evaluated (default 50)")
    ap.add_argument("--rlmt-set", action="append", default=[], metavar="KEY=VALUE",
                    help="an override of the pipeline (e.g. stages.1.optim.max_steps=12)")
    args = ap.parse_args()
    out = (ROOT / args.out).resolve()
    print(machine_header(), flush=True)
    table = {}
    for tools in (True, False):
        m = evaluate("smollm2-135m-instruct", tools, args.prompts, out / "base", [])
        table[("base", tools)] = m
        print(f"      base {'tool' if tools else 'no tool':>8}: pass@1 {m['pass@1']:.3f}  turns "
              f"{m['env/turns_mean']:.2f}  tool calls {m['env/tool_calls']:.0f}", flush=True)
    t = time.perf_counter()
    rlmt("train", str(EXAMPLE), f"run.output_dir={out / 'pipeline'}", "run.progress=false",
         f"stages.1.eval.max_prompts={args.prompts}", *args.rlmt_set)
    minutes = (time.perf_counter() - t) / 60
    grpo = out / "pipeline" / "grpo"
    sft_eval = json.loads((grpo / "eval-before.json").read_text())
    print(f"pipeline (SFT + GRPO, with the GRPO stage's before/after evaluation): {minutes:.1f} min", flush=True)
    print(f"  after SFT      tool: pass@1 {sft_eval['pass@1']:.3f}", flush=True)
    for tools in (True, False):
        m = evaluate(str(grpo / "final"), tools, args.prompts, out / "trained", [])
        table[("trained", tools)] = m
        print(f"after GRPO {'tool' if tools else 'no tool':>8}: pass@1 {m['pass@1']:.3f}  turns "
              f"{m['env/turns_mean']:.2f}  tool calls {m['env/tool_calls']:.0f}  tool errors "
              f"{m['env/tool_errors']:.0f}", flush=True)
    summary = {f"{k[0]}/{'tool' if k[1] else 'no_tool'}": v["pass@1"] for k, v in table.items()}
    summary.update({"sft/tool": sft_eval["pass@1"], "pipeline_minutes": minutes})
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
