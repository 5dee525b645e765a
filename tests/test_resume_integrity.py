"""Resume from what is really there: a truncated or corrupt newest checkpoint (model, optimizer, state, RNG,
or its manifest) is detected and the run falls back to the previous complete one with one warning, still
bit-exact; a resume whose training-relevant config changed is refused with the list of changes unless
``run.allow_config_change=true``, and then the new values are the ones in effect and in ``config.yaml``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from rlmt.checkpoint import MANIFEST, save_checkpoint, verify_checkpoint, write_manifest
from rlmt.cli import main
from rlmt.config import training_changes
from rlmt.records import read_metrics


def _data(path: Path, n: int = 16) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"Say {i}", "completion": f"{i} {i * 7}"}) + "\n" for i in range(n)))
    return path


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "algorithm=sft", "model.name=tiny-random", f"data.train={data}", "optim.batch_size=2",
            "optim.lr=1e-3", "run.save_every=1", "run.keep_checkpoints=3", "run.progress=false",
            f"run.output_dir={out}", *extra]


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A six-step SFT run with checkpoints step-4, step-5 and step-6."""
    root = tmp_path_factory.mktemp("finished")
    data, out = _data(root / "sft.jsonl"), root / "run"
    assert main(_args(data, out, "optim.max_steps=6")) == 0
    return data, out


def _copy(finished, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished[1], out)
    shutil.rmtree(out / "final")
    return out


