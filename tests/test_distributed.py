"""N ranks == 1 rank: the same global batch on 1 and 2 gloo processes (torchrun) gives the same weights.

Each case runs a tiny model for a few steps through ``rlmt train`` on one process and through
``rlmt train --nproc-per-node 2`` (two CPU processes, gloo), with the same config, and compares every tensor of
``final/`` (within 1e-4: the two differ only in the order of floating-point sums) and the logged losses. The
configs put more than one micro-batch, minibatch or epoch where the method has them, so the global
normalizers, the global minibatch split and the gradient sum are all exercised.
"""

from __future__ import annotations

import json
import signal
import time
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
    if kind.endswith("-fsdp"):  # FSDP2-sharded layers; a sharded checkpoint every step
        return _case(kind[:-5], data) + ["model.parallel=fsdp", "run.save_every=1"]
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
    if kind == "ppo-env":  # multi-turn episodes: keyed per turn, the last turn's reward and the dense ones
        rows = [{"prompt": f"Guess a number from 1 to 3 (game {i}).", "secret": i % 3 + 1} for i in range(8)]
        return ["algorithm=ppo", "env.source=guess_number", "env.args={low: 1, high: 3}", "env.max_turns=3",
                "env.max_total_tokens=60", f"data.train={_jsonl(data / 'guess.jsonl', rows)}"] + online[1:5] + [
                "optim.batch_size=4"]
    if kind == "trpo":  # g, F v, L and KL summed over ranks: the same CG and line search on every rank
        return ["algorithm=trpo", "trpo.cg_iters=4", "trpo.max_kl=0.05"] + online
    if kind == "rejection_sampling":  # kept sets gathered, each round's SFT steps split across ranks
        return ["algorithm=rejection_sampling", "rejection.rounds=2", "rejection.prompts_per_round=4",
                "rejection.keep_top_k=2", "rejection.threshold=0", "optim.batch_size=2", "optim.grad_accum=2",
                "optim.max_steps=0"] + [a for a in online if not a.startswith("optim.max_steps")]
    if kind == "grape":  # the critic on the rank that holds the responses; revisions keyed and gathered
        import yaml
        from test_grape import RUBRIC

        rubric = data / "rubric.yaml"
        rubric.write_text(yaml.safe_dump(RUBRIC))
        rows = [{"prompt": f"What is {a} + 2?", "answer": a + 2, "category": "math"} for a in range(8)]
        return ["algorithm=grape", f"grape.rubric={rubric}", "grape.critic={backend: local, model: tiny-random}",
                "grape.critic_mode=logprobs", f"data.train={_jsonl(data / 'grape.jsonl', rows)}",
                "data.max_prompt_tokens=512", "rollout.num_samples=3", "rollout.batch_prompts=2",
                "rollout.max_new_tokens=4", "optim.max_steps=3", "grape.revise=true", "pg.nll_coef=0.5",
                "pg.nll_tau=1.0"]
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


EXTENDED = pytest.mark.slow  # more methods on 2 ranks: `make test-slow` (keeps the default suite's share ~3 min)


@pytest.mark.parametrize("kind", ["sft", "dpo", "reward_model", "grpo", "reinforce", "ppo", "ppo-env", "sft-fsdp",
                                  "grpo-fsdp",
                                  *(pytest.param(k, marks=EXTENDED) for k in ("trpo", "rejection_sampling", "grape",
                                                                               "reward_model-fsdp"))])
