"""Models and data as people name them, never touching the network: a hub model id read from a local HF cache,
a hub dataset from a local datasets cache (offline), ``save_to_disk`` directories, CSV cells kept as written,
``data.columns`` with errors that name the source column; one-line errors for what cannot be had; and the
checks that need no model failing before any model loads."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlmt.config import ConfigError, load_config
from rlmt.data import DataError, SourceOptions, check_fields, load_rows
from rlmt.models import ModelError, load_model, tiny_random_model

REV = "0123456789abcdef0123456789abcdef01234567"  # a snapshot's commit hash in the cache layout


def hub_cache_model(hub: Path, repo: str, seed: int = 3):
    """Write a tiny random model into ``hub`` as ``huggingface_hub`` caches a download of ``repo``:
    ``models--org--name/snapshots/<rev>/`` and ``refs/main`` naming that revision."""
    model, tok = tiny_random_model(seed=seed)
    root = hub / ("models--" + repo.replace("/", "--"))
    model.save_pretrained(root / "snapshots" / REV)
    tok.save_pretrained(root / "snapshots" / REV)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(REV)
    return model


def datasets_cache_dataset(cache: Path, repo: str, subset: str, splits: dict[str, list[dict]], work: Path) -> None:
    """Write ``splits`` into the datasets cache ``cache`` as ``load_dataset(repo, subset)`` leaves a hub dataset
    there (``org___name/<subset>/<version>/<hash>/``), which an offline ``load_dataset`` reads back."""
    from datasets.packaged_modules.json.json import Json

    files = {}
    for split, rows in splits.items():
        files[split] = str(work / f"{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    name = repo.split("/")[1]
    builder = Json(dataset_name=name, config_name=subset, data_files=files, cache_dir=str(work / "build"))
    builder.download_and_prepare()
    target = cache / repo.replace("/", "___") / subset / "0.0.0" / REV
    target.parent.mkdir(parents=True)
    shutil.copytree(builder.cache_dir, target)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline HF hub cache in tmp_path, as HF_HUB_CACHE and HF_HUB_OFFLINE=1 would set it."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch, hub):
    """An offline datasets cache holding acme/toy (subset main: train and test splits)."""
    import datasets

    cache = tmp_path / "datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    work = tmp_path / "work"
    work.mkdir()
    datasets_cache_dataset(cache, "acme/toy", "main", {
        "train": [{"question": "What is 2 + 2?", "solution": "4"}, {"question": "What is 3 + 4?", "solution": "007"}],
        "test": [{"question": "What is 5 + 5?", "solution": "10"}, {"question": " ", "solution": "1"}],
    }, work)
    return cache


def one_line(text: str) -> bool:
    return "\n" not in text.strip() and "Traceback" not in text


# ------------------------------------------------------------------------------------------ hub models


def test_hub_model_id_loads_from_the_hf_cache(hub):
    saved = hub_cache_model(hub, "acme/tiny")
    lm = load_model("acme/tiny")
    assert lm.name == "acme/tiny" and Path(lm.path) == hub / "models--acme--tiny" / "snapshots" / REV
    state = lm.model.state_dict()
    assert state.keys() == saved.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in saved.state_dict().items())
    assert lm.tokenizer.pad_token is not None


def test_missing_hub_model_offline_is_one_line_naming_the_id(hub, capsys):
    with pytest.raises(ModelError) as e:
        load_model("acme/missing")
    assert "'acme/missing'" in str(e.value) and "HF_HUB_OFFLINE" in str(e.value) and one_line(str(e.value))
    from rlmt.cli import main

    assert main(["generate", "model.name=acme/missing", "model.device=cpu", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model 'acme/missing':") and one_line(err)


def test_cached_hub_model_without_weights_is_one_line(hub):
    model, tok = tiny_random_model()
    snapshot = hub / "models--acme--half" / "snapshots" / REV
    model.config.save_pretrained(snapshot)
    tok.save_pretrained(snapshot)
    (hub / "models--acme--half" / "refs").mkdir()
    (hub / "models--acme--half" / "refs" / "main").write_text(REV)
    with pytest.raises(ModelError) as e:
        load_model("acme/half")
    assert str(e.value).startswith("model 'acme/half': found in the Hugging Face cache or hub, but could not be "
                                   "loaded (") and "model.safetensors" in str(e.value) and one_line(str(e.value))


def test_unreachable_hub_is_one_line_naming_the_id(monkeypatch):
    """Online, but the hub cannot be reached: transformers' two-line OSError becomes one line with the id."""
    import transformers.utils
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them "
                      "in the cached files.\nCheck your internet connection or see how to run the library in "
                      "offline mode at 'https://huggingface.co/docs/transformers/installation#offline-mode'.")

    monkeypatch.setattr(transformers.utils, "cached_file", unreachable)
    with pytest.raises(ModelError) as e:
        load_model("acme/elsewhere")
    text = str(e.value)
    assert text.startswith("model 'acme/elsewhere': not a local directory") and "couldn't connect" in text
    assert one_line(text)


