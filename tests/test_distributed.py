"""N ranks == 1 rank: the same global batch on 1 and 2 gloo processes (torchrun) gives the same weights.

Each case runs a tiny model for a few steps through ``rlmt train`` on one process and through
``rlmt train --nproc-per-node 2`` (two CPU processes, gloo), with the same config, and compares every tensor of
``final/`` (within 1e-4: the two differ only in the order of floating-point sums) and the logged losses. The
configs put more than one micro-batch, minibatch or epoch where the method has them, so the global
normalizers, the global minibatch split and the gradient sum are all exercised.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rlmt.records import read_metrics
from rlmt.tasks import write_addition_split

TINY = ["model.name=tiny-random", "run.progress=false", "optim.lr=1e-3"]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _case(kind: str, data: Path) -> list[str]:
    sft = [{"prompt": f"Say {i}", "completion": f"{i} {i * 7}"} for i in range(24)]
    pref = [{"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}", "rejected": f"{i + 2}"} for i in range(24)]
    if kind == "sft":
        return ["algorithm=sft", f"data.train={_jsonl(data / 'sft.jsonl', sft)}", "optim.max_steps=3",
                "optim.batch_size=2", "optim.grad_accum=2", "optim.schedule=cosine", "optim.warmup_steps=1"]
    if kind in ("dpo", "reward_model"):
        return [f"algorithm={kind}", f"data.train={_jsonl(data / 'pref.jsonl', pref)}", "optim.max_steps=3",
                "optim.batch_size=2", "optim.grad_accum=2"]
    train, _ = write_addition_split(data, 32, 4)
    online = [f"data.train={train}", "optim.max_steps=3", "rollout.num_samples=4", "rollout.batch_prompts=4",
              "rollout.max_new_tokens=6", "reward.source=regex", "reward.args={pattern: '[0-9]'}",
              "optim.batch_size=4"]
    if kind == "grpo":  # two epochs of two minibatches: the global minibatch split and the shuffled epoch
        return ["algorithm=grpo", "pg.epochs=2", "pg.minibatches=2", "pg.curriculum=true"] + online
    if kind == "reinforce":  # the running-mean baseline is a mean over every rank's rewards
        return ["algorithm=reinforce", "pg.advantage=running_mean", "pg.beta=0.05"] + online
    if kind == "ppo":  # GAE whitened over every rank's tokens; the value head trains with the policy
        return ["algorithm=ppo"] + online
    raise ValueError(kind)


def train(args: list[str], out: Path, nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    launch = ["--nproc-per-node", str(nproc)] if nproc > 1 else []
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "rlmt", "train", *launch, *TINY, *args, f"run.output_dir={out}"],
                          capture_output=True, text=True, timeout=timeout, env={**env, "PYTHONUNBUFFERED": "1"})


def final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor ``final/`` holds (safetensors and .pt files), keyed by file and name."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted((run_dir / "final").rglob("*")):
        if f.suffix == ".safetensors":
            tensors = load_file(str(f))
        elif f.suffix == ".pt":
            tensors = torch.load(f, map_location="cpu")
        else:
            continue
        out.update({f"{f.name}:{k}": v for k, v in tensors.items() if isinstance(v, torch.Tensor)})
    return out


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("kind", ["sft", "dpo", "reward_model", "grpo", "reinforce", "ppo"])
def test_two_ranks_equal_one_rank(tmp_path, kind):
    args = _case(kind, tmp_path)
    _ok(train(args, tmp_path / "one"))
    _ok(train(args, tmp_path / "two", nproc=2))
    one, two = final_tensors(tmp_path / "one"), final_tensors(tmp_path / "two")
    assert one and one.keys() == two.keys()
    diff = max(float((one[k].float() - two[k].float()).abs().max()) for k in one)
    assert diff < 1e-4, f"final weights differ by {diff}"
    m1, m2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [1, 2, 3]  # one record, written once
    for a, b in zip(m1, m2):
        assert a["grad_norm"] > 0 and a["lr"] > 0 and not a["skipped_steps"]  # the runs trained
        for key in ("loss", "grad_norm", "reward/mean", "tokens", "pairs", "accuracy"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), (key, a, b)

