"""An output directory that cannot be created or written is one error line naming ``run.output_dir``, before
any model loads (never a traceback from deep inside the run)."""

from __future__ import annotations

import json

import pytest

import rlmt.train.session as session
from rlmt.cli import main


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say {i}", "completion": str(i)}) + "\n" for i in range(4)))
    return path


@pytest.fixture
def no_model(monkeypatch):
    def refuse(cfg):
        raise AssertionError("the model loaded before the output directory was checked")
    monkeypatch.setattr(session, "prepare_model", refuse)


def _train(data, out) -> int:
    return main(["train", "algorithm=sft", "model.name=tiny-random", f"data.train={data}", "optim.max_steps=1",
                 f"run.output_dir={out}", "run.progress=false"])


def test_output_dir_under_a_file_cannot_be_created(tmp_path, data, no_model, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _train(data, blocker / "run") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith(f"error: run.output_dir={blocker / 'run'}: cannot create the directory")


def test_output_dir_that_is_a_file(tmp_path, data, no_model, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _train(data, blocker) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: run.output_dir={blocker}: ") and "not a directory" in err


def test_output_dir_that_cannot_be_written(data, no_model, capsys):
    """/proc/self exists and takes no new files (even for root, where a chmod would not stop a write)."""
    assert _train(data, "/proc/self") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run.output_dir=/proc/self: cannot write in the directory")