def test_names_that_are_not_hub_ids_keep_the_local_error(tmp_path, hub):
    for name in (str(tmp_path / "nope"), "nope", "runs/a/final"):
        with pytest.raises(ModelError) as e:
            load_model(name)
        assert one_line(str(e.value)) and repr(name) in str(e.value)
    assert "no such directory" in str(pytest.raises(ModelError, load_model, str(tmp_path / "nope")).value)
    (tmp_path / "empty").mkdir()
    assert "no config.json" in str(pytest.raises(ModelError, load_model, str(tmp_path / "empty")).value)


def test_the_command_line_leaves_the_hub_settings_to_the_user(monkeypatch):
    from rlmt import cli

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    cli._quiet_transformers()
    assert "HF_HUB_OFFLINE" not in os.environ and "HF_DATASETS_OFFLINE" not in os.environ


# ------------------------------------------------------------------------------------------ CSV


def test_csv_cells_stay_as_written_and_lines_count_the_file(tmp_path):
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "answer", "note"])
        w.writerow(["What is 7?", "007", "a, b"])
        w.writerow(["Two\nlines", "1e3", ""])  # a quoted cell over lines 3-4
        w.writerow(["42", "3.50", "True"])  # line 5
        w.writerow(["[1, 2]", "-0", "null"])  # a prompt that is JSON but no chat stays text
    report = load_rows(str(path), "prompt")
    assert [r.line for r in report.rows] == [2, 3, 5, 6]
    assert [r.data for r in report.rows] == [
        {"prompt": "What is 7?", "answer": "007", "note": "a, b"},
        {"prompt": "Two\nlines", "answer": "1e3", "note": ""},
        {"prompt": "42", "answer": "3.50", "note": "True"},
        {"prompt": "[1, 2]", "answer": "-0", "note": "null"},
    ]


def test_csv_structured_fields_are_decoded_from_json_cells(tmp_path):
    path = tmp_path / "steps.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "steps", "labels", "reward"])
        w.writerow(["q", json.dumps(["a = 1", "b = 2"]), "[1, 0]", "0.5"])
        w.writerow(["q2", json.dumps(["c"]), "[true]", "n/a"])
    rows = [r.data for r in load_rows(str(path), "steps").rows]
    assert rows[0] == {"prompt": "q", "steps": ["a = 1", "b = 2"], "labels": [1, 0], "reward": 0.5}
    assert rows[1]["labels"] == [True] and rows[1]["reward"] == "n/a"
    chat = tmp_path / "chat.csv"
    chat.write_text('prompt\n"[{""role"": ""user"", ""content"": ""hi""}]"\n')
    assert load_rows(str(chat), "prompt").rows[0].data["prompt"] == [{"role": "user", "content": "hi"}]


def test_csv_problems_name_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,answer\nok,1\nthree,cells,here\nalso ok,2\n,3\n")
    with pytest.raises(DataError) as e:
        load_rows(str(path), "prompt")
    assert (e.value.line, str(e.value)) == (3, f"{path}:3: malformed CSV (3 cells for the header's 2 columns)")
    report = load_rows(str(path), "prompt", on_invalid="skip")
    assert [r.line for r in report.rows] == [2, 4]
    assert report.skipped == {"malformed CSV": 1, "prompt: must not be empty": 1}
    twice = tmp_path / "twice.csv"
    twice.write_text("prompt,prompt\na,b\n")
    assert "more than once" in str(pytest.raises(DataError, load_rows, str(twice), "prompt").value)


# ------------------------------------------------------------------------------------------ data.columns


