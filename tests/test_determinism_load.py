"""Seeded runs are bit-identical whatever the machine's load (issue 16).

The load-dependent path: with OpenMP's dynamic adjustment on (``OMP_DYNAMIC=true``, or a library calling
``omp_set_dynamic(1)``), libgomp sizes every parallel region's team by the 15-minute load average, below what
``torch.get_num_threads()`` reports, and 1 and 2 threads compute different losses (a reduction's split, a
GEMM's partition). :func:`rlmt.runtime.apply_runtime` turns the adjustment off. The run test makes the machine
busy (a spinner per two CPUs, and a short burst of runnable processes that lifts the 15-minute load average above 1
where it is lower), then runs the same seeded GRPO run with the adjustment on and off: same metrics, same
final weights. Before the fix the dynamic run took the 1-thread numbers (step-2 loss 1.3922669e-04 against
1.3921643e-04 on 2 CPUs)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlmt.records import read_metrics
from rlmt.tasks import write_addition_split

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libgomp and /proc/loadavg are Linux's")

_SPIN = "while :; do :; done"


def _spinners(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen(["sh", "-c", _SPIN], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for _ in range(n)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


def _lift_load_average(target: float = 1.0, burst: int = 96, limit_s: float = 30.0) -> None:
    """Raise the 15-minute load average to ``target`` if it is lower: ``burst`` runnable processes for as long
    as it takes (the kernel adds ~0.55% of the runnable count every 5 s: ~10 s from 0), at most ``limit_s``."""
    if os.getloadavg()[2] >= target:
        return
    procs = _spinners(burst)
    try:
        deadline = time.monotonic() + limit_s
        while os.getloadavg()[2] < target and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        _stop(procs)


def _grpo(out: Path, train: Path, omp_dynamic: str) -> subprocess.CompletedProcess:
    args = ["algorithm=grpo", "model.name=tiny-random", f"data.train={train}", "optim.max_steps=6",
            "rollout.num_samples=4", "rollout.batch_prompts=2", "rollout.max_new_tokens=6", "optim.lr=1e-3",
            "reward.source=regex", "reward.args={pattern: '[0-9]'}", f"run.output_dir={out}", "run.progress=false"]
    env = {**os.environ, "OMP_DYNAMIC": omp_dynamic}
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # torch's default thread count: one per CPU
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "rlmt.cli", "train", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def _comparable(rows: list[dict]) -> list[dict]:
    drop = ("time/", "rollout/seconds", "rollout/tokens_per_s")
    return [{k: v for k, v in r.items() if not k.startswith(drop)} for r in rows]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "final" / "model.safetensors")


def test_apply_runtime_turns_openmp_dynamic_teams_off():
    """In a process started with OMP_DYNAMIC=true, the thread that applied the runtime runs full teams."""
    probe = r"""
import ctypes, json, torch
from rlmt import runtime
from rlmt.config import RuntimeConfig
libs = [ctypes.CDLL(l.split()[-1]) for l in open("/proc/self/maps") if "libgomp" in l.split()[-1]]
before = [lib.omp_get_dynamic() for lib in libs]
state = runtime.apply_runtime(RuntimeConfig(mmap_threshold=0), "cpu")
print(json.dumps({"before": before, "after": [lib.omp_get_dynamic() for lib in libs],
                  "state": getattr(state, "openmp_dynamic", None)}))
"""
    env = {**os.environ, "OMP_DYNAMIC": "true"}
    p = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    if not out["before"]:
        pytest.skip("torch does not run on libgomp here")
    assert all(out["before"]), out  # the environment did turn it on
    assert not any(out["after"]), out
    assert out["state"] is True


def test_seeded_grpo_runs_are_bit_identical_on_a_busy_machine(tmp_path):
    train, _ = write_addition_split(tmp_path / "data", 32, 4)
    spinners = _spinners(max(1, (os.cpu_count() or 2) // 2))  # half the CPUs: busy, not starved
    try:
        _lift_load_average()
        runs = {}
        for mode in ("true", "false"):  # OpenMP free to shrink teams with the load, and not
            out = tmp_path / f"dynamic-{mode}"
            p = _grpo(out, train, mode)
            assert p.returncode == 0, p.stderr[-3000:]
            runs[mode] = out
    finally:
        _stop(spinners)
    a, b = (_comparable(read_metrics(runs[m])) for m in ("true", "false"))
    assert len(a) == 6
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert a == b
    wa, wb = _weights(runs["true"]), _weights(runs["false"])
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
