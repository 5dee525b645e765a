"""Shared pieces of the side-by-side benchmarks: per-process peak RSS and running one side in a child."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: str, which: str, steps: int) -> dict:
    """Run ``script --worker which`` in a fresh process (so peak RSS is that side's alone); parse RESULT."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, script, "--worker", which, "--steps", str(steps), "--work", tmp]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode != 0 or not line:
            raise RuntimeError(f"{which} failed:\n{out.stderr[-3000:]}")
        return json.loads(line[-1][len("RESULT "):])