def test_columns_rename_and_errors_name_the_source_column(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"question": "What is 2 + 2?", "solution": 4, "id": 1}, {"question": "", "solution": 5, "id": 2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    columns = SourceOptions(columns={"prompt": "question", "answer": "solution"})
    report = load_rows(str(path), "prompt", source=columns, on_invalid="skip")
    assert [r.data for r in report.rows] == [{"prompt": "What is 2 + 2?", "answer": 4, "id": 1}]
    with pytest.raises(DataError) as e:
        load_rows(str(path), "prompt", source=columns)
    assert (e.value.line, e.value.field) == (2, "prompt")
    assert str(e.value) == f"{path}:2: field 'prompt' (column 'question'): must not be empty"
    # a field a reward source reads, mapped from a column the data lacks
    lacking = SourceOptions(columns={"prompt": "question", "answer": "gold"})
    report = load_rows(str(path), "prompt", source=lacking, on_invalid="skip")
    with pytest.raises(DataError) as e:
        check_fields(report.rows, {"answer": lambda v: None}, "reward source 'math_answer'")
    assert str(e.value) == (f"{path}:1: field 'answer' (column 'gold'): missing (reward source 'math_answer' "
                            "reads it)")


def test_config_keys_of_data_sources():
    cfg = load_config(None, ["data.train=acme/toy", "data.subset=main", "data.columns={prompt: question}"])
    assert SourceOptions.of(cfg.data) == SourceOptions("train", "main", {"prompt": "question"}, "data.split")
    assert SourceOptions.of(cfg.data, "eval") == SourceOptions("test", "main", {"prompt": "question"},
                                                               "data.eval_split")
    with pytest.raises(ConfigError, match=r"data\.columns\.prompt: a source column name"):
        load_config(None, ["data.columns={prompt: 3}"])
    with pytest.raises(ConfigError, match=r"data\.columns"):
        load_config(None, ["data.columns=question"])


# ------------------------------------------------------------------------------------------ datasets


def test_save_to_disk_directories(tmp_path):
    import datasets

    one = tmp_path / "one"
    datasets.Dataset.from_dict({"q": ["a", "", "c"], "a": ["007", "1", "2"]}).save_to_disk(str(one))
    with pytest.raises(DataError) as e:
        load_rows(str(one), "prompt", source=SourceOptions(columns={"prompt": "q"}))
    assert str(e.value) == f"{one}, row 2: field 'prompt' (column 'q'): must not be empty"
    report = load_rows(str(one), "prompt", source=SourceOptions(columns={"prompt": "q"}), on_invalid="skip")
    assert [(r.line, r.data) for r in report.rows] == [(1, {"prompt": "a", "a": "007"}), (3, {"prompt": "c", "a": "2"})]

    both = tmp_path / "both"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["t1", "t2"]}),
                          "test": datasets.Dataset.from_dict({"prompt": ["e1"]})}).save_to_disk(str(both))
    cfg = load_config(None, [f"data.train={both}", f"data.eval={both}"])
    train = load_rows(str(both), "prompt", source=SourceOptions.of(cfg.data))
    assert [r.data["prompt"] for r in train.rows] == ["t1", "t2"]
    held = load_rows(str(both), "prompt", source=SourceOptions.of(cfg.data, "eval"))
    assert [r.data["prompt"] for r in held.rows] == ["e1"] and held.file == f"{both}, split test"
    cfg = load_config(None, [f"data.eval={both}", "data.eval_split=validation"])
    with pytest.raises(DataError) as e:
        load_rows(str(both), "prompt", source=SourceOptions.of(cfg.data, "eval"))
    assert str(e.value) == f"{both}: data.eval_split='validation': no such split; it has ['test', 'train']"
    (tmp_path / "plain").mkdir()
    assert "not a data file" in str(pytest.raises(DataError, load_rows, str(tmp_path / "plain"), "prompt").value)


def test_hub_dataset_from_the_local_datasets_cache(datasets_cache):
    options = SourceOptions("test", "main", {"prompt": "question", "answer": "solution"})
    with pytest.raises(DataError) as e:
        load_rows("acme/toy", "prompt", source=options)
    assert str(e.value) == ("acme/toy, subset main, split test, row 2: field 'prompt' (column 'question'): "
                            "must not be empty")
    train = load_rows("acme/toy", "prompt", source=SourceOptions("train", "main", options.columns))
    assert [r.data for r in train.rows] == [{"prompt": "What is 2 + 2?", "answer": "4"},
                                           {"prompt": "What is 3 + 4?", "answer": "007"}]
    assert [r.line for r in train.rows] == [1, 2]
    with pytest.raises(DataError) as e:
        load_rows("acme/toy", "prompt", source=SourceOptions("validation", "main", options.columns))
    assert str(e.value).startswith("acme/toy: data.split='validation': Unknown split") and one_line(str(e.value))
    with pytest.raises(DataError) as e:
        load_rows("acme/toy", "prompt", source=SourceOptions("test", "other", options.columns))
    assert str(e.value).startswith("acme/toy: data.subset='other': ") and one_line(str(e.value))


