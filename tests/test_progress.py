"""Progress bars beside the training bar: `rlmt eval`, `rlmt generate`, the before/after evaluation of a run
and each rejection-sampling round's SFT steps count their own units on stderr (read back from what the bar
wrote), and `run.progress: false` turns them off."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

from rlmt.cli import main
from rlmt.records import progress_bar, read_metrics

TINY = ["model.name=tiny-random", "model.device=cpu"]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def counts(err: str, desc: str) -> list[tuple[int, int]]:
    """The (done, total) states the bar named ``desc`` drew, in order, each once."""
    drawn = [(int(n), int(t)) for n, t in re.findall(rf"(?<![\w ]){re.escape(desc)}:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)",
                                                      err)]
    return [c for i, c in enumerate(drawn) if i == 0 or c != drawn[i - 1]]


def prompts_file(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": i + 1}) + "\n" for i in range(n)))
    return path


def test_a_bar_counts_its_units_and_is_silent_when_off():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        with progress_bar(5, "work", "prompt") as bar:
            bar.update(2)
            bar.update(3)
        with progress_bar(5, "quiet", "prompt", enabled=False) as bar:
            bar.update(5)
    assert counts(err.getvalue(), "work") == [(0, 5), (2, 5), (5, 5)]
    assert "quiet" not in err.getvalue() and "prompt/s" in err.getvalue()


def test_eval_counts_the_prompts(tmp_path):
    data = prompts_file(tmp_path / "eval.jsonl", 5)
    argv = ["eval", *TINY, f"data.eval={data}", "eval.num_samples=2", "eval.max_new_tokens=2",
            "rollout.batch_prompts=2"]
    code, out, err = run_cli(argv + ["run.progress=true"])
    assert code == 0, err
    assert counts(err, "eval") == [(0, 5), (2, 5), (4, 5), (5, 5)]  # chunks of rollout.batch_prompts
    assert json.loads(out)["prompts"] == 5  # stdout stays the JSON alone
    code, _, err = run_cli(argv + ["run.progress=false"])
    assert code == 0 and counts(err, "eval") == [] and "prompt/s" not in err


def test_generate_counts_the_prompts_and_keeps_stdout_clean(tmp_path):
    argv = ["generate", *TINY, "run.progress=true", "rollout.num_samples=2", "rollout.max_new_tokens=2",
            "rollout.batch_prompts=2", "--prompt", "a", "--prompt", "b", "--prompt", "c"]
    code, out, err = run_cli(argv)
    assert code == 0, err
    assert counts(err, "generate") == [(0, 3), (2, 3), (3, 3)]
    assert sorted(json.loads(line)["prompt"] for line in out.splitlines()) == ["a", "a", "b", "b", "c", "c"]
    code, out2, err = run_cli(argv + ["--output", str(tmp_path / "g.jsonl")])
    assert code == 0 and out2 == "" and counts(err, "generate")[-1] == (3, 3)
    assert len((tmp_path / "g.jsonl").read_text().splitlines()) == 6


def test_a_runs_evaluations_and_rejection_rounds_show_their_own_bars(tmp_path):
    """A rejection-sampling run with an evaluation before and after: each evaluation's bar counts the
    held-out prompts (eval.max_prompts of them), each round's bars count its prompts sampled and its SFT steps
    (sft/steps in the records), and the training bar its rounds."""
    from rlmt.tasks import write_addition_split

    train, held = write_addition_split(tmp_path / "data", 8, 6)
    code, _, err = run_cli(["train", *TINY, "algorithm=rejection_sampling", f"data.train={train}",
                            f"data.eval={held}", "eval.max_prompts=5", "eval.num_samples=1", "eval.max_new_tokens=2",
                            "rollout.batch_prompts=2", "rollout.num_samples=2", "rollout.max_new_tokens=3",
                            "rejection.rounds=2", "rejection.prompts_per_round=4", "rejection.keep_top_k=2",
                            "rejection.threshold=0", "reward.args={mode: last_number}", "optim.batch_size=1",
                            "run.eval_before_after=true", "run.progress=true", f"run.output_dir={tmp_path / 'run'}"])
    assert code == 0, err
    for tag in ("before", "after"):
        assert counts(err, f"eval {tag}") == [(0, 5), (2, 5), (4, 5), (5, 5)]
    rows = read_metrics(tmp_path / "run")
    for r, row in enumerate(rows, 1):
        steps = int(row["sft/steps"])
        assert steps > 0 and counts(err, f"round {r} SFT") == [(s, steps) for s in range(steps + 1)]
        assert counts(err, f"round {r} sampling") == [(0, 4), (2, 4), (4, 4)]  # prompts_per_round, 2 a call
    assert counts(err, "train")[-1] == (2, 2)


def test_the_training_bar_ends_with_the_steps_rate_not_the_evaluation_after(tmp_path):
    """The bar closes at its last step: the evaluation after training (here 1.1 s) does not stretch its last
    line's elapsed time or rate."""
    import time

    from rlmt.records import RunRecorder

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rec = RunRecorder(tmp_path, {}, total_steps=2, progress=True)
        rec.start_steps()
        rec.log(1, {"loss": 1.0})
        rec.log(2, {"loss": 1.0})
        time.sleep(1.1)  # the evaluation after training
        rec.note("eval after: pass@1 0.5")
        rec.close()
    assert counts(err.getvalue(), "train")[-1] == (2, 2)
    last = [line for line in re.split(r"[\r\n]", err.getvalue()) if line.startswith("train:")][-1]
    assert "2/2 [00:00<00:00," in last, last
