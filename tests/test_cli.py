"""The command line: help, config and data errors (exit 2, one line, no traceback), and tiny-model runs of
train, generate and eval."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlmt.cli import main
from rlmt.config import describe, load_config

SUBCOMMANDS = ["train", "eval", "generate", "demo", "report"]
TINY = ["model.name=tiny-random", "model.device=cpu", "run.progress=false"]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``rlmt ARGV`` in this process: (exit code, stdout, stderr); argparse exits become codes too."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def run_subprocess(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "rlmt.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


SFT_ROWS = [
    {"prompt": "What is 1 + 1?", "completion": "2"},
    {"prompt": "What is 2 + 2?", "completion": "4"},
    {"prompt": "Say hello.", "completion": "Hello there!"},
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
]


def sft_config(tmp: Path, out: Path, **extra_sections) -> Path:
    data = write_jsonl(tmp / "sft.jsonl", SFT_ROWS)
    cfg = {
        "algorithm": "sft",
        "model": {"name": "tiny-random", "device": "cpu"},
        "data": {"train": str(data), "max_prompt_tokens": 128, "max_completion_tokens": 32},
        "optim": {"max_steps": 2, "batch_size": 2, "lr": "1e-3"},
        "run": {"output_dir": str(out), "progress": False, "seed": 3},
        **extra_sections,
    }
    path = tmp / "sft.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------ help


def test_top_level_help_lists_every_subcommand():
    code, out, _ = run_cli(["--help"])
    assert code == 0
    assert out.startswith("usage: rlmt")
    for name in SUBCOMMANDS:
        assert name in out
    assert "exit codes" in out


def test_no_arguments_prints_help():
    code, out, _ = run_cli([])
    assert code == 0
    for name in SUBCOMMANDS:
        assert name in out


def test_version_names_rlmt_and_torch():
    code, out, _ = run_cli(["--version"])
    import torch

    assert code == 0 and out.startswith("rlmt 0.") and f"torch {torch.__version__}" in out


def test_train_with_nothing_to_train_prints_its_usage():
    code, _, err = run_cli(["train"])
    assert code == 2 and err.startswith("usage: rlmt train") and "rlmt train examples/grpo.yaml" in err
    assert "data.train" not in err  # not the data error a missing config used to give


def test_the_progress_rate_counts_training_steps_only(tmp_path, monkeypatch):
    """The bar's rate and ETA start with the first training step, not with the model load and the evaluation
    before it (which the loops run between creating the recorder and the first step); the run ends with a
    summary line."""
    import time

    from rlmt.records import RunRecorder

    rec = RunRecorder(tmp_path, {}, total_steps=4, progress=True)
    time.sleep(0.4)  # the evaluation before training
    rec.start_steps()
    rec.log(1, {"loss": 1.0})
    elapsed = rec._bar.format_dict["elapsed"]
    rec.evaluation("before", {"pass@1": 0.25}, "pass@1 0.250")
    rec.evaluation("after", {"pass@1": 0.75}, "pass@1 0.750")
    assert rec.summary().startswith("run: 1 steps in 0.0 min of training, 0.0 min in all; pass@1 0.250 -> 0.750")
    rec.close()
    assert elapsed < 0.3


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help(name):
    code, out, _ = run_cli([name, "--help"])
    assert code == 0
    assert out.startswith(f"usage: rlmt {name}")


def test_help_config_lists_every_key_with_its_doc_and_default():
    code, out, _ = run_cli(["train", "--help-config"])
    assert code == 0
    lines = out.splitlines()
    for key, default, text in describe():
        if default == "":
            assert f"{key}:  {text}" in lines  # a section header
        else:
            i = lines.index(f"  {key} = {default}")
            assert lines[i + 1].strip() == text
    i = lines.index("  model.parallel = 'ddp'")
    assert lines[i + 1].endswith("[one of: 'ddp', 'fsdp']")  # the choices of an enumerated key
    i = lines.index("  pg.kl_estimator = None")
    assert lines[i + 1].endswith("[one of: 'k3', 'k1']")  # an optional one too
    from rlmt.rewards import REGISTRY

    sources = out[out.index("reward sources (reward.source)"):]
    for name in REGISTRY:  # every reward source with the reward.args it takes
        assert f"\n  {name}: " in sources
    assert "args: pattern, mode='search'" in sources


def test_unknown_subcommand_exits_2():
    code, _, err = run_cli(["trian"])
    assert code == 2
    assert "invalid choice" in err


# ------------------------------------------------------------------------------------------ bad input


def test_mistyped_key_in_config_file_exits_2_with_one_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name: tiny-random\noptim:\n  lrr: 1.0e-4\n")
    code, out, err = run_cli(["train", str(path)])
    assert code == 2
    assert err == f"error: {path}: unknown config key 'optim.lrr'; did you mean 'optim.lr'?\n"
    assert out == ""


def test_mistyped_override_exits_2(tmp_path):
    code, _, err = run_cli(["train", *TINY, "optim.batchsize=4"])
    assert code == 2
    assert err.startswith("error: ")
    assert "'optim.batchsize'" in err and "did you mean 'optim.batch_size'" in err


def test_missing_config_file_exits_2(tmp_path):
    code, _, err = run_cli(["train", str(tmp_path / "nope.yaml")])
    assert code == 2
    assert err.startswith("error: config file") and "nope.yaml" in err


def test_as_a_subprocess_help_and_config_error_without_traceback(tmp_path):
    helped = run_subprocess(["--help"], tmp_path)
    assert helped.returncode == 0
    for name in SUBCOMMANDS:
        assert name in helped.stdout

    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lrr: 1.0e-4\n")
    bad = run_subprocess(["train", str(path)], tmp_path)
    assert bad.returncode == 2
    assert "error:" in bad.stderr
    assert "'optim.lrr'" in bad.stderr
    assert "did you mean 'optim.lr'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_bad_data_line_exits_2_naming_file_line_and_field(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [SFT_ROWS[0], "", {"prompt": "q", "completion": 5}])
    out_dir = tmp_path / "run"
    code, _, err = run_cli(["train", *TINY, f"data.train={data}", f"run.output_dir={out_dir}"])
    assert code == 2
    assert err.startswith(f"error: {data}:3: field 'completion':")
    assert "must be a string" in err
    assert "Traceback" not in err
    assert not out_dir.exists()  # rows are validated before the run directory is written


def test_eval_without_data_exits_2_naming_the_key():
    code, _, err = run_cli(["eval", *TINY])
    assert code == 2
    assert err.startswith("error: data.eval")


# ------------------------------------------------------------------------------------------ a tiny SFT run


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    out_dir = tmp / "run"
    cfg_path = sft_config(tmp, out_dir)
    code, out, err = run_cli(["train", str(cfg_path)])
    return {"code": code, "out": out, "err": err, "dir": out_dir, "config": cfg_path}


def test_sft_run_exits_0_and_writes_the_run_directory(sft_run):
    assert sft_run["code"] == 0, sft_run["err"]
    out_dir = sft_run["dir"]
    assert f"run written to {out_dir}" in sft_run["out"]
    assert (out_dir / "config.yaml").is_file()
    assert (out_dir / "metrics.jsonl").is_file()
    assert (out_dir / "checkpoints" / "step-2" / "state.json").is_file()
    assert json.loads((out_dir / "checkpoints" / "step-2" / "state.json").read_text())["step"] == 2
    assert (out_dir / "final").is_dir()


def test_sft_run_records_the_resolved_config(sft_run):
    recorded = yaml.safe_load((sft_run["dir"] / "config.yaml").read_text())
    assert recorded["model"]["name"] == "tiny-random"
    assert recorded["optim"]["max_steps"] == 2
    assert recorded["optim"]["lr"] == pytest.approx(1e-3)  # the "1e-3" string, resolved to a float
    # the recorded config is complete: reading it back gives the config the run used
    assert load_config(sft_run["dir"] / "config.yaml") == load_config(sft_run["config"])


def test_sft_run_logs_one_metrics_row_per_step(sft_run):
    rows = [json.loads(line) for line in (sft_run["dir"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert isinstance(r["loss"], float) and math.isfinite(r["loss"]) and r["loss"] > 0


def test_sft_final_is_loadable_with_transformers_and_was_trained(sft_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlmt.models import tiny_random_model

    final = sft_run["dir"] / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert tok("hi", add_special_tokens=False)["input_ids"] == [71, 72]  # the byte-level tiny tokenizer
    assert tok.eos_token == "<|im_end|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    assert model.config.vocab_size == len(tok)

    initial, _ = tiny_random_model(seed=3)  # run.seed=3 initialised the policy
    final_state, initial_state = model.state_dict(), initial.state_dict()
    assert final_state.keys() == initial_state.keys()
    changed = [k for k in final_state if not torch.equal(final_state[k], initial_state[k])]
    assert changed, "two optimizer steps at lr 1e-3 left every weight unchanged"


def test_train_again_into_same_directory_needs_resume(sft_run):
    assert sft_run["code"] == 0
    metrics_before = (sft_run["dir"] / "metrics.jsonl").read_text()
    code, _, err = run_cli(["train", str(sft_run["config"])])
    assert code == 2
    assert err.startswith("error: ")
    assert "run.resume" in err
    assert "Traceback" not in err
    assert (sft_run["dir"] / "metrics.jsonl").read_text() == metrics_before  # nothing overwritten


# ------------------------------------------------------------------------------------------ generate and eval


def test_generate_prints_num_samples_jsonl_lines_per_prompt():
    argv = ["generate", *TINY, "rollout.num_samples=3", "rollout.max_new_tokens=4", "run.seed=1",
            "--prompt", "What is 2 + 2?", "--prompt", "Say hi."]
    code, out, err = run_cli(argv)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 2 * 3
    assert sorted(r["prompt"] for r in rows) == ["Say hi."] * 3 + ["What is 2 + 2?"] * 3
    assert all(isinstance(r["response"], str) for r in rows)
    # seeded: the same command prints the same samples
    assert run_cli(argv)[1] == out


def test_generate_reads_prompts_from_the_data_file(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}])
    out_file = tmp_path / "gen.jsonl"
    code, out, err = run_cli(["generate", *TINY, f"data.eval={prompts}", "rollout.num_samples=2",
                              "rollout.max_new_tokens=3", "--output", str(out_file)])
    assert code == 0, err
    assert out == ""
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert sorted(r["prompt"] for r in rows) == ["a", "a", "b", "b", "c", "c"]


def test_eval_prints_pass_at_1_and_mean_reward_consistent_with_samples(tmp_path):
    prompts = write_jsonl(tmp_path / "eval.jsonl", [
        {"prompt": "What is 2 + 2?", "answer": 4},
        {"prompt": "What is 3 + 5?", "answer": "8"},
        {"prompt": "What is 10 - 1?", "answer": 9},
    ])
    samples_path = tmp_path / "samples.jsonl"
    code, out, err = run_cli(["eval", *TINY, f"data.eval={prompts}", "eval.num_samples=2",
                              "eval.max_new_tokens=4", f"eval.output={samples_path}"])
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["model"] == "tiny-random"
    assert metrics["data"] == str(prompts)
    assert metrics["prompts"] == 3
    assert 0.0 <= metrics["pass@1"] <= metrics["pass@2"] <= 1.0
    samples = [json.loads(line) for line in samples_path.read_text().splitlines()]
    assert len(samples) == 3 * 2
    rewards = [s["reward"] for s in samples]
    assert metrics["reward/mean"] == pytest.approx(sum(rewards) / len(rewards))
    per_prompt = [rewards[i:i + 2] for i in range(0, 6, 2)]
    assert metrics["pass@1"] == pytest.approx(sum(sum(r >= 1.0 for r in g) / 2 for g in per_prompt) / 3)


def test_eval_bad_prompt_row_exits_2(tmp_path):
    prompts = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "ok", "answer": 1}, {"answer": 2}])
    code, _, err = run_cli(["eval", *TINY, f"data.eval={prompts}"])
    assert code == 2
    assert err.startswith(f"error: {prompts}:2: field 'prompt': missing")


def test_python_dash_m_rlmt_is_the_command_line():
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "rlmt", "train", "--help-config"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "pg.kl_estimator" in p.stdout and "grape.critic.base_url" in p.stdout
