"""run.trackers for real: a two-step SFT run logs to TensorBoard, W&B (offline) and MLflow (file store), and each
tracker's own files, read back, hold the steps' metrics as metrics.jsonl has them and the resolved config as
the run's parameters. Unknown names and missing packages are config errors before any model loads."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import yaml

from rlmt.cli import main
from rlmt.config import load_config
from rlmt.records import QuietRecorder, read_metrics
from rlmt.trackers import flat_params, tracker_names


def _data(path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"Say {i}", "completion": f"{i}"}) + "\n" for i in range(8)))
    return path


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "algorithm=sft", "model.name=tiny-random", f"data.train={data}", "optim.max_steps=2",
            "optim.batch_size=2", "run.progress=false", f"run.output_dir={out}", *extra]


def _leaves(d, prefix=""):
    """The config's leaves under dotted keys, computed here without rlmt (lists of mappings indexed)."""
    if isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        d = dict(enumerate(d))
    if isinstance(d, dict) and d:
        return {k: v for key, sub in d.items() for k, v in _leaves(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: d}


def _wandb_records(path: Path):
    """The protobuf records of a W&B run file (``run-<id>.wandb``): a 7-byte header (":W&B", magic, version),
    then LevelDB log blocks of 32 KiB, each record fragment behind a 7-byte header (crc32, length, type:
    1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


USER_SETTINGS = ("WANDB_PROJECT", "WANDB_NAME", "WANDB_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")


@pytest.fixture(autouse=True)
def _no_user_settings(monkeypatch):
    for name in USER_SETTINGS:  # the defaults under test give way to these
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    root = tmp_path_factory.mktemp("trackers")
    out = root / "run"
    args = _args(_data(root / "sft.jsonl"), out, "run.trackers=[tensorboard, wandb, mlflow]",
                 "run.tracker_args={wandb: {mode: offline}, mlflow: {experiment_name: tiny}}")
    with pytest.MonkeyPatch.context() as env:
        for name in USER_SETTINGS:
            env.delenv(name, raising=False)
        assert main(args) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    config = yaml.safe_load((out / "config.yaml").read_text())
    return out, rows, _leaves(config)


def test_mlflow_file_store_holds_the_metrics_and_the_config(tracked):
    from mlflow.tracking import MlflowClient

    out, rows, config = tracked
    client = MlflowClient((out / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("tiny")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    for key in ("loss", "grad_norm", "lr", "epoch", "tokens"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in history] == [(r["step"], r[key]) for r in rows], key
    params = run.data.params
    assert params == {k: v if isinstance(v, str) else json.dumps(v) for k, v in config.items()}
    assert params["optim.lr"] == str(config["optim.lr"]) and params["model.name"] == "tiny-random"


def test_wandb_offline_run_holds_the_metrics_and_the_config(tracked):
    out, rows, config = tracked
    (path,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(_wandb_records(path))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "rlmt" and run.display_name == "run"
    logged = {_key(item): json.loads(item.value_json) for item in run.config.update}
    assert {k: v for k, v in logged.items() if k != "_wandb"} == config
    history = [{_key(i): json.loads(i.value_json) for i in r.history.item} for r in records
               if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [1, 2]
    for h, row in zip(history, rows):
        numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        assert {k: h[k] for k in numbers} == numbers


def test_tensorboard_events_hold_the_metrics(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, rows, _ = tracked
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for key in ("loss", "grad_norm"):
        assert [(e.step, e.value) for e in events.Scalars(key)] == [
            (r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows]


def test_a_resumed_run_is_a_new_tracker_run_from_the_checkpoint(tmp_path):
    from mlflow.tracking import MlflowClient

    data, out = _data(tmp_path / "sft.jsonl"), tmp_path / "run"
    assert main(_args(data, out, "optim.max_steps=1", "run.trackers=[mlflow]")) == 0
    assert main(_args(data, out, "optim.max_steps=2", "run.trackers=[mlflow]", "run.resume=true")) == 0
    client = MlflowClient((out / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("rlmt").experiment_id], order_by=["start_time ASC"])
    assert [r.data.tags.get("rlmt.resumed_from_step") for r in runs] == [None, "1"]
    steps = [[m.step for m in client.get_metric_history(r.info.run_id, "loss")] for r in runs]
    assert steps == [[1], [2]]


def test_tensorboard_flag_is_an_alias():
    assert tracker_names(load_config(None, ["run.tensorboard=true"]).run) == ("tensorboard",)
    assert tracker_names(load_config(None, ["run.tensorboard=true", "run.trackers=[tensorboard]"]).run) == (
        "tensorboard",)
    assert tracker_names(load_config(None, ["run.trackers=[mlflow]", "run.tensorboard=true"]).run) == (
        "mlflow", "tensorboard")
    assert tracker_names(load_config(None, []).run) == ()


def test_flat_params():
    assert flat_params({"a": {"b": 1, "c": [1, 2], "d": {}}, "s": [{"x": "y"}], "e": None}) == {
        "a.b": 1, "a.c": [1, 2], "a.d": {}, "s.0.x": "y", "e": None}


@pytest.mark.parametrize("override, message", [
    ("run.trackers=[wandbb]", "run.trackers: 'wandbb' is not one of ['tensorboard', 'wandb', 'mlflow']; did you "
                              "mean 'wandb'?"),
    ("run.trackers=[mlflow, mlflow]", "run.trackers: 'mlflow' is listed twice"),
    ("run.trackers=mlflow", "run.trackers: expected list, got 'mlflow'"),
    ("run.tracker_args={mlfow: {}}", "run.tracker_args: 'mlfow' is not one of"),
    ("run.tracker_args={mlflow: {uri: x}}", "run.tracker_args.mlflow: unknown keys ['uri']; it takes tracking_uri"),
])
def test_bad_tracker_config_is_an_error_naming_the_key(tmp_path, capsys, override, message):
    assert main(_args(tmp_path / "none.jsonl", tmp_path / "run", override)) == 2
    assert message in capsys.readouterr().err


def _no_model_load(monkeypatch):
    import rlmt.train.session as session

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(session, "load_model", refuse)


def test_a_missing_tracker_package_names_the_extra_before_the_model_loads(tmp_path, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed: find_spec and import see nothing
    data = _data(tmp_path / "sft.jsonl")
    assert main(_args(data, tmp_path / "run", "run.trackers=[mlflow]")) == 2
    err = capsys.readouterr().err
    assert "run.trackers: the mlflow tracker needs the mlflow package: pip install 'rlmt[mlflow]'" in err
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert main(_args(data, tmp_path / "run", "run.tensorboard=true")) == 2
    assert "run.tensorboard=true: the tensorboard tracker needs the tensorboard package: pip install " \
           "'rlmt[tensorboard]'" in capsys.readouterr().err


def test_wandb_arguments_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    assert main(_args(_data(tmp_path / "sft.jsonl"), tmp_path / "run", "run.trackers=[wandb]",
                      "run.tracker_args={wandb: {mode: offline, projekt: x}}")) == 2
    assert "run.tracker_args.wandb: ['projekt'] are not arguments of wandb.init" in capsys.readouterr().err


def test_only_rank_0_opens_trackers(tmp_path):
    from rlmt.parallel import World
    from rlmt.train.session import recorder

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.trackers=[mlflow, tensorboard]"])
    assert isinstance(recorder(World(rank=1, size=2), tmp_path, cfg, None, 2), QuietRecorder)
    assert list(tmp_path.iterdir()) == []
