"""Every shipped example config and data file is valid (the README points newcomers at them)."""

import json
from pathlib import Path
from typing import get_args, get_type_hints

import pytest
import yaml

from rlmt.config import Config, load_config
from rlmt.data import load_rows

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_config_loads_and_its_data_validates(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(path)
    kind = {"sft": "sft", "process_reward_model": "steps"}.get(cfg.algorithm, "prompt")
    for data in (cfg.data.train, cfg.data.eval):
        if data:
            rows = load_rows(data, kind if data == cfg.data.train or kind == "steps" else "prompt").rows
            assert rows and (kind == "sft" or all("answer" in r.data for r in rows))


def test_grape_example_config_rubric_and_prompts_agree(monkeypatch, tmp_path):
    import importlib.util

    from rlmt.grape.rubric import load_rubric

    monkeypatch.chdir(ROOT)
    cfg = load_config("examples/grape/grape.yaml")
    rubric = load_rubric(cfg.grape.rubric)
    assert len(rubric.categories) >= 3
    for data in (cfg.data.train, cfg.data.eval):
        rows = load_rows(data, "prompt").rows
        assert {r.data["category"] for r in rows} == set(rubric.categories)
        assert all("answer" in r.data for r in rows if r.data["category"] == "math")
    spec = importlib.util.spec_from_file_location("make_data", ROOT / "examples/grape/make_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(tmp_path)  # the shipped files are exactly what the script writes
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / name).read_text() == (ROOT / "examples/grape" / name).read_text()


# --- every example runs: one step of each on the tiny model -------------------------------------------------

RUN_EXAMPLES = sorted((ROOT / "examples").glob("*.yaml")) + [ROOT / "examples/grape/grape.yaml"]
METHODS = set(get_args(get_type_hints(Config)["algorithm"]))


def _shrink(algorithm: str, prefix: str = "") -> list[str]:
    """Overrides that cut a method's run to one step of tiny batches (a pipeline stage's under ``prefix``)."""
    keys = {"eval.max_prompts": 2, "eval.num_samples": 1, "eval.max_new_tokens": 4,
            "rollout.max_new_tokens": 4, "rollout.batch_prompts": 2, "rollout.num_samples": 2,
            "data.max_prompt_tokens": 768}  # the tiny model's tokenizer takes one token per byte
    if algorithm == "rejection_sampling":
        keys |= {"rejection.rounds": 1, "rejection.prompts_per_round": 2}
    elif algorithm != "eval":
        keys |= {"optim.max_steps": 1}
    if algorithm == "trpo":
        keys |= {"trpo.cg_iters": 2, "trpo.backtrack_steps": 2}
    if algorithm == "grape":
        keys |= {"grape.critic.model": "tiny-random"}
    return [f"{prefix}{k}={v}" for k, v in keys.items()]


def _overrides(raw: dict, out: Path) -> list[str]:
    over = ["model.name=tiny-random", f"run.output_dir={out}", "run.progress=false",
            *_shrink(raw.get("algorithm", "eval"))]
    if (raw.get("env") or {}).get("source") == "debate":  # sides come in pairs; the judge is tiny too
        over += ["env.args={rounds: 1, judge: {backend: local, model: tiny-random}}", "eval.num_samples=2"]
    for i, stage in enumerate(raw.get("stages", [])):
        over += _shrink(stage["algorithm"], f"stages.{i}.")
        if not str(stage.get("model", {}).get("name", "")).startswith("${"):  # "${sft}" keeps the earlier stage's
            over.append(f"stages.{i}.model.name=tiny-random")
    return over


def _check_run(run_dir: Path, cfg) -> None:
    assert (run_dir / "final" / "config.json").exists()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"step"' in line]
    assert steps and steps[-1] == 1
    if cfg.run.eval_before_after and cfg.data.eval:
        assert (run_dir / "eval-before.json").exists() and (run_dir / "eval-after.json").exists()


@pytest.mark.parametrize("path", RUN_EXAMPLES, ids=lambda p: str(p.relative_to(ROOT / "examples")))
def test_example_runs_one_step_on_the_tiny_model(path, tmp_path, monkeypatch, capsys):
    from rlmt.cli import main

    monkeypatch.chdir(ROOT)
    raw = yaml.safe_load(path.read_text())
    out = tmp_path / "run"
    over = _overrides(raw, out)
    if "algorithm" not in raw:  # a config for `rlmt eval`
        assert main(["eval", str(path), *over, f"eval.output={tmp_path / 'samples.jsonl'}"]) == 0
        text = capsys.readouterr().out
        metrics = json.JSONDecoder().raw_decode(text[text.index("{"):])[0]
        assert 0.0 <= metrics["pass@1"] <= 1.0
        assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 2  # 2 prompts x 1 sample
        return
    assert main(["train", str(path), *over]) == 0, capsys.readouterr().err[-2000:]
    cfg = load_config(path, over)
    if cfg.algorithm != "pipeline":
        _check_run(out, cfg)
        return
    from rlmt.train.pipeline import plan_stages

    status = json.loads((out / "pipeline.json").read_text())["stages"]
    assert [(s["name"], s["status"]) for s in status] == [(s["name"], "done") for s in raw["stages"]]
    for stage in plan_stages(cfg):
        _check_run(stage.dir, stage.config)


def test_every_method_has_an_example():
    shown = {yaml.safe_load(p.read_text()).get("algorithm") for p in RUN_EXAMPLES}
    staged = {s["algorithm"] for p in RUN_EXAMPLES for s in yaml.safe_load(p.read_text()).get("stages", [])}
    assert METHODS - shown == set(), "methods without an example config of their own"
    assert {"sft", "reward_model", "ppo"} <= staged  # the RLHF ladder as one pipeline
