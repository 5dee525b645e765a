"""rlmt.allocator: huge-page tensors and the fixed mmap threshold, each checked in a fresh process (torch reads
its setting once per process)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and THP are Linux's")

_PROBE = r"""
import json, re
import rlmt
import torch
from rlmt import allocator

def rss_mb():
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024

out = {"huge": allocator.huge_page_tensors(), "threshold": allocator.limit_heap_fragmentation(),
       "per_layer_trim": allocator.per_layer_trim()}
# what fragmentation looks like: 5 MiB activations freed under small blocks that stay alive. Under glibc's
# adaptive threshold the first free of a mapped block raises it, and later blocks come from the heap and
# stay resident when freed
torch.ones(5 << 18)  # 5 MiB of float32, mapped and freed at once
big, small = [], []
for i in range(40):
    big.append(torch.ones(5 << 18))  # touched
    small.append(torch.ones(1024))
before = rss_mb()
del big
out["freed_mb"] = before - rss_mb()
print("RESULT " + json.dumps(out))
"""


def _probe(**env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "RLMT_MMAP_THRESHOLD")}
    full.update(env)
    res = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=full, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])


def test_importing_rlmt_turns_huge_page_tensors_on_and_fixes_the_threshold():
    """Importing rlmt before torch allocates gives huge-page tensors and, with them, a 4 MiB mmap threshold and
    no per-layer trim: freed 5 MiB tensors go back to the OS at once although small live blocks sit between."""
    out = _probe()
    assert out["huge"] is True
    assert out["threshold"] == 4 << 20 and out["per_layer_trim"] is False
    assert out["freed_mb"] > 0.9 * 40 * 5


def test_the_environment_can_turn_it_off_and_then_the_heap_keeps_the_freed_blocks():
    """``THP_MEM_ALLOC_ENABLE=0`` is respected: no huge pages, glibc's adaptive threshold (no fixed one), the
    per-layer trim, and freed blocks stay resident (the fragmentation a fixed threshold avoids)."""
    out = _probe(THP_MEM_ALLOC_ENABLE="0")
    assert out["huge"] is False
    assert out["threshold"] == 0 and out["per_layer_trim"] is True
    assert out["freed_mb"] < 0.5 * 40 * 5


def test_an_explicit_threshold_wins():
    """``RLMT_MMAP_THRESHOLD`` sets the threshold either way; without huge pages the per-layer trim stays."""
    out = _probe(THP_MEM_ALLOC_ENABLE="0", RLMT_MMAP_THRESHOLD=str(1 << 20))
    assert out["threshold"] == 1 << 20 and out["per_layer_trim"] is True
    assert out["freed_mb"] > 0.9 * 40 * 5
    assert _probe(RLMT_MMAP_THRESHOLD="0")["threshold"] == 0
