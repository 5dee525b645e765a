"""Environment runs end to end (tiny model): GRPO, GSPO, REINFORCE and PPO train on episodes with tools, the
dense per-turn credit, config errors before any model loads, and SIGKILL mid-episode-batch + resume == straight."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rlmt.config import ConfigError, load_config
from rlmt.data import PromptFormat
from rlmt.envs import Renderer, run_episodes
from rlmt.models import load_model
from rlmt.records import read_metrics
from rlmt.rollout import SamplingParams, sample_keys
from rlmt.train.dense import dense_reinforce_advantages
from rlmt.train.runner import train

from test_envs import Scripted

ENV_KEYS = ("env/turns_mean", "env/tool_calls", "env/tool_errors", "env/truncated", "env/errors", "env/return_mean")


def _data(tmp_path: Path) -> Path:
    path = tmp_path / "arith.jsonl"
    rows = [{"prompt": f"What is {a} * {b}?", "answer": a * b} for a, b in [(123, 45), (67, 890), (12, 34), (5, 678)]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _overrides(tmp_path: Path, algorithm: str, out: str = "run") -> list[str]:
    data = _data(tmp_path)
    return [f"algorithm={algorithm}", "model.name=tiny-random", f"data.train={data}", f"data.eval={data}",
            "env.source=tool_arithmetic", "env.tools=[calculator, python]", "env.max_turns=3",
            "env.max_total_tokens=48", "rollout.num_samples=2", "rollout.batch_prompts=2",
            "rollout.max_new_tokens=8", "optim.max_steps=2", "optim.batch_size=4", "optim.lr=1e-3",
            "eval.num_samples=2", "eval.max_new_tokens=8", "run.eval_before_after=true", "run.progress=false",
            f"run.output_dir={tmp_path / out}"]


@pytest.mark.parametrize("algorithm", ["grpo", "gspo", "reinforce", "ppo"])
def test_online_methods_train_on_episodes(tmp_path, algorithm):
    cfg = load_config(None, _overrides(tmp_path, algorithm))
    run = train(cfg)
    rows = read_metrics(run)
    assert len(rows) == 2 and all(k in rows[-1] for k in ENV_KEYS)
    assert rows[-1]["env/turns_mean"] >= 1 and rows[-1]["tokens"] > 0
    assert abs(rows[-1]["rollout/logprob_gap"]) < 1e-4  # the update scores the sampled tokens in their context
    after = json.loads((run / "eval-after.json").read_text())
    assert "pass@1" in after and "env/turns_mean" in after
    episode = json.loads((run / "eval-after.jsonl").read_text().splitlines()[0])
    assert episode["details"]["transcript"][0]["role"] == "system"  # the tool instructions
    assert "<tool_call>" in episode["details"]["transcript"][0]["content"]
    assert (run / "final" / "model.safetensors").exists()


def test_per_turn_rewards_credit_only_the_turns_before_them():
    lm = load_model("tiny-random")
    eb = run_episodes(lm.model, lm.tokenizer, Renderer(lm.tokenizer, PromptFormat()), Scripted, [{"prompt": "a"}],
                      [1], SamplingParams(2, 1.0, 1.0, 5), sample_keys(0, 0, [0], 2), 4, 400, 1)
    final, dense = eb.dense()
    adv = dense_reinforce_advantages(final, dense, eb.batch.response_mask, torch.zeros(2))
    for i, ep in enumerate(eb.episodes):
        turns = [t for t in range(len(ep.ids)) if ep.sampled[t]]
        first_end = ep.turn_ends[0]
        for t in turns:  # rewards 0.25 after turn 1 and 1.0 after turn 3
            assert adv[i, t] == pytest.approx(1.25 if t <= first_end else 1.0)
        assert adv[i][~eb.batch.response_mask[i]].abs().sum() == 0


@pytest.mark.parametrize("over,message", [
    (["env.source=guess_numbr"], "did you mean 'guess_number'"),
    (["env.source=guess_number", "env.tools=[]", "env.args={lo: 1}"], "env.args.lo: not an argument"),
    (["env.source=guess_number", "env.tools=[]", "env.args={low: 5, high: 1}"], "must be below"),
    (["env.source=guess_number", "env.tools=[calculator]"], "does not use tools"),
    (["env.source=tool_arithmetic", "env.tools=[abacus]"], "env.tools.0: unknown tool"),
    (["env.source=tool_arithmetic", "algorithm=trpo"], "env.source: multi-turn environments train with"),
    (["env.source=tool_arithmetic", "env.max_turns=0"], "env.max_turns: must be >= 1"),
    (["env.source=tool_arithmetic", "env.step_workers=0"], "env.step_workers: must be >= 1"),
    (["env.source=nomodule:Env"], "cannot import"),
])
def test_environment_config_errors_come_before_the_model_loads(tmp_path, monkeypatch, over, message):
    import rlmt.train.session as session

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(session, "load_model", no_model)
    cfg = load_config(None, _overrides(tmp_path, "grpo") + over)
    with pytest.raises(ConfigError, match=message):
        train(cfg)


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlmt.cli", "train", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_sigkill_mid_episode_batch_then_resume_equals_uninterrupted(tmp_path):
    args = _overrides(tmp_path, "grpo", "killed")[:-1] + ["optim.max_steps=4", "run.save_every=1",
                                                           "run.eval_before_after=false", "env.max_total_tokens=96",
                                                           "env.source=guess_number", "env.tools=[]"]
    killed = tmp_path / "killed"
    # SIGKILL in step 3's rollout, after some of its episodes have taken a turn
    patch = textwrap.dedent("""
        import os, signal, sys
        from pathlib import Path
        import rlmt.envs.guess as g
        real, n = g.GuessNumber.step, [0]
        def step(self, text):
            if (Path(OUT) / "checkpoints" / "step-2").exists():
                n[0] += 1
                if n[0] == 3:  # the third turn played in step 3
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(self, text)
        g.GuessNumber.step = step
    """).replace("OUT", repr(str(killed)))
    script = patch + f"\nfrom rlmt.cli import main\nsys.exit(main(['train', *{args + [f'run.output_dir={killed}']!r}]))\n"
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    done = sorted(int(c.name.split("-")[1]) for c in (killed / "checkpoints").glob("step-*"))
    assert done and 1 <= done[-1] < 4 and not (killed / "final").exists()
    p = _cli(args + [f"run.output_dir={killed}", "run.resume=true"])
    assert p.returncode == 0, p.stderr
    straight = tmp_path / "straight"
    p = _cli(args + [f"run.output_dir={straight}"])
    assert p.returncode == 0, p.stderr
    drop = ("time/", "rollout/seconds", "rollout/tokens_per_s")
    same = [[{k: v for k, v in r.items() if not k.startswith(drop)} for r in read_metrics(d)] for d in (killed, straight)]
    assert same[0] == same[1] and same[0][-1]["env/turns_mean"] > 1  # multi-turn episodes
    from safetensors.torch import load_file

    a, b = (load_file(d / "final" / "model.safetensors") for d in (killed, straight))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rlmt_eval_plays_episodes_and_batching_does_not_change_them(tmp_path):
    data = _data(tmp_path)
    outs = []
    for n in (1, 4):
        out = tmp_path / f"episodes-{n}.jsonl"
        p = subprocess.run([sys.executable, "-m", "rlmt.cli", "eval", "model.name=tiny-random", f"data.eval={data}",
                            "env.source=guess_number", "env.args={low: 1, high: 3}", "env.max_turns=3",
                            "eval.num_samples=2", "eval.max_new_tokens=6", f"rollout.batch_prompts={n}",
                            f"eval.output={out}", "run.progress=false"], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        metrics = json.loads(p.stdout[p.stdout.index("{"):])
        assert metrics["env"] == "guess_number" and metrics["prompts"] == 4 and "env/turns_mean" in metrics
        outs.append([json.loads(line) for line in out.read_text().splitlines()])
    assert len(outs[0]) == 8 and outs[0] == outs[1]  # keyed episodes: the same whatever the batching
    assert all(e["details"]["transcript"][-1]["role"] in ("assistant", "user") for e in outs[0])


def test_grape_scores_episodes_with_its_rubric(tmp_path):
    """GRAPE in the tool_arithmetic environment: the rubric (a math_answer verifier item and a judged item)
    scores each episode's final answer; the rubric report covers the run, and the evaluation uses the rubric."""
    import yaml

    rubric = tmp_path / "rubric.yaml"
    rubric.write_text(yaml.safe_dump({"scale": [0, 10], "categories": {"math": {"system_prompt": "", "items": [
        {"id": "answer", "criterion": "correct product", "weight": 3, "flow": "verifiable", "verifier": "math_answer"},
        {"id": "clear", "criterion": "clear", "weight": 1, "flow": "judged"}]}}}))
    rows = [{"prompt": f"What is {a} * {b}?", "answer": a * b, "category": "math"} for a, b in [(12, 34), (5, 6)]]
    data = tmp_path / "grape.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [
        "algorithm=grape", "model.name=tiny-random", f"data.train={data}", f"data.eval={data}",
        "env.source=tool_arithmetic", "env.tools=[calculator]", "env.max_turns=2", "env.max_total_tokens=48",
        f"grape.rubric={rubric}", "grape.critic={backend: local, model: tiny-random}", "grape.critic_mode=logprobs",
        "rollout.num_samples=2", "rollout.batch_prompts=2", "rollout.max_new_tokens=6", "optim.max_steps=2",
        "eval.num_samples=2", "eval.max_new_tokens=6", "run.eval_before_after=true", "run.progress=false",
        "data.max_prompt_tokens=512", f"run.output_dir={tmp_path / 'run'}"])
    run = train(cfg)
    last = read_metrics(run)[-1]
    assert all(k in last for k in ENV_KEYS) and any(k.startswith("rubric/") for k in last)
    report = json.loads((run / "rubric_report.json").read_text())
    scored = {it["item"]: it["scored"] for it in report["items"]}
    assert scored["math.answer"] == 2 * 2 * 2  # 2 steps x 2 rows x 2 episodes, each final answer verified
    after = json.loads((run / "eval-after.json").read_text())
    assert any(k.startswith("rubric/") for k in after) and "env/turns_mean" in after
    with pytest.raises(ConfigError, match="grape.revise"):
        train(load_config(None, ["algorithm=grape", "model.name=tiny-random",
                                 f"data.train={data}", "env.source=tool_arithmetic", "grape.revise=true",
                                 f"grape.rubric={rubric}", f"run.output_dir={tmp_path / 'r2'}"]))


