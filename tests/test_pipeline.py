"""The stage pipeline: configs merged, substituted and validated before anything runs; SFT -> RM -> PPO from
one YAML; finished stages skipped on a re-run; a stage killed mid-way resumes to the same weights."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from rlmt.config import ConfigError, load_config
from rlmt.data import load_rows
from rlmt.records import read_metrics
from rlmt.tasks import addition_rows
from rlmt.train.pipeline import PIPELINE_FILE, STAGE_MARKER, plan_stages
from rlmt.train.runner import train

ROOT = Path(__file__).resolve().parents[1]


def _data(d: Path) -> dict[str, str]:
    rows = addition_rows(40, 0)
    files = {
        "sft": [{"prompt": r["prompt"], "completion": str(r["answer"])} for r in rows[:16]],
        "pref": [{"prompt": r["prompt"], "chosen": str(r["answer"]), "rejected": str(r["answer"] + 3)}
                 for r in rows[:16]],
        "pref_eval": [{"prompt": r["prompt"], "chosen": str(r["answer"]), "rejected": "no"} for r in rows[32:]],
        "prompts": rows[16:32],
    }
    out = {}
    for name, content in files.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in content))
        out[name] = str(d / f"{name}.jsonl")
    return out


def _pipeline(d: Path, out: Path) -> dict:
    f = _data(d)
    return {
        "algorithm": "pipeline",
        "model": {"name": "tiny-random"}, "runtime": {"threads": 1},
        "optim": {"lr": 1e-3, "batch_size": 4},
        "run": {"output_dir": str(out), "progress": False, "save_every": 1, "keep_checkpoints": 10},
        "stages": [
            {"name": "sft", "algorithm": "sft", "data": {"train": f["sft"]}, "optim": {"max_steps": 3}},
            {"name": "rm", "algorithm": "reward_model", "model": {"name": "${sft}"},
             "data": {"train": f["pref"], "eval": f["pref_eval"]}, "optim": {"max_steps": 5},
             "run": {"eval_before_after": True}},
            {"name": "ppo", "algorithm": "ppo", "model": {"name": "${sft}"}, "data": {"train": f["prompts"]},
             "reward": {"source": "reward_model", "args": {"path": "${rm}"}},
             "rollout": {"num_samples": 2, "batch_prompts": 2, "max_new_tokens": 6}, "optim": {"max_steps": 2}},
        ],
    }


def _cli(*args: str, script: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-c", script] if script else [sys.executable, "-m", "rlmt.cli", "train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    w = load_file(stage_dir / "final" / "model.safetensors")
    if (stage_dir / "final" / "reward_head.pt").exists():
        w.update({f"head.{k}": v for k, v in torch.load(stage_dir / "final" / "reward_head.pt").items()})
    return w


def _status(out: Path) -> list[tuple[str, str, bool]]:
    return [(s["name"], s["status"], s["skipped"]) for s in json.loads((out / PIPELINE_FILE).read_text())["stages"]]


# ------------------------------------------------------------------------------------- planning, in-process


def test_plan_merges_substitutes_and_places_stages(tmp_path):
    base = _pipeline(tmp_path, tmp_path / "out")
    base["data"] = {"chat": False}
    base["reward"] = {"args": {"batch_size": 4}}
    stages = plan_stages(load_config(None, base=base))
    assert [s.name for s in stages] == ["sft", "rm", "ppo"]
    sft, rm, ppo = (s.config for s in stages)
    assert [c.algorithm for c in (sft, rm, ppo)] == ["sft", "reward_model", "ppo"]
    assert [c.run.output_dir for c in (sft, rm, ppo)] == [str(tmp_path / "out" / n) for n in ("sft", "rm", "ppo")]
    assert all(c.run.resume == "true" for c in (sft, rm, ppo))
    assert rm.model.name == ppo.model.name == str(tmp_path / "out" / "sft" / "final")
    # deep merge: the shared reward.args gains the stage's path; shared keys reach every stage
    assert ppo.reward.args == {"batch_size": 4, "path": str(tmp_path / "out" / "rm" / "final")}
    assert not rm.data.chat and sft.optim.lr == 1e-3 and sft.optim.max_steps == 3 and rm.optim.max_steps == 5
    assert sft.runtime.threads == 1 and not sft.stages


def _bad(tmp_path, edit) -> dict:
    base = _pipeline(tmp_path, tmp_path / "out")
    edit(base)
    return base


BAD = {
    "typo in the last stage": (lambda b: b["stages"][2]["optim"].update(lrr=1), r"stages\[2\]\.optim\.lrr"),
    "bad value": (lambda b: b["stages"][2]["optim"].update(lr=-1), r"stages\[2\]\.optim\.lr: must be > 0"),
    "cross-field": (lambda b: b["stages"][2].update(algorithm="grpo", rollout={"num_samples": 1}),
                    r"stages\[2\]\.rollout\.num_samples"),
    "unknown ref": (lambda b: b["stages"][1]["model"].update(name="${sfft}"),
                    r"stages\[1\]\.model\.name: '\$\{sfft\}' names no stage"),
    "forward ref": (lambda b: b["stages"][1]["model"].update(name="${ppo}"),
                    r"stages\[1\]\.model\.name: '\$\{ppo\}' names a later stage"),
    "duplicate name": (lambda b: b["stages"][2].update(name="rm"), r"stages\[2\]\.name"),
    "no algorithm": (lambda b: b["stages"][0].pop("algorithm"), r"stages\[0\]\.algorithm"),
    "nested pipeline": (lambda b: b["stages"][0].update(algorithm="pipeline"), r"stages\[0\]\.algorithm"),
    "own output dir": (lambda b: b["stages"][1].update(run={"output_dir": "x"}), r"stages\[1\]\.run\.output_dir"),
    "ref outside a stage": (lambda b: b["model"].update(name="${sft}"), r"model\.name: .* inside a stage"),
    "unknown reward source": (lambda b: b["stages"][2].update(reward={"source": "reward_modle"}),
                              r"stages\[2\]\.reward\.source: unknown reward source 'reward_modle'; did you mean"),
    "bad reward arg": (lambda b: b["stages"][2]["reward"]["args"].update(pathh="x"),
                       r"stages\[2\]\.reward\.args\.pathh: not an argument"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_stage_config_fails_before_any_stage_runs(tmp_path, case):
    edit, match = BAD[case]
    with pytest.raises(ConfigError, match=match):
        train(load_config(None, base=_bad(tmp_path, edit)))
    assert not (tmp_path / "out").exists()


def test_stages_belong_to_pipelines():
    with pytest.raises(ConfigError, match="stages: only algorithm pipeline"):
        load_config(None, ["algorithm=sft", "stages=[{name: a, algorithm: sft}]"])
    with pytest.raises(ConfigError, match="stages: algorithm pipeline needs"):
        load_config(None, ["algorithm=pipeline"])


def test_example_pipeline_plans_and_its_data_validates(monkeypatch):
    monkeypatch.chdir(ROOT)
    stages = plan_stages(load_config(ROOT / "examples" / "rlhf_pipeline.yaml"))
    assert [(s.name, s.config.algorithm) for s in stages] == [("sft", "sft"), ("rm", "reward_model"), ("ppo", "ppo")]
    assert stages[2].config.reward.args["path"] == str(Path("runs/rlhf/rm/final"))
    kinds = {"sft": "sft", "reward_model": "preference", "ppo": "prompt"}
    for s in stages:
        for path in (s.config.data.train, s.config.data.eval):
            if path:
                assert load_rows(path, kinds[s.config.algorithm]).rows
    for name in ("addition-pref-train.jsonl", "addition-pref-heldout.jsonl"):
        assert (ROOT / "examples" / "data" / name).stat().st_size < 100_000


# ------------------------------------------------------------------------------------ running, subprocesses


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The whole pipeline, uninterrupted, through the CLI from one YAML file."""
    d = tmp_path_factory.mktemp("pipeline")
    config = d / "pipeline.yaml"
    config.write_text(yaml.safe_dump(_pipeline(d, d / "straight")))
    p = _cli(str(config))
    assert p.returncode == 0, p.stderr[-3000:]
    return config, d / "straight"


