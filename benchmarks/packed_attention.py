"""Packed prompt groups: rlmt_packed attention vs the dense (L, L) mask, side by side.

One prompt group (a prompt, then G ragged responses) scored with gradient, as a GRPO micro-batch is, on
SmolLM2-135M-Instruct with gradient checkpointing. Each way runs in its own process, so peak RSS is its own.
Prints seconds per forward + backward (median of the runs after the first) and peak RSS, with the ratios.

    python benchmarks/packed_attention.py --samples 8 --length 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import peak_rss_mb  # noqa: E402


def worker(way: str, G: int, T: int, runs: int) -> dict:
    import torch

    import rlmt.rollout.logprobs as LP
    from rlmt.models import load_model

    model = load_model("smollm2-135m-instruct").model
    gen = torch.Generator().manual_seed(0)
    P = 60
    prompt = torch.randint(100, 40000, (1, P), generator=gen)
    responses = torch.randint(100, 40000, (G, T), generator=gen)
    lens = T // 2 + torch.arange(G) * (T // 2) // max(G, 1)  # ragged: T/2 .. ~T
    mask = (torch.arange(T)[None, :] < lens[:, None]).long()
    if way == "dense":
        LP.use_packed_attention = lambda m: False
    model.gradient_checkpointing_enable()
    model.train()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        LP.grouped_response_logprobs(model, prompt, torch.ones_like(prompt), responses, mask, G).sum().backward()
        times.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
    return {"s": times, "peak_rss_mb": peak_rss_mb(), "tokens": P + int(mask.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=8, help="responses in the group (G)")
    ap.add_argument("--length", type=int, default=512, help="longest response (tokens); they range T/2..T")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--worker", choices=["dense", "packed"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker, a.samples, a.length, a.runs)), flush=True)
        return
    res = {}
    for way in ("dense", "packed"):
        out = subprocess.run([sys.executable, __file__, "--worker", way, "--samples", str(a.samples),
                              "--length", str(a.length), "--runs", str(a.runs)], capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            raise SystemExit(f"{way} failed:\n{out.stderr[-3000:]}")
        res[way] = json.loads(line[-1][len("RESULT "):])
    print(f"one group: {res['packed']['tokens']} tokens (G = {a.samples}, responses up to {a.length}), "
          "forward + backward with checkpointing")
    med = {w: statistics.median(r["s"][1:] or r["s"]) for w, r in res.items()}
    for w, r in res.items():
        print(f"{w:8} {med[w]:8.2f} s {r['peak_rss_mb']:8.0f} MB peak RSS")
    print(f"packed/dense: time {med['packed'] / med['dense']:.2f}x, "
          f"peak RSS {res['packed']['peak_rss_mb'] / res['dense']['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