def test_two_ranks_equal_one_rank(tmp_path, kind):
    args = _case(kind, tmp_path)
    _ok(train(args, tmp_path / "one"))
    _ok(train(args, tmp_path / "two", nproc=2))
    one, two = final_tensors(tmp_path / "one"), final_tensors(tmp_path / "two")
    assert one and one.keys() == two.keys()
    diff = max(float((one[k].float() - two[k].float()).abs().max()) for k in one)
    assert diff < 1e-4, f"final weights differ by {diff}"
    m1, m2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    if kind == "grape":  # rank 0's rubric report counts every rank's critiques
        reports = [json.loads((tmp_path / r / "rubric_report.json").read_text()) for r in ("one", "two")]
        counts = [{it["item"]: (it["applicable"], it["scored"]) for it in rep["items"]} for rep in reports]
        assert counts[0] == counts[1] and reports[0]["critic/requests"] == reports[1]["critic/requests"] > 0
    steps = 2 if kind == "rejection_sampling" else 3
    if kind.endswith("-fsdp"):  # the checkpoints hold each rank's shards (torch.distributed.checkpoint)
        manifest = json.loads((tmp_path / "two" / "checkpoints" / "step-3" / "manifest.json").read_text())
        assert "sharded/.metadata" in json.dumps(manifest)  # the manifest vouches for the shards' index too
        assert not (tmp_path / "two" / "checkpoints" / "step-3" / "model.safetensors").exists()
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == list(range(1, steps + 1))  # written once
    for a, b in zip(m1, m2):
        trained = a.get("trpo/accepted", 0) > 0 or (a["grad_norm"] > 0 and a["lr"] > 0 and not a["skipped_steps"])
        assert trained, a
        for key in ("loss", "grad_norm", "reward/mean", "tokens", "pairs", "accuracy", "trpo/kl", "kept/count",
                    "kept/reward_mean", "sft/steps", "revise/attempts", "revise/kept", "revise/pool", "demo/nll",
                    "env/return_mean", "env/turns_mean", "env/truncated", "rollout/tokens"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), (key, a, b)



@EXTENDED
def test_a_pipeline_on_two_ranks_equals_one_rank(tmp_path):
    sft = [{"prompt": f"What is {i} + 1?", "completion": f"{i + 1}"} for i in range(16)]
    train_file, _ = write_addition_split(tmp_path, 32, 4)
    stages = (f"stages=[{{name: sft, algorithm: sft, data: {{train: {_jsonl(tmp_path / 'sft.jsonl', sft)}}}, "
              "optim: {max_steps: 2, batch_size: 2, grad_accum: 2}}, "
              "{name: grpo, algorithm: grpo, model: {name: '${sft}'}, "
              f"data: {{train: {train_file}}}, optim: {{max_steps: 2, batch_size: 4}}, "
              "rollout: {num_samples: 4, batch_prompts: 4, max_new_tokens: 6}, "
              "reward: {source: regex, args: {pattern: '[0-9]'}}}]")
    _ok(train(["algorithm=pipeline", stages], tmp_path / "one"))
    _ok(train(["algorithm=pipeline", stages], tmp_path / "two", nproc=2))
    for stage in ("sft", "grpo"):
        one, two = final_tensors(tmp_path / "one" / stage), final_tensors(tmp_path / "two" / stage)
        assert one and max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-4, stage
    status = json.loads((tmp_path / "two" / "pipeline.json").read_text())
    assert [s["status"] for s in status["stages"]] == ["done", "done"]


# ------------------------------------------------------------------------------ failure, refusal, resume

RANK_MAIN = textwrap.dedent('''
    """One rank of a test job: registers the test's reward source, and gives rank 1 an extra override."""
    import os, sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from rlmt.rewards import REGISTRY
    REGISTRY["boom"] = ("boom_reward", "Boom")
    from rlmt.cli import main
    extra = os.environ.get("TEST_RANK1_OVERRIDE", "") if os.environ.get("RANK") == "1" else ""
    sys.exit(main(sys.argv[1:] + ([extra] if extra else [])))
''')

BOOM = textwrap.dedent('''
    import os
    from rlmt.rewards.base import RewardResult

    class Boom:
        """Scores 1.0, except on rank ``rank`` from step ``after`` on, where it raises."""
        name = "boom"

        def __init__(self, rank: int = 1, after: int = 0):
            self.rank, self.after, self.calls = rank, after, 0

        def score(self, rows, responses):
            self.calls += 1
            if os.environ.get("RANK") == str(self.rank) and self.calls > self.after:
                raise RuntimeError(f"boom: the reward function failed on rank {self.rank}")
            return RewardResult([1.0 for _ in responses], [{} for _ in responses])
''')


