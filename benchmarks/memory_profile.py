"""Where rlmt's peak RSS comes from in the DPO / GRPO benchmarks: peak resident memory per phase.

Runs the rlmt side of ``dpo_vs_trl.py`` / ``grpo_vs_trl.py`` (same model, data and settings: their
``rlmt_overrides``) in this process with the training loop's functions wrapped as phases (model load,
reference log-probs, rollout, forward, backward, optimizer step, checkpoint, final save). Each phase's peak is
exact, not sampled: the kernel's high-water mark (VmHWM) is read and reset (``/proc/self/clear_refs`` = 5) at
every phase boundary (so ``ru_maxrss`` is meaningless in this process; "(whole run)" is the peak). Beside RSS
it prints what torch tensors account for (parameters, gradients, AdamW states) and glibc's heap (in use /
free but kept / mmapped), so a peak splits into tensors, transients and fragmentation.

    python benchmarks/memory_profile.py dpo --steps 2
    python benchmarks/memory_profile.py grpo --steps 2 --set model.gradient_checkpointing=true
    python benchmarks/memory_profile.py dpo --set runtime.mmap_threshold=0   # glibc's default (growing) threshold
    python benchmarks/memory_profile.py dpo --set model.gradient_checkpointing=false   # any config override

Measured 2026-11-22, SmolLM2-135M-Instruct fp32 on CPU (2 cores, busy machine: peaks are exact, times are
not), 2 steps (step 2 is the first backward with AdamW states alive). Peak RSS, MB:

  DPO (8 pairs/step)                       load   ref.logps  forward  backward (peak) end of backward
  A  as the benchmark ran before             404     1036     3674     3998            3782
  B  + gradient checkpointing (TRL's default) 405    1098     2585     3139            2923
  C  + fixed mmap threshold 1 MiB            389      982     2120     2685            2468
  D  + no entropy (M, V) tensors when unused 390      958     2108     2686            2470
  TRL DPOTrainer (benchmark, earlier run): 4070. Target 0.6x = 2442. Now 2686 = 0.66x.

  GRPO (4 prompts x 8 samples, beta 0.04)  ref. copy  rollout  ref.fwd  backward (peak) end of backward
  before: benchmark 4700 (deepcopy reference, no checkpointing, glibc default)
  E  checkpointing + 1 MiB threshold + paged reference (online.py change below), chunk 256:
                                             1405     2206     2663     2937            2530
  F  E with 64-token log-prob chunks:        1405     2185     2643     2886            2497
  TRL GRPOTrainer (benchmark, earlier run): 4690. Target 0.6x = 2814. F = 0.615x (misses by ~70 MB).
  Without the online.py change (resident deepcopy reference), grpo_vs_trl.py --only rlmt --steps 2 with
  checkpointing + 1 MiB threshold + 64-token chunks: 3400 MB = 0.72x (was 4700).

  dpo_vs_trl.py --steps 2 after D + 64-token chunks (its own ru_maxrss, no profiler): rlmt 2595 MB, TRL
  4062 MB: 0.64x (step times under a load average of 5-13 are not meaningful: 40.5 vs 44.6 s).

What the peak is made of (DPO, end of backward = 2470 MB):
  - runtime ~390 MB: import torch 219, transformers 28, AutoTokenizer ~120 (it imports ~930 modules:
    torch._dynamo, torch.distributed, sympy/mpmath, PIL via transformers 5's processing utilities; the
    tokenizer itself is ~27 MB), model-load bookkeeping ~20.
  - parameters 513 (file-backed: transformers maps model.safetensors MAP_PRIVATE and the parameters are views
    of it; no second copy at load, pages become anonymous as AdamW writes them), gradients 513, AdamW exp_avg
    + exp_avg_sq 1026 (created at the first step, while the gradients exist; that is no extra peak since the
    gradients exist at the end of every backward anyway).
  - fused AdamW allocates no temporaries: "optimizer step" never rises above its entry RSS; neither does
    clip_grad_norm_. zero_grad(set_to_none=True) already frees the gradients between steps.
  - the backward transient, ~215 MB (DPO) / ~390 MB (GRPO, 4 micro-batches) above its end: mostly the tied
    embedding/LM-head weight (V x H = 113 MB). Autograd sums the gradients of all its uses (every log-prob
    chunk, then the embedding) in an input buffer before AccumulateGrad: the buffer (113) + each incoming
    dense (V, H) gradient (113) exist beside .grad. Isolated (8 x 85 tokens, gradients already present):
    whole backward +324 MB, decoder body alone +63, embedding alone +108. The body's checkpointed
    recompute is cheap. Next lever (not done: it bypasses autograd for one weight): a custom autograd
    Function for the head chunk that adds its weight gradient into weight.grad in place (addmm_), leaving
    one 113 MB transient: ~-110 to -230 MB, which would put GRPO under 0.6x. Caveat: TRPO takes
    torch.autograd.grad of log-probs, which must return that gradient instead, so it needs an opt-in.
  - A's extra 1.3 GB: ~860 MB activations without checkpointing (B), and ~450 MB of freed activations kept
    as fragmented free heap: glibc raises its mmap threshold up to 32 MiB each time a mapped block is freed,
    so multi-MiB tensors come from the heap afterwards and their memory is never given back (heap "free"
    1.6 GB in A vs < 0.1 GB in C). malloc_trim after the fact cannot lower a peak that happens inside
    backward; a fixed threshold (runtime.mmap_threshold, applied by rlmt.runtime.apply_runtime on CPU) can.

Floors (fp32, exact math as TRL: same optimizer, grad-norm clipping needs every gradient before any update,
so gradients and AdamW states must coexist):
  DPO:  390 runtime + 4 x 513 (params, grads, m, v) = 2442 MB = 0.600 x 4070 before any activation or the
        113 MB tied-gradient transient: the 0.6x target is not reachable without cutting the runtime.
  GRPO: the same 2442 + a resident reference copy 513 = 2955 > 2814 (infeasible with a resident copy). With
        the reference paged from the checkpoint file (rlmt.models.frozen_reference /
        Reference.release_pages: its weights are clean file-backed pages, resident only during the
        reference forward, when no gradients exist) the floor is 2442 and the peak is the backward's.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402,F401 - before torch: huge pages for CPU tensors, as rlmt runs have by default

_libc = ctypes.CDLL("libc.so.6")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


_libc.mallinfo2.restype = _Mallinfo2


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def hwm_mb() -> float:
    return _status_kb("VmHWM") / 1024


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def heap_mb() -> tuple[float, float, float]:
    """glibc: (bytes in use in the brk/arena heaps, free bytes kept in them, bytes in mmapped chunks), MB."""
    m = _libc.mallinfo2()
    return m.uordblks / 2**20, m.fordblks / 2**20, m.hblkhd / 2**20


class Phases:
    """Exact per-phase peak RSS: phases nest; a boundary reads and resets the kernel's high-water mark."""

    def __init__(self, trim: bool = False):
        self.stack: list[str] = []
        self.stats: dict[str, dict] = {}
        self.order: list[str] = []
        self.trim = trim
        self.model = None
        self.optimizer = None
        reset_hwm()

    def _flush(self) -> None:
        peak = hwm_mb()
        for name in self.stack + ["(whole run)"]:
            s = self.stats.setdefault(name, {"calls": 0, "peak": 0.0, "start": 0.0, "end": 0.0})
            s["peak"] = max(s["peak"], peak)
        reset_hwm()

    def enter(self, name: str) -> None:
        self._flush()
        if name not in self.stats:
            self.order.append(name)
            self.stats[name] = {"calls": 0, "peak": 0.0, "start": rss_mb(), "end": 0.0}
        self.stats[name]["calls"] += 1
        self.stack.append(name)

    def leave(self, name: str) -> None:
        self._flush()
        self.stack.pop()
        if self.trim:
            _libc.malloc_trim(0)
        s = self.stats[name]
        s["end"] = rss_mb()
        s["tensors"] = self.tensor_mb()
        s["heap"] = heap_mb()

    def wrap(self, module, attr: str, name: str | None = None, grab=None):
        fn = getattr(module, attr)
        label = name or attr

        @functools.wraps(fn)
        def wrapper(*a, **k):
            self.enter(label)
            try:
                out = fn(*a, **k)
            finally:
                self.leave(label)
            if grab:
                grab(self, a, k, out)
            return out

        setattr(module, attr, wrapper)

    def tensor_mb(self) -> dict[str, float]:
        out = {}
        if self.model is not None:
            seen = {}
            for p in self.model.parameters():
                seen[p.data_ptr()] = p
            out["params"] = sum(p.numel() * p.element_size() for p in seen.values()) / 2**20
            out["grads"] = sum(p.grad.numel() * p.grad.element_size() for p in seen.values()
                               if p.grad is not None) / 2**20
        if self.optimizer is not None:
            out["optim"] = sum(v.numel() * v.element_size() for st in self.optimizer.state.values()
                               for v in st.values() if hasattr(v, "numel") and v.dim() > 0) / 2**20
        return out

    def report(self) -> str:
        self._flush()
        lines = [f"{'phase':34}{'calls':>6}{'peak MB':>9}{'RSS in':>8}{'RSS out':>9}   tensors after (MB)"
                 "            heap used/free/mmap"]
        for name in self.order + ["(whole run)"]:
            s = self.stats[name]
            t = s.get("tensors") or {}
            ts = " ".join(f"{k} {v:.0f}" for k, v in t.items())
            h = s.get("heap")
            hs = f"{h[0]:.0f}/{h[1]:.0f}/{h[2]:.0f}" if h else ""
            lines.append(f"{name:34}{s['calls']:>6}{s['peak']:>9.0f}{s['start']:>8.0f}{s['end']:>9.0f}   {ts:30}{hs}")
        lines.append("(whole run) = the process's peak RSS (ru_maxrss is reset by the high-water-mark resets)")
        return "\n".join(lines)


