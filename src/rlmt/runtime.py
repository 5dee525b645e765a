"""The process settings of a run (``cfg.runtime``): torch's threads and how CPU tensors get their memory.

Importing rlmt changes nothing in the process. :func:`apply_runtime` applies a :class:`rlmt.config.RuntimeConfig`
when a run starts (:func:`rlmt.train.session.start_run`) and returns what is in effect.

Training on the CPU allocates and frees activations of a few MiB thousands of times a step. Left to glibc's
defaults this costs memory: glibc raises its mmap threshold (128 KiB at start, up to 32 MiB) each time a mapped
block is freed, after which multi-MiB tensors come from the heap, and the freed ones stay resident as
fragmented free heap (~0.5 GB of the peak on SmolLM2-135M, benchmarks/memory_profile.py). Returning that heap
with ``malloc_trim`` costs time instead: every trimmed page is faulted back in, zero-filled, when reused.

The defaults, measured on the GRPO benchmark's update pass (SmolLM2-135M, bf16 autocast, checkpointing):

- ``runtime.huge_pages``: ``THP_MEM_ALLOC_ENABLE=1``, read by torch's CPU allocator once, at its first
  allocation, so it is an environment variable set before torch allocates: the ``rlmt`` command line sets it
  (unless the environment already says otherwise); a library caller sets it itself. torch then advises every
  allocation of 2 MiB or more for transparent huge pages (``madvise(MADV_HUGEPAGE)``), so the kernel faults it
  in 2 MiB at a time, not 4 KiB. :func:`huge_page_tensors` probes whether it is in effect.
- ``runtime.mmap_threshold``: a fixed mmap threshold of 4 MiB when huge pages are in effect: every block of
  4 MiB or more is its own mapping, handed back to the OS as soon as it is freed, whatever was freed before.
  Not without huge pages: every mapped tensor is then faulted in 4 KiB at a time, which measured on the DPO
  benchmark (float32, 1 MiB threshold) took the step from 3.54 s to 5.94 s for ~410 MB less peak RSS.
- ``runtime.layer_trim``: no heap trim after every layer of a training forward when both hold
  (:func:`per_layer_trim` is false): it returned pages that the next layer faulted back in, zero-filled
  (450-540 thousand page faults a step for no lower peak). Without them, dropping it raised the peak by ~300 MB.
- ``runtime.heap_trim``: the free heap is handed back between the phases of an online step
  (:func:`release_free_heap`).

Measured, the update pass alone (in-process, 3 passes each, two processes per setting): 5.8-6.6 s with
610-670 thousand page faults and 1.4-1.6 s of kernel time before; 4.7-6.2 s with 2-120 thousand faults and
0.3-0.5 s of kernel time after. The whole benchmark step (benchmarks/memory_profile.py grpo, bf16): peak RSS
2788 MB before, 2670-2714 MB after. The parts do not work alone: the threshold and no trim without huge pages
peaked at 3078 MB; huge pages with glibc's adaptive threshold and the trim kept the faults (445 thousand).
The numbers computed do not change. The allocator settings are for CPU runs on Linux/glibc; elsewhere they
are no-ops.

Threads: the numbers a CPU run computes depend on how many threads share each op (a reduction's split, a
GEMM's partition): 1 and 2 threads differ from the 5th-7th digit of the loss on. ``torch.get_num_threads()``
is what torch asks its OpenMP runtime for, not what it gets: with OpenMP's dynamic adjustment on
(``OMP_DYNAMIC=true``, or any library in the process calling ``omp_set_dynamic(1)``, as OpenCV does when it
loads), libgomp re-sizes every team at every parallel region to ``min(threads, CPUs) - int(15-minute load
average + 0.1)`` (at least 1), while torch still reports the full count. Seeded runs and resumes then differ
with the machine's recent load and are bit-exact only on a quiet one (measured: 2 CPUs, ``OMP_DYNAMIC=true``,
15-minute load average above 1: every run took the 1-thread numbers; unset: 0 of 18 runs under busy loops differed,
nor a kill + resume). :func:`apply_runtime` turns the adjustment off (``omp_set_dynamic(0)`` on every OpenMP runtime
loaded, for the calling thread, which runs the forward, the backward and oneMKL/oneDNN's kernels), so every
team is the size torch reports. :attr:`RuntimeState.openmp_dynamic` says whether it had been on.

What was applied is one module-level :class:`RuntimeState` (:func:`applied`; None until a run applies one). It
mirrors process-global settings (torch's thread count, glibc's mmap threshold), so one state per process is
all there is: a later run's :func:`apply_runtime` replaces it.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass

import torch

from rlmt.config import RuntimeConfig

_MMAP_THRESHOLD_WITH_HUGE_PAGES = 4 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number


@dataclass(frozen=True)
class RuntimeState:
    """What :func:`apply_runtime` put in effect."""

    threads: int  # torch's intra-op threads now
    huge_pages: bool  # asked for by the config, for a CPU run on Linux
    huge_pages_active: bool  # probed: torch advises large CPU tensors for huge pages (:func:`huge_page_tensors`)
    mmap_threshold: int  # glibc's fixed mmap threshold in bytes; 0: its adaptive one
    heap_trim: bool  # :func:`release_free_heap` trims
    layer_trim: bool  # :func:`per_layer_trim`: trim after every decoder layer of a training forward
    openmp_dynamic: bool = False  # OpenMP's load-dependent team sizing had been on (:func:`fix_openmp_teams`)

    @property
    def note(self) -> str | None:
        """One line for the user when huge pages were asked for but are not in effect; None otherwise."""
        if self.huge_pages and not self.huge_pages_active:
            return ("runtime.huge_pages: not in effect (torch allocated before THP_MEM_ALLOC_ENABLE=1 was set, or "
                    "the environment sets it otherwise); set it before starting Python to get it")
        return None


_applied: RuntimeState | None = None


@functools.lru_cache(maxsize=1)
def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _has(name: str) -> bool:
    libc = _libc()
    return libc is not None and hasattr(libc, name)


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


@functools.lru_cache(maxsize=1)
def _openmp_runtimes() -> tuple:
    """The OpenMP runtimes loaded in this process (libgomp in torch's x86 wheels; libiomp5 or libomp in other
    builds), opened by the paths ``/proc/self/maps`` lists them under, so they are the copies torch uses and
    not others of the same name. Empty where there is no /proc or no OpenMP runtime."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if line.rstrip().endswith(".so") or ".so." in line})
    except OSError:
        return ()
    found = []
    for path in paths:
        if os.path.basename(path).startswith(("libgomp", "libiomp", "libomp")):
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            if hasattr(lib, "omp_set_dynamic") and hasattr(lib, "omp_get_dynamic"):
                found.append(lib)
    return tuple(found)