def test_pipeline_runs_every_stage(straight):
    _, out = straight
    assert _status(out) == [("sft", "done", False), ("rm", "done", False), ("ppo", "done", False)]
    for name in ("sft", "rm", "ppo"):
        assert json.loads((out / name / STAGE_MARKER).read_text())["final"] == str(out / name / "final")
    assert [r["step"] for r in read_metrics(out / "sft")] == [1, 2, 3]
    assert [r["step"] for r in read_metrics(out / "rm")] == [1, 2, 3, 4, 5]
    assert (out / "rm" / "final" / "reward_model.json").exists() and (out / "rm" / "eval-after.json").exists()
    ppo = read_metrics(out / "ppo")
    assert [r["step"] for r in ppo] == [1, 2] and all(r["reward/unscored"] == 0 for r in ppo)
    resolved = yaml.safe_load((out / "ppo" / "config.yaml").read_text())
    assert resolved["model"]["name"] == str(out / "sft" / "final")
    assert resolved["reward"]["args"]["path"] == str(out / "rm" / "final")


def test_rerun_skips_finished_stages(straight, capsys):
    config, out = straight
    stamp = {n: ((out / n / "final").stat().st_mtime_ns, (out / n / "metrics.jsonl").read_text())
             for n in ("sft", "rm", "ppo")}
    train(load_config(config))
    assert _status(out) == [("sft", "done", True), ("rm", "done", True), ("ppo", "done", True)]
    assert stamp == {n: ((out / n / "final").stat().st_mtime_ns, (out / n / "metrics.jsonl").read_text())
                     for n in ("sft", "rm", "ppo")}
    assert capsys.readouterr().out.count("already done") == 3
    # a finished stage whose config changed is not silently reused
    with pytest.raises(ConfigError, match="stage 'sft' finished with a different config"):
        train(load_config(config, ["optim.lr=0.5"]))


def test_killed_stage_resumes_to_the_same_weights(straight, tmp_path):
    config, out = straight
    killed = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        import rlmt.train.session as offline  # where the loops save checkpoints
        real = offline.save_checkpoint
        def save(run_dir, step, *a, **k):
            path = real(run_dir, step, *a, **k)
            if Path(run_dir).name == "rm" and step == 3:  # the RM stage, mid-way: step-3 is written, 4-5 are not
                os.kill(os.getpid(), signal.SIGKILL)
            return path
        offline.save_checkpoint = save
        from rlmt.cli import main
        sys.exit(main(["train", {str(config)!r}, "run.output_dir={killed}"]))
    """)
    p = _cli(script=script)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert _status(killed) == [("sft", "done", False), ("rm", "running", False), ("ppo", "pending", False)]
    assert (killed / "sft" / STAGE_MARKER).exists() and not (killed / "rm" / STAGE_MARKER).exists()
    assert (killed / "rm" / "checkpoints" / "step-3").exists() and not (killed / "rm" / "final").exists()

    p = _cli(str(config), f"run.output_dir={killed}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert _status(killed) == [("sft", "done", True), ("rm", "done", False), ("ppo", "done", False)]
    for name in ("rm", "ppo"):
        a, b = _weights(out / name), _weights(killed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    drop = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert drop(read_metrics(killed / "rm")) == drop(read_metrics(out / "rm"))