@pytest.mark.parametrize("algorithm", ["reinforce", "ppo"])
def test_dense_methods_train_on_multi_turn_episodes(tmp_path, algorithm):
    """guess_number makes episodes of several turns whatever the tiny model writes: the dense path (each turn's
    reward on its last token) trains on them end to end."""
    rows = [{"prompt": f"Guess a number from 1 to 3 (game {i}).", "answer": i % 3 + 1} for i in range(4)]
    data = tmp_path / "guess.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [f"algorithm={algorithm}", "model.name=tiny-random", f"data.train={data}",
                             "env.source=guess_number", "env.args={low: 1, high: 3}", "env.max_turns=3",
                             "env.max_total_tokens=60", "rollout.num_samples=4", "rollout.batch_prompts=2",
                             "rollout.max_new_tokens=6", "optim.max_steps=2", "optim.batch_size=8",
                             f"run.output_dir={tmp_path / 'run'}", "run.progress=false"])
    rows = read_metrics(train(cfg))
    assert all(r["env/turns_mean"] > 1 and r["tokens"] > 0 for r in rows)
    assert all(abs(r["rollout/logprob_gap"]) < 1e-4 for r in rows)
    if algorithm == "ppo":  # the value head trains on every turn's tokens whatever the rewards
        assert all(r["grad_norm"] > 0 and r["value_loss"] > 0 for r in rows)


def test_rows_missing_what_the_environment_reads_fail_before_the_model_loads(tmp_path, monkeypatch):
    import rlmt.train.session as session
    from rlmt.data import DataError

    monkeypatch.setattr(session, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "What is 2 * 3?", "answer": 6}) + "\n"
                    + json.dumps({"prompt": "What is 4 * 5?"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2.*answer.*environment 'tool_arithmetic'"):
        over = [o for o in _overrides(tmp_path, "grpo") if not o.startswith(("data.train", "data.eval"))]
        train(load_config(None, over + [f"data.train={data}"]))
    debate = tmp_path / "debate.jsonl"
    debate.write_text(json.dumps({"prompt": "Is 7 prime?", "answers": ["yes"]}) + "\n")
    with pytest.raises(DataError, match=r"debate.jsonl:1.*answers.*two answers"):
        train(load_config(None, ["algorithm=grpo", "model.name=tiny-random", f"data.train={debate}",
                                 "env.source=debate", "env.args={judge: {backend: local}}", "rollout.num_samples=2",
                                 f"run.output_dir={tmp_path / 'd'}"]))
