"""How CPU tensors get their memory: glibc's heap and mmap threshold, and transparent huge pages.

Training on the CPU allocates and frees activations of a few MiB thousands of times a step. Left to glibc's
defaults this costs memory: glibc raises its mmap threshold (128 KiB at start, up to 32 MiB) each time a mapped
block is freed, after which multi-MiB tensors come from the heap, and the freed ones stay resident as
fragmented free heap (~0.5 GB of the peak on SmolLM2-135M, benchmarks/memory_profile.py). Returning that heap
with ``malloc_trim`` costs time instead: every trimmed page is faulted back in, zero-filled, when reused.

rlmt's setting, measured on the GRPO benchmark's update pass (SmolLM2-135M, bf16 autocast, checkpointing):

- ``THP_MEM_ALLOC_ENABLE=1`` (read by torch's CPU allocator at its first allocation; ``rlmt/__init__`` sets it
  unless the environment already says otherwise): torch advises every allocation of 2 MiB or more for
  transparent huge pages (``madvise(MADV_HUGEPAGE)``), so the kernel faults it in 2 MiB at a time, not 4 KiB.
- A fixed mmap threshold of 4 MiB (:func:`limit_heap_fragmentation`): every block of 4 MiB or more is its own
  mapping, handed back to the OS as soon as it is freed, whatever was freed before.
- No heap trim after every layer of a forward (:func:`per_layer_trim` is false): it returned pages that the
  next layer faulted back in, zero-filled.

Measured, the update pass alone (in-process, 3 passes each, two processes per setting): 5.8-6.6 s with
610-670 thousand page faults and 1.4-1.6 s of kernel time before; 4.7-6.2 s with 2-120 thousand faults and
0.3-0.5 s of kernel time after. The whole benchmark step (benchmarks/memory_profile.py grpo, bf16): peak RSS
2788 MB before, 2670-2714 MB after. The parts do not work alone: the threshold and no trim without huge pages
peaked at 3078 MB; huge pages with glibc's adaptive threshold and the trim kept the faults (445 thousand).
The numbers computed do not change. Linux/glibc only; elsewhere these are no-ops.
"""

from __future__ import annotations

import functools
import os

import torch

_MMAP_THRESHOLD_WITH_HUGE_PAGES = 4 << 20
_threshold = 0  # the fixed mmap threshold in effect (0: glibc's adaptive one)


@functools.lru_cache(maxsize=1)
def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def huge_page_tensors() -> bool:
    """Whether torch's CPU allocator advises large tensors for transparent huge pages in this process.

    Probed, not read from the environment: torch reads ``THP_MEM_ALLOC_ENABLE`` once, at its first allocation,
    so setting it later has no effect. The probe allocates 4 MiB and looks up the flags of the memory mapping
    that holds it in ``/proc/self/smaps`` (``hg``: advised for huge pages)."""
    x = torch.empty(4 << 20, dtype=torch.uint8)
    ptr = x.data_ptr()
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(" ", 1)[0]
                if "-" in head and ":" not in head:  # a mapping's first line: "start-end perms ..."
                    lo, hi = (int(v, 16) for v in head.split("-"))
                    inside = lo <= ptr < hi
                elif inside and line.startswith("VmFlags:"):
                    return "hg" in line.split()[1:]
    except OSError:
        pass
    return False


def limit_heap_fragmentation() -> int:
    """Fix glibc's mmap threshold; returns the threshold set (0: glibc's adaptive threshold is left alone).

    ``RLMT_MMAP_THRESHOLD`` (bytes) chooses it; 0 turns it off. By default it is 4 MiB when
    :func:`huge_page_tensors` holds and off otherwise: without huge pages every mapped tensor is faulted in
    4 KiB at a time, which measured on the DPO benchmark (float32, 1 MiB threshold) took the step from 3.54 s
    to 5.94 s for ~410 MB less peak RSS.
    """
    global _threshold
    default = _MMAP_THRESHOLD_WITH_HUGE_PAGES if huge_page_tensors() else 0
    try:
        threshold = int(os.environ.get("RLMT_MMAP_THRESHOLD", default))
    except ValueError:
        threshold = default
    libc = _libc()
    if threshold <= 0 or libc is None or not hasattr(libc, "mallopt"):
        return 0
    _threshold = threshold if libc.mallopt(-3, threshold) == 1 else 0  # -3: M_MMAP_THRESHOLD
    return _threshold


def per_layer_trim() -> bool:
    """Whether a CPU forward that keeps activations should trim the heap after every layer
    (:func:`rlmt.rollout.logprobs.heap_trimmed_forward`): yes, unless large tensors are huge-page advised and a fixed
    threshold maps them. Then the trim measured 450-540 thousand page faults a step for no lower peak; without
    huge pages, dropping it raised the peak by ~300 MB."""
    return not (_threshold > 0 and huge_page_tensors())


def release_free_heap() -> None:
    """Hand the allocator's free heap pages back to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere).

    Called between the phases of a step (rollout, reference pass, update): each phase frees its transient
    tensors, but glibc keeps the freed heap resident, fragmented by small long-lived blocks, and the next
    phase's peak stacks on top of it. A few milliseconds; the numbers computed do not change.
    ``RLMT_HEAP_TRIM=0`` turns it off."""
    libc = _libc()
    if os.environ.get("RLMT_HEAP_TRIM", "1") != "0" and libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
