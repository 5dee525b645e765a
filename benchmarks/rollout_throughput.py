"""Rollout throughput: rlmt's batched KV-cached engine vs. transformers' ``generate`` on SmolLM2-135M-Instruct.

Same prompts (two-digit plus one-digit addition, chat format), T = 1, no top-k / top-p, natural stopping at EOS.
Tokens are counted as generated response tokens up to and including the first EOS, for every engine alike.
Variants run interleaved (rotating order) within each repeat, and medians are reported, because the
machine is shared and timings are noisy.

The decode floor is estimated two ways: (1) a forward pass of one new token per row (batch = prompts x
samples) against a warm cache of mid-response length, body plus last-position output projection, nothing
else (no sampling, no Python bookkeeping); (2) the weight bytes read once per step over measured memcpy
bandwidth. DESIGN.md quotes ~850 tok/s at batch 32 for (1) on these machines. rlmt's tokens/s includes its
prefill and its batch shrinking as rows finish, so "fraction of the floor" is approximate.

    .venv/bin/python benchmarks/rollout_throughput.py --prompts 4 --samples 8 --max-new-tokens 32 --repeats 5
    .venv/bin/python benchmarks/rollout_throughput.py --module-forward   # also rlmt through the model's forward
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402,F401 - before torch: huge pages for CPU tensors, as rlmt runs have by default

import torch  # noqa: E402

from rlmt.data import PromptFormat, encode_prompt
from rlmt.rollout.logprobs import cache_kwarg, position_ids_from_mask
from rlmt.models import load_model
from rlmt.rollout import SamplingParams, generate
from rlmt.tasks import addition_rows

DESIGN_FLOOR_TOK_S = 850.0  # DESIGN.md "Performance", batch 32


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    return ids, mask


def response_tokens(new_ids: torch.Tensor, eos_ids: list[int]) -> int:
    """new_ids (N, T) generated ids -> total tokens up to and including each row's first EOS (else T)."""
    is_eos = torch.isin(new_ids, torch.tensor(eos_ids))
    T = new_ids.shape[1]
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(is_eos[:, 0], T, dtype=torch.long))
    return int(first.sum())


@contextlib.contextmanager
def module_forward():
    """rlmt's rollout through the model's own forward: float32 weights not prepacked for oneDNN (the float32
    path before :class:`rlmt.rollout.decode.LlamaDecoder` took it)."""
    import rlmt.rollout.decode as decode

    packing = decode._packing
    decode._packing = lambda dtype: dtype != torch.float32 and packing(dtype)
    try:
        yield
    finally:
        decode._packing = packing


def run_rlmt(lm, prompts, samples, max_new, seed, context=contextlib.nullcontext) -> tuple[float, int]:
    params = SamplingParams(num_samples=samples, temperature=1.0, top_p=1.0, max_new_tokens=max_new)
    t0 = time.perf_counter()
    with context():
        batch = generate(lm.model, lm.tokenizer, prompts, params, torch.Generator().manual_seed(seed))
    return time.perf_counter() - t0, int(batch.response_lengths.sum())


def run_hf(lm, prompts, samples, max_new, seed, eos_ids) -> tuple[float, int]:
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else eos_ids[0]
    ids, mask = _left_pad(prompts, pad)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = lm.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                top_p=1.0, num_return_sequences=samples, max_new_tokens=max_new,
                                eos_token_id=eos_ids, pad_token_id=pad)
    seconds = time.perf_counter() - t0
    return seconds, response_tokens(out[:, ids.shape[1]:], eos_ids)


