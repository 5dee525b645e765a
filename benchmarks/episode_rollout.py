"""Rollouts of multi-turn episodes: each episode's KV cache kept across its turns (rlmt's TurnDecoder) against
prefilling every turn's whole context (what an engine without a kept cache does), alternated in one process.

    python benchmarks/episode_rollout.py [--tool-model DIR] [--repeats 2]

``tool_arithmetic`` runs with ``--tool-model`` (default: the SFT stage of ``benchmarks/tool_use.py``'s run,
which calls the calculator; the base model when that run is absent), ``guess_number`` with the embedded model:
8 rows x 4 episodes each, seconds per rollout, the turns played and the tokens sampled.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_header  # noqa: E402  (sets THP before torch loads)

ROOT = Path(__file__).resolve().parents[1]


class WholeContext:
    """The TurnDecoder's interface, each turn generated from the whole context so far (no cache kept)."""

    def __init__(self, model, tokenizer, params, autocast):
        self.model, self.tok, self.params, self.autocast = model, tokenizer, params, autocast

    def session(self):
        return contextlib.nullcontext()

    def open(self, openings, G):
        self.ctx = {r: list(openings[r // G]) for r in range(len(openings) * G)}
        self.pending = {}

    def turn(self, rows, blocks, keys):
        from rlmt.rollout import generate

        for r, b in zip(rows, blocks):
            self.ctx[r] += self.pending.pop(r, []) + list(b)
        out = generate(self.model, self.tok, [self.ctx[r] for r in rows], self.params, None, self.autocast, keys)
        result = []
        for j, r in enumerate(rows):
            toks = out.response_ids[j, :int(out.response_lengths[j])].tolist()
            self.pending[r] = toks
            result.append((toks, out.logprobs[j, :len(toks)].tolist(), out.texts[j]))
        return result


def bench(model: str, env: str, args: str, data: str, tools: str, turns: int, new_tokens: int, total: int,
          repeats: int) -> None:
    import rlmt.envs.episodes as episodes
    from rlmt.config import load_config
    from rlmt.data import PromptFormat
    from rlmt.envs.evaluate import env_parts
    from rlmt.models import load_model
    from rlmt.rollout import SamplingParams, sample_keys
    from rlmt.rollout.turns import TurnDecoder

    cfg = load_config(None, ["algorithm=grpo", f"env.source={env}", f"env.args={args}", f"env.tools={tools}",
                             f"env.max_turns={turns}", f"env.max_total_tokens={total}"])
    lm = load_model(model)
    rows = [json.loads(line) for line in (ROOT / data).read_text().splitlines()][:8]
    make_env, renderer, stop = env_parts(cfg, lm.tokenizer, PromptFormat())
    for _ in range(repeats):
        for name, decoder in (("cache kept", TurnDecoder), ("whole context", WholeContext)):
            episodes.TurnDecoder = decoder
            t = time.perf_counter()
            eb = episodes.run_episodes(lm.model, lm.tokenizer, renderer, make_env, rows, list(range(8)),
                                       SamplingParams(4, 1.0, 1.0, new_tokens), sample_keys(0, 0, range(8), 4),
                                       turns, total, 8, None, stop)
            print(f"{env:15} {name:13} {time.perf_counter() - t:6.1f} s  turns {eb.metrics()['env/turns_mean']:.2f}"
                  f"  sampled {eb.batch.stats['rollout/tokens']:.0f}", flush=True)
    episodes.TurnDecoder = TurnDecoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sft = ROOT / "runs/bench-tool-use/pipeline/sft/final"
    ap.add_argument("--tool-model", default=str(sft) if sft.exists() else "smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    print(machine_header(), flush=True)
    bench(args.tool_model, "tool_arithmetic", "{}", "examples/data/tool-arith-train.jsonl", "[calculator]", 3, 40,
          192, args.repeats)
    bench("smollm2-135m-instruct", "guess_number", "{low: 1, high: 20}", "examples/data/guess-train.jsonl", "[]", 5,
          12, 400, args.repeats)


if __name__ == "__main__":
    main()