def test_missing_hub_dataset_offline_is_one_line_naming_the_id(datasets_cache):
    with pytest.raises(DataError) as e:
        load_rows("acme/missing", "prompt")
    text = str(e.value)
    assert text.startswith("acme/missing: not a local file or directory, and the hub dataset could not be loaded")
    assert "offline" in text and one_line(text)
    # a path-like name that does not exist is a missing file, never a hub lookup
    with pytest.raises(DataError, match="file does not exist"):
        load_rows("data/train.jsonl", "prompt")


# ------------------------------------------------------------------------------------------ no model needed


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: the checks under test must stop the run first."""
    from rlmt.train import session

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before a check that needs none")

    monkeypatch.setattr(session, "load_model", refuse)


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _with_checkpoint(run_dir: Path) -> str:
    (run_dir / "checkpoints" / "step-2").mkdir(parents=True)
    return str(run_dir)


@pytest.mark.parametrize("algorithm", ["sft", "grpo"])
def test_checks_that_need_no_model_fail_before_it_loads(tmp_path, no_model, algorithm):
    from rlmt.train.runner import train
    from rlmt.train.session import RunError

    row = {"prompt": "What is 1 + 1?", "completion": "2", "answer": 2}
    good = _write(tmp_path / "good.jsonl", [row] * 4)
    bad = _write(tmp_path / "bad.jsonl", [row, {**row, "prompt": ""}])
    base = [f"algorithm={algorithm}", "model.name=tiny-random", "run.progress=false", "optim.max_steps=1"]
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'prompt'"):
        train(load_config(None, base + [f"data.train={bad}", f"run.output_dir={tmp_path / 'a'}"]))
    with pytest.raises(RunError, match="already holds checkpoints"):
        train(load_config(None, base + [f"data.train={good}", f"run.output_dir={_with_checkpoint(tmp_path / 'b')}"]))
    if algorithm == "grpo":
        with pytest.raises(ConfigError, match="unknown reward source 'math_anwser'; did you mean 'math_answer'"):
            train(load_config(None, base + [f"data.train={good}", f"run.output_dir={tmp_path / 'c'}",
                                            "reward.source=math_anwser"]))


def test_generate_reads_its_prompts_before_the_model(tmp_path, no_model, capsys):
    from rlmt.cli import main

    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"prompt": 3}])
    assert main(["generate", "model.name=tiny-random", f"data.eval={bad}"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {bad}:2: field 'prompt': must be a string, got int"


# ------------------------------------------------------------------------------------------ the command line


def _rlmt(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    return subprocess.run([sys.executable, "-m", "rlmt.cli", *args], env={**base, "TOKENIZERS_PARALLELISM": "false",
                          **env}, capture_output=True, text=True, timeout=180)


def test_cli_reads_a_hub_model_and_dataset_from_the_users_offline_cache(tmp_path):
    home = tmp_path / "hf"
    hub_cache_model(home / "hub", "acme/tiny")
    work = tmp_path / "work"
    work.mkdir()
    datasets_cache_dataset(home / "datasets", "acme/toy", "main", {
        "train": [{"question": "train only", "solution": "1"}],
        "test": [{"question": "What is 5 + 5?", "solution": "10"}, {"question": "What is 1 + 2?", "solution": "3"}],
    }, work)
    out = tmp_path / "out.jsonl"
    p = _rlmt(["generate", "model.name=acme/tiny", "model.device=cpu", "data.eval=acme/toy", "data.subset=main",
               "data.columns={prompt: question}", "rollout.num_samples=1", "rollout.max_new_tokens=2",
               "run.progress=false", "--output", str(out)], {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == ["What is 5 + 5?", "What is 1 + 2?"]


def test_cli_local_model_and_data_never_ask_the_hub(tmp_path):
    """No HF_HUB_OFFLINE, and a hub endpoint that refuses every connection (a closed loopback port): a local
    model directory and a local CSV are read with no request, or the hub client's retries would show."""
    model, tok = tiny_random_model(seed=1)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\nWhat is 2 + 2?\n")
    t0 = time.perf_counter()
    p = _rlmt(["generate", f"model.name={tmp_path / 'model'}", "model.device=cpu", f"data.eval={prompts}",
               "rollout.num_samples=1", "rollout.max_new_tokens=2", "run.progress=false"],
              {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.splitlines()[0])["prompt"] == "What is 2 + 2?"
    assert "Retrying" not in p.stderr and "127.0.0.1:9" not in p.stderr and time.perf_counter() - t0 < 60