# ------------------------------------------------------------------------------------------ the manifest


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    import hashlib

    from rlmt.models import tiny_random_model

    model, tok = tiny_random_model()
    opt = torch.optim.AdamW(model.parameters())
    path = save_checkpoint(tmp_path, 1, model, opt, None, {"x": 1}, record={"config": {"a": 1}}, tokenizer=tok)
    listed = json.loads((path / MANIFEST).read_text())["files"]
    on_disk = {f.name for f in path.iterdir() if f.name != MANIFEST}
    model_dir = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja"}
    assert set(listed) == on_disk == model_dir | {"optimizer.pt", "rng.pt", "state.json", "run.json"}
    for name, entry in listed.items():
        data = (path / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert verify_checkpoint(path) is None


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


CORRUPTIONS = {
    "model.safetensors truncated": ("model.safetensors", _truncate, "model.safetensors is"),
    "model.safetensors bit flipped": ("model.safetensors", _flip, "model.safetensors does not match its sha256"),
    "optimizer.pt bit flipped": ("optimizer.pt", _flip, "optimizer.pt does not match its sha256"),
    "state.json cut": ("state.json", lambda f: f.write_text('{"step": 6'), "state.json is"),
    "rng.pt missing": ("rng.pt", lambda f: f.unlink(), "rng.pt is missing"),
    "manifest missing": (MANIFEST, lambda f: f.unlink(), "no manifest.json"),
}


@pytest.mark.parametrize("what", sorted(CORRUPTIONS))
def test_corrupt_newest_checkpoint_falls_back_with_one_warning_and_resumes_exactly(finished, tmp_path, capsys, what):
    name, corrupt, problem = CORRUPTIONS[what]
    out = _copy(finished, tmp_path)
    corrupt(out / "checkpoints" / "step-6" / name)
    capsys.readouterr()
    assert main(_args(finished[0], out, "optim.max_steps=6", "run.resume=true")) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "resuming from step-5" in warnings[0] and f"step-6 is incomplete or corrupt ({problem}" in warnings[0]
    assert "set aside as step-6.corrupt" in warnings[0]
    assert (out / "checkpoints" / "step-6.corrupt").is_dir()
    assert verify_checkpoint(out / "checkpoints" / "step-6") is None  # written again by the resumed run
    assert _comparable(read_metrics(out)) == _comparable(read_metrics(finished[1]))
    a, b = _weights(finished[1]), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_complete_checkpoint_is_an_error_naming_each(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    for step in (4, 5, 6):
        _truncate(out / "checkpoints" / f"step-{step}" / "model.safetensors")
    assert main(_args(finished[0], out, "optim.max_steps=6", "run.resume=true")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run.resume=true: no complete checkpoint in")
    assert all(f"step-{s}: model.safetensors is" in err for s in (4, 5, 6)) and "Traceback" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4", "step-5", "step-6"]


def test_an_explicit_corrupt_checkpoint_is_refused(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    ckpt = out / "checkpoints" / "step-5"
    _flip(ckpt / "rng.pt")
    assert main(_args(finished[0], out, "optim.max_steps=6", f"run.resume={ckpt}")) == 2
    assert "not a complete checkpoint (rng.pt does not match its sha256 in the manifest)" in capsys.readouterr().err


def test_write_manifest_adopts_a_checkpoint_without_one(finished, tmp_path):
    out = _copy(finished, tmp_path)
    ckpt = out / "checkpoints" / "step-6"
    (ckpt / MANIFEST).unlink()
    assert "no manifest.json" in verify_checkpoint(ckpt)
    write_manifest(ckpt)
    assert verify_checkpoint(ckpt) is None


# ------------------------------------------------------------------------------------------ config changes


@pytest.fixture
def three_steps(tmp_path):
    data, out = _data(tmp_path / "sft.jsonl"), tmp_path / "run"
    assert main(_args(data, out, "optim.max_steps=3")) == 0
    return data, out


def test_changed_training_keys_are_refused_with_the_list(three_steps, capsys):
    data, out = three_steps
    before = (out / "config.yaml").read_text()
    capsys.readouterr()
    rc = main(_args(data, out, "optim.max_steps=3", "run.resume=true", "optim.lr=5e-4", "optim.batch_size=4",
                    "optim.schedule=linear", "run.log_every=7"))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "the config differs from" in err and "in training-relevant keys" in err
    for line in ("optim.lr: 0.001 -> 0.0005", "optim.batch_size: 2 -> 4", "optim.schedule: 'constant' -> 'linear'"):
        assert f"\n  {line}" in err
    assert "run.log_every" not in err  # may change: how the run is shown
    assert "run.allow_config_change=true" in err
    assert (out / "config.yaml").read_text() == before  # nothing recorded for a run that did not start


def test_data_edited_in_place_is_a_change(three_steps, capsys):
    data, out = three_steps
    _data(data, n=17)
    assert main(_args(data, out, "optim.max_steps=3", "run.resume=true")) == 2
    assert f"data.train: the contents of {data} changed" in capsys.readouterr().err


def test_allowed_change_is_in_effect_and_recorded(three_steps, capsys):
    data, out = three_steps
    capsys.readouterr()
    assert main(_args(data, out, "optim.max_steps=5", "run.resume=true", "optim.lr=5e-4", "optim.weight_decay=0.1",
                      "run.allow_config_change=true")) == 0
    err = capsys.readouterr().err
    assert "with a changed config (run.allow_config_change=true)" in err and "optim.lr: 0.001 -> 0.0005" in err
    rows = read_metrics(out)
    assert [r["lr"] for r in rows] == [1e-3] * 3 + [5e-4] * 2  # the new peak, not the checkpoint's
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["optim"]["lr"] == 5e-4 and recorded["optim"]["weight_decay"] == 0.1
    opt = torch.load(out / "checkpoints" / "step-5" / "optimizer.pt", weights_only=False)
    assert [g["weight_decay"] for g in opt["param_groups"]] == [0.1]


def test_a_longer_run_under_a_constant_schedule_needs_no_override_and_is_exact(three_steps, tmp_path):
    data, out = three_steps
    assert main(_args(data, out, "optim.max_steps=5", "run.resume=true")) == 0
    straight = tmp_path / "straight"
    assert main(_args(data, straight, "optim.max_steps=5")) == 0
    assert _comparable(read_metrics(out)) == _comparable(read_metrics(straight))
    a, b = _weights(straight), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_longer_run_under_a_decaying_schedule_is_refused(tmp_path, capsys):
    data, out = _data(tmp_path / "sft.jsonl"), tmp_path / "run"
    assert main(_args(data, out, "optim.max_steps=3", "optim.schedule=cosine")) == 0
    capsys.readouterr()
    assert main(_args(data, out, "optim.max_steps=5", "optim.schedule=cosine", "run.resume=true")) == 2
    assert "optim.max_steps: 3 -> 5 (the cosine schedule's learning rate depends on the run's length)" in \
        capsys.readouterr().err


def test_training_changes_by_hand():
    from rlmt.config import load_config, to_dict

    base = to_dict(load_config(None, ["algorithm=grpo", "reward.args={pattern: a}"]))
    changed = to_dict(load_config(None, ["algorithm=grpo", "reward.args={pattern: b}", "run.seed=1",
                                         "runtime.threads=2", "eval.num_samples=9", "model.device=cpu"]))
    assert training_changes(base, changed) == ["reward.args: {'pattern': 'a'} -> {'pattern': 'b'}", "run.seed: 0 -> 1"]
    longer = to_dict(load_config(None, ["algorithm=grpo", "reward.args={pattern: a}", "optim.epochs=3"]))
    assert training_changes(base, longer) == []  # max_steps 0: the length is optim.epochs, grown
    shorter = to_dict(load_config(None, ["algorithm=grpo", "reward.args={pattern: a}", "optim.epochs=0.5"]))
    assert training_changes(base, shorter) == ["optim.epochs: 1.0 -> 0.5"]
    older = json.loads(json.dumps(base))  # a checkpoint written before model.parallel existed
    del older["model"]["parallel"]
    assert training_changes(older, base) == []  # a key added since, at its default: the behaviour it had
    fsdp = to_dict(load_config(None, ["algorithm=grpo", "reward.args={pattern: a}", "model.parallel=fsdp"]))
    assert training_changes(older, fsdp) == ["model.parallel: None -> 'fsdp'"]


def test_step_in_backward_resumes_on_the_schedule(tmp_path):
    """With optim.step_in_backward the updates run in backward hooks; after a resume they must use the loaded
    optimizer's parameter groups (where the schedule writes the learning rate), not the groups the optimizer
    was built with: 3 steps + resume to 6 under warmup equals 6 straight."""
    data = _data(tmp_path / "sft.jsonl")
    extra = ["optim.step_in_backward=true", "optim.max_grad_norm=0", "optim.warmup_steps=4",
             "optim.schedule=linear"]
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert main(_args(data, straight, "optim.max_steps=6", *extra)) == 0
    assert main(_args(data, out, "optim.max_steps=6", "run.keep_checkpoints=6", *extra)) == 0
    shutil.rmtree(out / "final")
    for step in (4, 5, 6):  # as if killed after step 3
        shutil.rmtree(out / "checkpoints" / f"step-{step}")
    assert main(_args(data, out, "optim.max_steps=6", "run.resume=true", *extra)) == 0
    assert _comparable(read_metrics(out)) == _comparable(read_metrics(straight))
    a, b = _weights(straight), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_and_final_are_readable_by_the_group_as_mkdir_makes_them(tmp_path):
    """mkdtemp makes 0700 directories and safetensors writes 0600 files; renamed into place they were the only
    outputs the group could not read. Every directory and file of final/ and the checkpoints gets the mode the
    umask gives (here 027: 0750 and 0640)."""
    import os

    data = _data(tmp_path / "sft.jsonl")
    out = tmp_path / "run"
    old = os.umask(0o027)
    try:
        assert main(_args(data, out, "optim.max_steps=1")) == 0
    finally:
        os.umask(old)
    dirs = [out / "final", *(out / "checkpoints").glob("step-*")]
    assert len(dirs) == 2 and (out / "final" / "model.safetensors").is_file()
    for d in dirs:
        assert d.stat().st_mode & 0o777 == 0o750, (d, oct(d.stat().st_mode))
        files = list(d.rglob("*"))
        assert "model.safetensors" in {f.name for f in files}
        for f in files:
            assert f.stat().st_mode & 0o777 == (0o750 if f.is_dir() else 0o640), (f, oct(f.stat().st_mode))