@torch.inference_mode()
def decode_step_seconds(model, prompts, samples, cache_len) -> float:
    """Seconds of one bare decode forward: batch prompts x samples, one token each, warm cache of cache_len."""
    from transformers import DynamicCache

    ids, mask = _left_pad(prompts, 0)
    ids, mask = ids.repeat_interleave(samples, 0), mask.repeat_interleave(samples, 0)
    # prefill with the prompt plus filler tokens so the cache has the length of a mid-response step
    filler = torch.full((ids.shape[0], max(0, cache_len - ids.shape[1])), 28, dtype=torch.long)
    ids, mask = torch.cat([ids, filler], 1), torch.cat([mask, torch.ones_like(filler)], 1)
    cache = DynamicCache()
    model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), **{cache_kwarg(model): cache},
          use_cache=True, logits_to_keep=1)
    times = []
    for _ in range(3):  # a warm-up step, then two timed ones
        mask = torch.cat([mask, mask.new_ones((len(ids), 1))], 1)
        t0 = time.perf_counter()
        model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
              **{cache_kwarg(model): cache}, use_cache=True, logits_to_keep=1)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def memcpy_gb_s(repeats: int = 3) -> float:
    src = torch.empty(64 * 2**20, dtype=torch.float32).uniform_()  # 256 MiB
    dst = torch.empty_like(src)
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best.append(time.perf_counter() - t0)
    return src.numel() * 4 / min(best) / 1e9  # bytes copied per second


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=4, help="distinct prompts per batch")
    ap.add_argument("--samples", type=int, default=8, help="samples per prompt (G)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="response length cap")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats; medians are reported")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave torch's default)")
    ap.add_argument("--skip-hf", action="store_true", help="time only rlmt and the floor")
    ap.add_argument("--module-forward", action="store_true",
                    help="also time rlmt's rollout through the model's own forward (no prepacked float32 weights)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model("smollm2-135m-instruct")
    lm.model.eval()
    fmt = PromptFormat()
    prompts = [encode_prompt(lm.tokenizer, fmt, r["prompt"]) for r in addition_rows(args.prompts, seed=0)]
    gen_eos = lm.model.generation_config.eos_token_id
    eos_ids = sorted({lm.tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None})
    N = args.prompts * args.samples
    b8_samples = min(args.samples, 8)  # batch 8: fewer prompts, same G where it fits
    b8_prompts = prompts[:max(1, 8 // b8_samples)]

    variants = {f"rlmt  batch {N}": lambda s: run_rlmt(lm, prompts, args.samples, args.max_new_tokens, s)}
    if args.module_forward:
        variants[f"rlmt fwd batch {N}"] = (
            lambda s: run_rlmt(lm, prompts, args.samples, args.max_new_tokens, s, context=module_forward))
    if not args.skip_hf:
        variants[f"HF    batch {N}"] = lambda s: run_hf(lm, prompts, args.samples, args.max_new_tokens, s, eos_ids)
        variants[f"HF    batch {len(b8_prompts) * b8_samples}"] = (
            lambda s: run_hf(lm, b8_prompts, b8_samples, args.max_new_tokens, s, eos_ids))
    names = list(variants)
    for name in names:  # warm-up (allocator, MKL kernels)
        variants[name](1000)
    results: dict[str, list[tuple[float, int]]] = {n: [] for n in names}
    cache_len = max(len(p) for p in prompts) + args.max_new_tokens // 2
    step_s, bw = [], []  # the floor is measured inside every repeat too, under the same load
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            results[name].append(variants[name](r))
        step_s.append(decode_step_seconds(lm.model, prompts, args.samples, cache_len))
        bw.append(memcpy_gb_s())
    step_s, bw = statistics.median(step_s), statistics.median(bw)
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())  # tied head counted once

    print(f"\nSmolLM2-135M-Instruct fp32, {args.prompts} prompts x {args.samples} samples, <= {args.max_new_tokens}"
          f" new tokens, T=1, threads={torch.get_num_threads()}, {args.repeats} repeats (medians)\n")
    print(f"{'engine':<22} {'tok/s':>8} {'seconds':>8} {'tokens':>7}   tok/s per repeat")
    tok_s = {}
    for name in names:
        rates = [n / s for s, n in results[name]]
        tok_s[name] = statistics.median(rates)
        print(f"{name:<22} {tok_s[name]:8.1f} {statistics.median(s for s, _ in results[name]):8.2f} "
              f"{statistics.median(n for _, n in results[name]):7.0f}   " + " ".join(f"{x:.0f}" for x in rates))
    rlmt = tok_s[names[0]]
    floor_fwd = N / step_s
    floor_bw = N / (weight_bytes / (bw * 1e9))
    print(f"\ndecode floor, bare forward of one token (batch {N}, cache {cache_len}): "
          f"{step_s * 1e3:.1f} ms/step = {floor_fwd:.0f} tok/s")
    print(f"decode floor, weight bytes / memcpy bandwidth ({weight_bytes / 1e6:.0f} MB / {bw:.1f} GB/s): "
          f"{floor_bw:.0f} tok/s")
    if not args.skip_hf:
        print(f"rlmt / HF at batch {N}: {rlmt / tok_s[f'HF    batch {N}']:.2f}x")
    if args.module_forward:
        print(f"rlmt / rlmt through the module's forward: {rlmt / tok_s[names[1]]:.2f}x")
    print(f"rlmt / measured forward floor: {rlmt / floor_fwd:.0%}; rlmt / DESIGN.md's 850 tok/s: "
          f"{rlmt / DESIGN_FLOOR_TOK_S:.0%}")


if __name__ == "__main__":
    main()