def torchrun(tmp_path: Path, args: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    """``torchrun --standalone --nproc-per-node 2 rank_main.py train ...`` in the background."""
    (tmp_path / "rank_main.py").write_text(RANK_MAIN)
    (tmp_path / "boom_reward.py").write_text(BOOM)
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             str(tmp_path / "rank_main.py"), "train", *TINY, *args],
                            env={**base, "PYTHONUNBUFFERED": "1", **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_a_rank_that_raises_in_the_reward_ends_the_job_with_its_error(tmp_path):
    args = _case("grpo", tmp_path) + ["reward.source=boom", "reward.args={rank: 1, after: 1}", "dist.timeout_s=60",
                                      f"run.output_dir={tmp_path / 'run'}"]
    t0 = time.monotonic()
    proc = torchrun(tmp_path, args)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode != 0
    assert "boom: the reward function failed on rank 1" in err
    assert time.monotonic() - t0 < 120  # ended by torchrun, well within the collective timeout
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1]  # rank 0 recorded the step before


def test_a_config_that_differs_on_one_rank_is_refused_before_any_step(tmp_path):
    args = _case("sft", tmp_path) + [f"run.output_dir={tmp_path / 'run'}"]
    proc = torchrun(tmp_path, args, env={"TEST_RANK1_OVERRIDE": "optim.lr=0.002"})
    out, err = proc.communicate(timeout=240)
    assert proc.returncode != 0
    assert "rank 1 resolved a different config than rank 0: optim.lr=0.002 (rank 0: 0.001)" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("overrides, message", [
    (["optim.grad_accum=3"], "optim.batch_size * optim.grad_accum=3 does not divide across 2 processes"),
    (["optim.step_in_backward=true", "optim.max_grad_norm=0", "optim.grad_accum=1"],
     "optim.step_in_backward on 2 processes: the gradients must be summed"),
    (["algorithm=grpo", "rollout.batch_prompts=3"], "rollout.batch_prompts=3 does not divide across 2 processes"),
])
def test_what_cannot_run_on_two_processes_is_a_clear_error(tmp_path, overrides, message):
    proc = train(_case("sft", tmp_path) + ["optim.batch_size=1", *overrides], tmp_path / "run", nproc=2)
    assert proc.returncode == 2 and f"error: {message}" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_killed_after_a_checkpoint_resume_to_the_uninterrupted_run(tmp_path, parallel):
    args = _case("grpo", tmp_path) + ["optim.max_steps=5", "run.save_every=1", "run.keep_checkpoints=10",
                                      f"model.parallel={parallel}"]
    _ok(train(args, tmp_path / "straight", nproc=2))
    killed = tmp_path / "killed"
    proc = torchrun(tmp_path, args + [f"run.output_dir={killed}"])
    deadline = time.monotonic() + 180
    while not (killed / "checkpoints" / "step-2" / "manifest.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGKILL)  # one rank dies; torchrun must end the other
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    done = [int(p.name.split("-")[1]) for p in (killed / "checkpoints").glob("step-*")]
    assert 2 <= max(done) < 5
    assert (killed / "checkpoints" / "step-2" / "rng-1.pt").exists()  # rank 1's RNG states beside rank 0's
    if parallel == "fsdp":  # the shards of 2 ranks do not load on 1
        refused = train(args + ["run.resume=true"], killed)
        assert refused.returncode == 2 and "resume it on 2 processes with model.parallel=fsdp" in refused.stderr
    _ok(train(args + ["run.resume=true"], killed, nproc=2))
    a, b = final_tensors(tmp_path / "straight"), final_tensors(killed)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
    ma, mb = read_metrics(tmp_path / "straight"), read_metrics(killed)
    assert [r["step"] for r in mb] == [1, 2, 3, 4, 5]
    for ra, rb in zip(ma, mb):
        assert {k: v for k, v in ra.items() if "time" not in k and "seconds" not in k and "per_s" not in k} == \
               {k: v for k, v in rb.items() if "time" not in k and "seconds" not in k and "per_s" not in k}
