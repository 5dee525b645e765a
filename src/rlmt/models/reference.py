"""The frozen reference model of KL-regularized methods, and how its memory is kept small on the CPU.

:func:`frozen_reference` makes the copy (file-backed pages where it can), :meth:`Reference.passes` opens around a
step's reference forward passes, and :class:`Reference` is what the online loop holds: the copy, or (LoRA)
the policy itself with its adapters disabled.
"""

from __future__ import annotations

import contextlib
import mmap
from dataclasses import dataclass
from pathlib import Path

import torch

from rlmt.models.loading import LoadedModel, is_tiny


def _file_mappings() -> list[tuple[int, int, str, str]]:
    """(start, end, permissions, path) of this process's file-backed memory mappings (Linux; else [])."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    out.append((lo, hi, parts[1], parts[5].strip()))
    except OSError:
        pass
    return out


def _weight_mappings(model: torch.nn.Module, path: str) -> list[tuple[int, int]]:
    """The private file mappings of ``path`` that hold *every* parameter of ``model``, or [] if any parameter
    lives elsewhere (then paging is not possible)."""
    maps = [(lo, hi) for lo, hi, perm, p in _file_mappings() if perm.endswith("p") and p == path]
    used = set()
    for p in model.parameters():
        ptr = p.data_ptr()
        hit = next(((lo, hi) for lo, hi in maps if lo <= ptr and ptr + p.numel() * p.element_size() <= hi), None)
        if hit is None:
            return []
        used.add(hit)
    return sorted(used)


@dataclass(frozen=True)
class FilePages:
    """The private file mappings of ``path`` that hold every weight of a reference (see :func:`frozen_reference`)."""

    path: str
    spans: list[tuple[int, int]]

    def intact(self, model: torch.nn.Module) -> bool:
        """Whether ``model``'s weights still live exactly in these mappings (nothing was moved or replaced)."""
        return _weight_mappings(model, self.path) == self.spans


class Reference:
    """pi_ref of the KL terms: a frozen copy of the policy's weights when the run started, or (``copy`` None,
    LoRA) the policy itself with its adapters disabled. ``pages``: the copy's weights are clean file-backed
    pages that can be dropped between steps (:func:`frozen_reference`). ``autocast``: the dtype its forward
    passes autocast to (the policy's: the two agree exactly while their weights do)."""

    def __init__(self, policy: torch.nn.Module, copy: torch.nn.Module | None, pages: FilePages | None = None,
                 autocast: torch.dtype | None = None):
        self.policy, self.copy, self.pages, self.autocast = policy, copy, pages, autocast

    @property
    def module(self) -> torch.nn.Module:
        """The module whose forward is pi_ref (the LoRA policy only inside :meth:`passes`)."""
        return self.copy if self.copy is not None else self.policy

    @contextlib.contextmanager
    def passes(self):
        """Open around a step's no-grad reference forward passes; yields the module to run.

        LoRA: the policy with adapters disabled. A file-backed copy under autocast: the decoder body's
        ``nn.Linear`` weights and biases (what autocast casts at every use) hold a cast copy while open, made
        once from the file's float32 pages, which are dropped as each is cast: the passes then hold a bfloat16
        body (~210 MB for SmolLM2-135M) instead of faulting in its float32 pages (~430 MB), and cast once
        instead of once per forward. The log-probs are the same bits (autocast casts a bfloat16 weight to
        itself); norms, embeddings and the output layer are untouched. On exit the original tensors are put
        back, whatever happened inside, and the file pages are dropped (:meth:`release_pages`).
        """
        if self.copy is None:
            with self.policy.disable_adapter():
                yield self.policy
            return
        ref, dtype = self.copy, self.autocast
        originals: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
        try:
            if self.pages is not None and dtype is not None and self.pages.intact(ref):
                head = ref.get_output_embeddings()
                skip = {id(p) for p in head.parameters()} if head is not None else set()
                for m in ref.get_decoder().modules():
                    if isinstance(m, torch.nn.Linear):
                        for p in (m.weight, m.bias):
                            if (p is not None and id(p) not in skip and id(p) not in originals
                                    and p.is_floating_point() and p.dtype != dtype):
                                originals[id(p)] = (p, p.data)
                                p.data = p.data.to(dtype)
                                old = originals[id(p)][1]  # drop the float32 pages just read
                                lo = old.data_ptr()
                                _drop_pages([(lo - lo % mmap.PAGESIZE, lo + old.numel() * old.element_size())])
            yield ref
        finally:
            for p, data in originals.values():
                p.data = data
            self.release_pages()

    def release_pages(self) -> int:
        """Drop the resident pages of a file-backed copy (a no-op otherwise); returns the bytes released.

        ``madvise(MADV_DONTNEED)`` on a private file mapping discards the process's pages; the next access
        reads the file again (from the page cache). The reference is never written, so nothing is lost, and
        even a written page would come back as the file's (= the reference's) value.
        """
        if self.copy is None or self.pages is None or not self.pages.intact(self.copy):
            return 0
        return _drop_pages(self.pages.spans)


def frozen_reference(lm: LoadedModel, dtype: str = "float32") -> Reference:
    """pi_ref for ``lm.model``: with LoRA the policy with adapters disabled; otherwise a frozen (eval, no-grad)
    copy of its *current* weights.

    When the policy came from a float32 safetensors checkpoint on the CPU and still holds exactly the
    weights in that file, the copy is loaded from the file again: transformers memory-maps it, so its weights
    are clean file-backed pages that :meth:`Reference.release_pages` drops from the process between
    reference passes (the next pass faults them back in from the page cache; the numbers are the same bits).
    Otherwise (tiny models, other dtypes, GPU, weights already changed) it is a ``copy.deepcopy``. Either way
    its forward passes run at the policy's autocast setting (:mod:`rlmt.rollout.precision`), so the two agree
    exactly while their weights do.
    """
    import copy

    model = lm.model
    if getattr(model, "peft_config", None):
        return Reference(model, None, autocast=lm.autocast)
    params = list(model.parameters())
    weights = Path(lm.path) / "model.safetensors"
    if (dtype == "float32" and not is_tiny(lm.name) and weights.exists()
            and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)):
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(lm.path, dtype=torch.float32).eval().requires_grad_(False)
        ref_params = dict(ref.named_parameters())
        same = set(ref_params) == {n for n, _ in model.named_parameters()} and all(
            torch.equal(ref_params[n], p) for n, p in model.named_parameters())
        spans = _weight_mappings(ref, str(weights.resolve())) if same else []
        shared = any(lo <= p.data_ptr() < hi for p in params for lo, hi in spans)  # never page the policy
        if spans and not shared:
            out = Reference(model, ref, FilePages(str(weights.resolve()), spans), lm.autocast)
            out.release_pages()
            return out
        del ref
    return Reference(model, copy.deepcopy(model).eval().requires_grad_(False), autocast=lm.autocast)


def _drop_pages(spans: list[tuple[int, int]]) -> int:
    """madvise(MADV_DONTNEED) each [lo, hi) of a private file mapping (lo page-aligned); returns the bytes."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return sum(hi - lo for lo, hi in spans if libc.madvise(lo, hi - lo, mmap.MADV_DONTNEED) == 0)
