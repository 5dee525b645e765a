"""GRPO step time and peak memory: rlmt vs TRL's GRPOTrainer, side by side in one run.

Same model (SmolLM2-135M-Instruct, float32, CPU), same data (two-digit plus one-digit addition, chat
prompts), same settings: 4 prompts x 8 samples per optimizer step, at most 64 new tokens, temperature 1,
lr 1e-6, beta 0.04, one optimization epoch, gradient checkpointing (TRL's default). Each framework runs in
its own process (peak RSS is per process). Prints seconds per step (median of the steps after the first),
peak RSS and the ratios, plus rlmt's rollout tokens/s as a fraction of the decode floor and its training
FLOP/s as a fraction of the measured matmul peak.

    python benchmarks/grpo_vs_trl.py --steps 4          # needs `pip install -e .[bench]`
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import bf16, extra_overrides, max_grad_norm, peak_rss_mb, side_by_side, trl_step_timer  # noqa: E402

PROMPTS_PER_STEP, SAMPLES, MAX_NEW, LR, BETA = 4, 8, 64, 1e-6, 0.04


def _rows(n: int = 256) -> list[dict]:
    from rlmt.tasks import addition_rows

    return addition_rows(n, seed=0)


def matmul_peak_gflops(dtype: str = "float32") -> float:
    """Measured GFLOP/s of a 2048^3 matrix product in ``dtype`` (bfloat16 for a --bf16 run: its matmuls are)."""
    import torch

    a, b = (torch.randn(2048, 2048).to(getattr(torch, dtype)) for _ in range(2))
    a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 2048**3 / (time.perf_counter() - t) / 1e9


def rlmt_overrides(data: Path, steps: int, work: Path) -> list[str]:
    """rlmt's settings (also used by memory_profile.py). Gradient checkpointing as in TRL, whose GRPOConfig
    turns it on by default (same math; rlmt then scores full sequences instead of sharing each prompt's KV
    cache across its G samples, so the training phase recomputes more)."""
    return ["algorithm=grpo", "model.name=smollm2-135m-instruct", f"data.train={data}",
            f"rollout.num_samples={SAMPLES}", f"rollout.batch_prompts={PROMPTS_PER_STEP}",
            f"rollout.max_new_tokens={MAX_NEW}", "rollout.temperature=1.0", f"optim.lr={LR}", f"pg.beta={BETA}",
            "optim.batch_size=8", f"optim.max_steps={steps}", f"run.output_dir={work / 'run'}", "run.progress=false",
            "model.gradient_checkpointing=true"]


def run_rlmt(steps: int, work: Path) -> dict:
    from rlmt.config import load_config
    from rlmt.records import read_metrics
    from rlmt.train.runner import train

    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    cfg = load_config(None, rlmt_overrides(data, steps, work) + [f"optim.max_grad_norm={max_grad_norm()}"]
                      + (["model.autocast=bfloat16"] if bf16() else [])
                      + extra_overrides())
    t0 = time.perf_counter()
    run = train(cfg)
    total = time.perf_counter() - t0
    rows = read_metrics(run)
    step_s = [r["time/step_s"] for r in rows]
    return {"step_s": step_s, "total_s": total, "peak_rss_mb": peak_rss_mb(),
            "rollout_tok_s": statistics.median(r["rollout/tokens_per_s"] for r in rows),
            "rollout_s": [r["rollout/seconds"] for r in rows], "seq_tokens": [r["train/packed_tokens"] for r in rows],
            "reference_s": [r["time/reference_s"] for r in rows], "update_s": [r["time/update_s"] for r in rows],
            "reward": [r["reward/mean"] for r in rows]}


def run_trl(steps: int, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rlmt.models import embedded_model_dir

    torch.manual_seed(0)
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": str(r["answer"])} for r in _rows()]

    def correct(completions, answer, **_):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [1.0 if (n := re.findall(r"-?\d+", t)) and n[-1] == a else 0.0 for t, a in zip(texts, answer)]

    times: list[float] = []

    args = GRPOConfig(output_dir=str(work / "trl"), use_cpu=True, bf16=bf16(), per_device_train_batch_size=SAMPLES,
                      num_generations=SAMPLES, gradient_accumulation_steps=PROMPTS_PER_STEP,
                      max_completion_length=MAX_NEW, max_steps=steps, logging_steps=1, learning_rate=LR,
                      beta=BETA, report_to=[], save_strategy="no", temperature=1.0, seed=0, max_grad_norm=max_grad_norm())
    trainer = GRPOTrainer(model=str(embedded_model_dir()), reward_funcs=correct, args=args,
                          train_dataset=Dataset.from_list(rows), callbacks=[trl_step_timer(times)])
    t0 = time.perf_counter()
    trainer.train()
    return {"step_s": times, "total_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
            "reward": [h["reward"] for h in trainer.state.log_history if "reward" in h]}


def main() -> None:
    results = side_by_side(__file__, __doc__, 4, run_rlmt, run_trl,
                           f"GRPO step: {PROMPTS_PER_STEP} prompts x {SAMPLES} samples, <= {MAX_NEW} new tokens, "
                           f"beta {BETA}, CPU", step_target=0.33,
                           in_backward_set=(f"optim.batch_size={PROMPTS_PER_STEP * SAMPLES}",))
    if not results:
        return
    if "rlmt" in results:
        r = results["rlmt"]
        tok_s = r["rollout_tok_s"]
        n_params = 134.5e6
        kind = "bfloat16" if bf16() else "float32"
        peak = matmul_peak_gflops(kind)
        bound = peak * 1e9 / (2 * n_params)  # a decoded token costs ~2N FLOPs: this machine's compute bound
        print(f"rlmt rollout: {tok_s:.0f} tok/s = {tok_s / bound:.0%} of this machine's {kind} compute bound "
              f"({bound:.0f} tok/s = measured matmul peak {peak:.0f} GFLOP/s / 2N FLOPs a token; decoding "
              f"{SAMPLES * PROMPTS_PER_STEP} rows, the products are thinner than the peak's square ones)")
        train_s = statistics.median([s - ro for s, ro in zip(r["step_s"], r["rollout_s"])][1:] or [1.0])
        # training FLOPs per computed token (each prompt once, then its responses: train/packed_tokens):
        # policy forward + backward (6N), the checkpointing recompute (2N; the benchmark default), reference (2N)
        flops = 10 * n_params * statistics.median(r["seq_tokens"])
        print(f"rlmt training phase: {train_s:.1f} s, ~{flops / train_s / 1e9:.0f} GFLOP/s = "
              f"{flops / train_s / 1e9 / peak:.0%} of measured {kind} matmul peak ({peak:.0f} GFLOP/s)")
        med = {k: statistics.median(r[k][1:] or r[k]) for k in ("rollout_s", "reference_s", "update_s")}
        print(f"rlmt step phases (median after the 1st): rollout {med['rollout_s']:.1f} s, reference pass "
              f"{med['reference_s']:.1f} s, update {med['update_s']:.1f} s")


if __name__ == "__main__":
    main()