def openmp_dynamic() -> bool:
    """Whether an OpenMP runtime of this process may give the calling thread's parallel regions fewer threads
    than torch asks for (dynamic adjustment: libgomp sizes teams by the load average)."""
    return any(lib.omp_get_dynamic() for lib in _openmp_runtimes())


def fix_openmp_teams() -> bool:
    """Turn OpenMP's dynamic adjustment off for the calling thread, in every OpenMP runtime loaded, so each of
    its parallel regions (torch's intra-op ops, oneMKL, oneDNN) gets the full ``torch.get_num_threads()``
    whatever the machine's load; returns whether it had been on. Microseconds; repeat it after loading a
    library that turns it on (e.g. OpenCV)."""
    was = openmp_dynamic()
    for lib in _openmp_runtimes():
        lib.omp_set_dynamic(0)
    return was


def _fix_mmap_threshold(threshold: int) -> int:
    """mallopt(M_MMAP_THRESHOLD); returns the fixed threshold in effect afterwards (0: glibc's adaptive one).

    Once fixed, glibc never adapts it again, so asking for 0 after an earlier run fixed one keeps that one."""
    previous = _applied.mmap_threshold if _applied is not None else 0
    if threshold > 0 and _has("mallopt") and _libc().mallopt(_M_MMAP_THRESHOLD, threshold) == 1:
        return threshold
    return previous


def apply_runtime(cfg: RuntimeConfig, device: str | torch.device) -> RuntimeState:
    """Apply ``cfg`` to this process for a run on ``device`` and return what is in effect (also :func:`applied`).

    Sets torch's threads (``cfg.threads`` > 0) and makes every OpenMP team of this thread that size, whatever
    the load (:func:`fix_openmp_teams`; see the module doc). On a CPU run: fixes glibc's mmap threshold
    (``cfg.mmap_threshold``; -1: 4 MiB when :func:`huge_page_tensors` holds, else glibc's adaptive one) and
    resolves the heap trims. Huge pages cannot be turned on here (torch has allocated by now); the state says
    whether they are in effect, and :attr:`RuntimeState.note` says so when they were asked for and are not.
    Off the CPU the allocator settings are left alone and both trims are off."""
    global _applied
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    dynamic = fix_openmp_teams()
    cpu = torch.device(device).type == "cpu"
    active = huge_page_tensors()
    auto = _MMAP_THRESHOLD_WITH_HUGE_PAGES if active else 0
    threshold = _fix_mmap_threshold((auto if cfg.mmap_threshold < 0 else cfg.mmap_threshold) if cpu else 0)
    trims = cpu and _has("malloc_trim")
    layer_trim = {"on": True, "off": False, "auto": not (threshold > 0 and active)}[cfg.layer_trim]
    _applied = RuntimeState(threads=torch.get_num_threads(),
                            huge_pages=cfg.huge_pages and cpu and sys.platform.startswith("linux"),
                            huge_pages_active=active, mmap_threshold=threshold,
                            heap_trim=trims and cfg.heap_trim, layer_trim=trims and layer_trim,
                            openmp_dynamic=dynamic)
    return _applied


def applied() -> RuntimeState | None:
    """The state the last :func:`apply_runtime` put in effect; None before any run applied one."""
    return _applied


def per_layer_trim() -> bool:
    """Whether a CPU forward that keeps activations should trim the heap after every layer
    (:func:`rlmt.rollout.logprobs.heap_trimmed_forward`): the applied ``runtime.layer_trim``; before any run
    applied one, yes (no fixed mmap threshold is in effect then)."""
    return _applied.layer_trim if _applied is not None else True


def release_free_heap() -> None:
    """Hand the allocator's free heap pages back to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere).

    Called between the phases of a step (rollout, reference pass, update): each phase frees its transient
    tensors, but glibc keeps the freed heap resident, fragmented by small long-lived blocks, and the next
    phase's peak stacks on top of it. A few milliseconds; the numbers computed do not change. Follows the
    applied ``runtime.heap_trim``; before any run applied one, it trims."""
    if (_applied is None or _applied.heap_trim) and _has("malloc_trim"):
        _libc().malloc_trim(0)
