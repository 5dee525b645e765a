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
