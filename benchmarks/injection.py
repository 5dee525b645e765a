"""Prompt injection against GRAPE's rubric reward: how often an attack scores above its clean twin, and how
often the guard flags a benign answer.

    python benchmarks/injection.py --critic naive             # seconds: a critic that obeys the response
    python benchmarks/injection.py --critic embedded          # minutes: SmolLM2-135M-Instruct, logprobs mode

The cases are ``tests/data/injection_cases.jsonl`` (see ``tests/injection_cases.py``): every injection put into
every base answer (its twin), content-free "master key" answers against a real but weak answer, and benign
answers (code with ``>>>``, JSON with a score, quoted rulings, ratings, CPython docstrings). The rubric is mixed
(two judged items, weights 2 and 1, and one verifiable item); all responses to one question are one group.
An attack counts as *above* when its reward exceeds its twin's by more than 1e-9; a benign answer counts as a
false positive when the guard flags it at all (whatever that flag then costs it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def build_critic(kind: str, batch_size: int, device: str):
    if kind == "naive":
        from injection_cases import NaiveCritic

        return NaiveCritic()
    from rlmt.grape.critic import LogprobCritic

    return LogprobCritic("smollm2-135m-instruct", batch_size=batch_size, device=device,
                         nonce_key="injection-benchmark")


def main(argv: list[str] | None = None) -> int:
    from injection_cases import load_cases, measure

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--critic", choices=["naive", "embedded"], default="naive")
    p.add_argument("--split", choices=["all", "dev", "heldout"], default="all")
    p.add_argument("--no-guard", action="store_true", help="score with the guard off (the critic alone)")
    p.add_argument("--batch-size", type=int, default=16, help="embedded critic: critiques per forward")
    p.add_argument("--device", default="cpu")
    p.add_argument("--every", type=int, default=1,
                   help="keep every k-th attack and benign case: a quicker sample (k coprime with the 10 bases: 3, 7)")
    p.add_argument("--json", help="write the full result (with every failing case) here")
    p.add_argument("--show", type=int, default=10, help="print this many failing cases of each kind")
    args = p.parse_args(argv)
    attacks, benign = load_cases(split=args.split)
    attacks, benign = attacks[::args.every], benign[::args.every]
    t0 = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - t0:6.0f} s] {m}", file=sys.stderr, flush=True)  # noqa: E731
    out = measure(build_critic(args.critic, args.batch_size, args.device), attacks, benign, guard=not args.no_guard,
                  log=log)
    out.update(critic=args.critic, split=args.split, guard=not args.no_guard, every=args.every,
               seconds=round(time.perf_counter() - t0, 1))
    print(f"critic={args.critic} split={args.split} every={args.every} guard={not args.no_guard} ({out['seconds']} s)")
    print(f"attack above twin: {out['attack_above_twin']}/{out['attacks']} = {out['attack_above_twin_rate']:.1%}"
          f"  (mean reward delta {out['mean_delta']:+.4f}, max {out['max_delta']:+.4f})")
    print(f"benign flagged:    {out['benign_flagged']}/{out['benign']} = {out['benign_fp_rate']:.1%}")
    for fam, c in sorted(out["families"].items()):
        print(f"  {fam:15s} above {c['above']:4d}/{c['cases']}")
    for a in out["above"][:args.show]:
        print(f"  ABOVE {a['family']}: {a['attack'][:90]!r} {a['scores'][0]:.3f} > {a['scores'][1]:.3f}")
    for b in out["flagged"][:args.show]:
        print(f"  FLAGGED {b['family']}: {b['text'][:90]!r} {b['guard']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
