"""Exact resume: N steps straight == k steps, SIGKILL, resume to N (metrics and weights), for SFT and
rejection sampling; a kill during a checkpoint write leaves the previous checkpoint usable."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from rlmt.records import read_metrics
from rlmt.tasks import write_addition_split


def _sft_data(path: Path) -> Path:
    rows = [{"prompt": f"Say {i}", "completion": f"{i} {i * 7}"} for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(kind: str, data_dir: Path, out: Path) -> list[str]:
    common = ["model.name=tiny-random", f"run.output_dir={out}", "run.save_every=1", "run.progress=false",
              "run.keep_checkpoints=3"]
    if kind == "dpo":
        rows = [{"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}", "rejected": f"{i + 2}"} for i in range(24)]
        path = data_dir / "pref.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return ["algorithm=dpo", f"data.train={path}", "optim.max_steps=30", "optim.batch_size=2",
                "optim.grad_accum=2", "optim.lr=1e-3"] + common
    if kind == "sft":
        return ["algorithm=sft", f"data.train={_sft_data(data_dir / 'sft.jsonl')}", "optim.max_steps=30",
                "optim.batch_size=2", "optim.grad_accum=2", "optim.lr=1e-3", "optim.schedule=cosine",
                "optim.warmup_steps=3"] + common
    train, _ = write_addition_split(data_dir, 32, 4)
    if kind == "grpo":
        return ["algorithm=grpo", f"data.train={train}", "optim.max_steps=12", "rollout.num_samples=4",
                "rollout.batch_prompts=2", "rollout.max_new_tokens=6", "optim.lr=1e-3", "pg.curriculum=true",
                "reward.source=regex", "reward.args={pattern: '[0-9]'}"] + common
    return ["algorithm=rejection_sampling", f"data.train={train}", "rejection.rounds=4",
            "rejection.prompts_per_round=6", "rejection.keep_top_k=2", "rejection.threshold=0",
            "rollout.num_samples=3", "rollout.max_new_tokens=6", "optim.batch_size=2", "optim.lr=1e-3",
            "reward.args={mode: last_number}"] + common


def _run(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "rlmt.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _comparable(rows: list[dict]) -> list[dict]:
    drop = ("time/", "rollout/seconds", "rollout/tokens_per_s")
    return [{k: v for k, v in r.items() if not k.startswith(drop)} for r in rows]


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "final" / "model.safetensors")


def _killed_by(patch: str, args: list[str]) -> None:
    """Run ``rlmt train args`` in a child whose ``patch`` (Python source) SIGKILLs it at a chosen moment."""
    script = textwrap.dedent(patch) + f"\nfrom rlmt.cli import main\nsys.exit(main(['train', *{args!r}]))\n"
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr


def _resume_equals_straight(kind: str, tmp_path: Path, out: Path, args: list[str]) -> None:
    p = _run(args + ["run.resume=true"])
    assert p.wait(timeout=300) == 0, p.stderr.read()
    straight = tmp_path / "straight"
    p = _run(_args(kind, tmp_path, straight))
    assert p.wait(timeout=300) == 0
    assert _comparable(read_metrics(out)) == _comparable(read_metrics(straight))


@pytest.mark.parametrize("kind", ["sft", "rejection_sampling", "dpo", "grpo"])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, kind):
    straight = tmp_path / "straight"
    p = _run(_args(kind, tmp_path, straight))
    assert p.wait(timeout=300) == 0, p.stderr.read()

    killed = tmp_path / "killed"
    p = _run(_args(kind, tmp_path, killed))
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-3").exists():
        assert p.poll() is None, "finished before it could be killed: " + p.stderr.read()
        assert time.time() < deadline
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    steps_done = max(int(c.name.split("-")[1]) for c in (killed / "checkpoints").glob("step-*"))
    final_step = read_metrics(straight)[-1]["step"]
    assert 3 <= steps_done < final_step, "the kill must land mid-run"
    assert not (killed / "final").exists()

    p = _run(_args(kind, tmp_path, killed) + ["run.resume=true"])
    assert p.wait(timeout=300) == 0, p.stderr.read()
    assert _comparable(read_metrics(killed)) == _comparable(read_metrics(straight))
    a, b = _final_weights(straight), _final_weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    """SIGKILL inside the write of step-2 (after model.pt, before the optimizer): step-1 stays complete."""
    out = tmp_path / "run"
    args = _args("sft", tmp_path, out)
    _killed_by("""
        import os, signal, sys, torch
        import rlmt.checkpoint as ck
        real_save = torch.save
        def save(obj, path, *a, **k):
            if "step-2" in str(path) and str(path).endswith("optimizer.pt"):
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, path, *a, **k)
        ck.torch.save = save
    """, args)
    ckpts = sorted(x.name for x in (out / "checkpoints").iterdir())
    assert "step-1" in ckpts and "step-2" not in ckpts
    assert any(n.startswith(".tmp-step-2") for n in ckpts)  # the half-written one, never picked up
    _resume_equals_straight("sft", tmp_path, out, args)
    assert not any(n.startswith(".tmp") for n in os.listdir(out / "checkpoints"))


def test_kill_after_a_rounds_kept_set_is_written_resumes_exactly(tmp_path):
    """SIGKILL right after round 1's kept set is written, before its SFT: the resumed run redoes round 1 from
    the last checkpoint (the round's sampling is a pure function of (seed, round) and the weights), so its
    metrics and final weights equal the uninterrupted run's."""
    out = tmp_path / "run"
    args = _args("rejection_sampling", tmp_path, out)
    _killed_by("""
        import os, signal, sys
        import rlmt.train.rejection as rejection
        real = rejection.write_atomic
        def write_atomic(path, text):
            real(path, text)
            if str(path).endswith("round-1.jsonl"):
                os.kill(os.getpid(), signal.SIGKILL)
        rejection.write_atomic = write_atomic
    """, args)
    assert (out / "rounds" / "round-1.jsonl").exists() and not (out / "final").exists()
    _resume_equals_straight("rejection_sampling", tmp_path, out, args)


def test_models_settle_vector_math_dispatch_before_use(monkeypatch):
    """The oneMKL first-call race (see ``warm_up_vector_math``) made resumed runs drift by ~1e-4 in the first
    rotary ``cos``: every model load settles the dispatch first, with one-element calls of each VML op."""
    import rlmt.models.loading as models

    warm_up = models.warm_up_vector_math.__wrapped__  # uncached
    calls = []
    monkeypatch.setattr(models, "warm_up_vector_math", lambda: calls.append("warm"))
    models.load_model("tiny-random")
    assert calls
    calls.clear()
    models.tiny_random_model()
    assert calls
    seen = []
    for op in models._VML_OPS:
        real = getattr(torch, op)
        monkeypatch.setattr(torch, op, lambda x, real=real, op=op: seen.append((op, x.numel(), x.dtype)) or real(x))
    warm_up()
    assert {(op, 1, dt) for op in models._VML_OPS for dt in (torch.float32, torch.float64)} == set(seen)