def _grab_model(ph, a, k, out):
    ph.lm, ph.model = out, out.model


def _grab_opt(ph, a, k, out):
    ph.optimizer = out[0]


def instrument(ph: Phases, algorithm: str) -> None:
    import torch

    import rlmt.train.optim as optim
    import rlmt.train.session as session

    ph.wrap(session, "load_model", "model load", _grab_model)
    if algorithm == "dpo":
        import rlmt.train.dpo as dpo
        import rlmt.train.offline as m

        ph.wrap(dpo, "reference_logprobs", "reference log-probs (no grad)")
        ph.wrap(dpo, "pair_sequence_logprobs", "forward")
        ph.wrap(m, "offline_update", "train step")
    else:
        import rlmt.train.online as m
        import rlmt.train.update as update

        ph.wrap(m, "generate", "rollout (generate)")
        ph.wrap(m, "reference_logprobs", "reference forward")
        ph.wrap(m, "frozen_reference", "reference copy")  # file-backed: pages released after each pass
        ph.wrap(update, "response_logprobs", "forward")
        ph.wrap(update, "accumulate", "train step")
        ph.wrap(update, "guarded_step", "optimizer step")
    ph.wrap(m, "build_optimizer", "build optimizer", _grab_opt)
    ph.wrap(m, "save_checkpoint", "checkpoint save")
    ph.wrap(m, "save_final", "final save")
    if algorithm == "dpo":
        ph.wrap(m, "guarded_step", "optimizer step")
    ph.wrap(optim.torch.nn.utils, "clip_grad_norm_", "  clip_grad_norm_")
    orig_backward = torch.Tensor.backward

    def backward(self, *a, **k):
        ph.enter("backward")
        try:
            return orig_backward(self, *a, **k)
        finally:
            ph.leave("backward")

    torch.Tensor.backward = backward


