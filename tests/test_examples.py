"""Every shipped example config and data file is valid (the README points newcomers at them)."""

from pathlib import Path

import pytest

from rlmt.config import load_config
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