def config_for(algorithm: str, steps: int, work: Path, overrides: list[str]):
    from rlmt.config import load_config

    if algorithm == "dpo":
        import dpo_vs_trl as b

        data = work / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in b._pairs()))
        base = b.rlmt_overrides(data, steps, work) if hasattr(b, "rlmt_overrides") else [
            "algorithm=dpo", "model.name=smollm2-135m-instruct", f"data.train={data}", f"optim.lr={b.LR}",
            f"dpo.beta={b.BETA}", f"optim.batch_size={b.PAIRS_PER_STEP}", f"optim.max_steps={steps}",
            f"run.output_dir={work / 'run'}", "run.progress=false"]
    else:
        import grpo_vs_trl as b

        data = work / "prompts.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in b._rows()))
        base = b.rlmt_overrides(data, steps, work) if hasattr(b, "rlmt_overrides") else [
            "algorithm=grpo", "model.name=smollm2-135m-instruct", f"data.train={data}",
            f"rollout.num_samples={b.SAMPLES}", f"rollout.batch_prompts={b.PROMPTS_PER_STEP}",
            f"rollout.max_new_tokens={b.MAX_NEW}", "rollout.temperature=1.0", f"optim.lr={b.LR}",
            f"pg.beta={b.BETA}", "optim.batch_size=8", f"optim.max_steps={steps}",
            f"run.output_dir={work / 'run'}", "run.progress=false", "optim.max_grad_norm=1.0"]
    return load_config(None, base + overrides)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("algorithm", choices=["dpo", "grpo"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], help="extra config override (key=value)")
    ap.add_argument("--trim", action="store_true", help="malloc_trim(0) after every phase")
    ap.add_argument("--mmap-threshold", type=int, default=0,
                    help="mallopt(M_MMAP_THRESHOLD, N): a fixed threshold (glibc's default grows up to 32 MB)")
    ap.add_argument("--paged-reference", action="store_true",  # kept for old command lines: now always on
                    help="grpo: the reference from rlmt.models.frozen_reference, its pages released after each "
                         "reference pass (online.py itself still deep-copies the policy)")
    a = ap.parse_args()
    if a.mmap_threshold:
        _libc.mallopt(-3, a.mmap_threshold)  # M_MMAP_THRESHOLD
    ph = Phases(trim=a.trim)
    ph.enter("imports")
    import torch  # noqa: F401

    from rlmt.train.runner import train
    ph.leave("imports")
    instrument(ph, a.algorithm)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_for(a.algorithm, a.steps, Path(tmp), a.set)
        t0 = time.perf_counter()
        train(cfg)
        wall = time.perf_counter() - t0
    print(f"{a.algorithm} {' '.join(a.set)} MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX', '-')} "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '-')} trim={a.trim} "
          f"mmap_threshold={a.mmap_threshold or '-'} steps={a.steps} "
          f"wall {wall:.0f}s")
    print(ph.report())


if __name__ == "__main__":
    main()
