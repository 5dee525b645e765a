"""``rlmt report``: an HTML report of a fake run directory (plots are real PNGs, eval numbers shown, model
output escaped), graceful notes for missing pieces, and clear errors for a missing run."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import yaml

from rlmt.cli import main
from rlmt.report import metric_series, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert(1)</script>"


def make_run(root: Path, metrics: list[dict] | None = None, evals: bool = True) -> Path:
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"algorithm": "grpo", "model": {"name": "tiny-random"}}))
    if metrics is None:
        metrics = [
            {"step": 1, "loss": 0.9, "reward/mean": 0.2, "reward/std": 0.1, "kl": 0.0, "approx_kl": 0.0,
             "response_length/mean": 30.0, "lr": 1e-5, "time/step_s": 2.0, "rubric/correct/score_mean": 0.5},
            {"step": 2, "loss": "nan", "reward/mean": 0.4, "reward/std": 0.2, "kl": 0.01,  # no approx_kl
             "response_length/mean": 28.0, "lr": 1e-5, "time/step_s": 2.0, "rubric/correct/score_mean": 0.6},
            {"step": 3, "loss": 0.7, "reward/mean": 0.5, "kl": "inf", "approx_kl": 0.02, "lr": 5e-6,
             "kept/reward_mean": 0.8, "time/step_s": 2.0, "rubric/style/score_mean": 0.3},
        ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    if evals:
        (run / "eval-before.json").write_text(json.dumps({"pass@1": 0.125, "reward/mean": 0.25}))
        (run / "eval-after.json").write_text(json.dumps({"pass@1": 0.625, "reward/mean": 0.75}))
        before = [{"prompt": "2+2?", "response": EVIL, "reward": 0.0, "details": {}},
                  {"prompt": "say <b>hi</b>", "response": "hi", "reward": 1.0, "details": {}}]
        after = [{"prompt": "2+2?", "response": "4", "reward": 1.0, "details": {}},
                 {"prompt": "say <b>hi</b>", "response": "hello & hi", "reward": 1.0, "details": {}}]
        for name, rows in (("before", before), ("after", after)):
            (run / f"eval-{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def images(page: str, base: Path) -> list[Path]:
    return [base / src for src in re.findall(r'<img src="([^"]+)"', page)]


def test_report_has_plots_eval_numbers_and_escaped_samples(tmp_path):
    run = make_run(tmp_path)
    out = write_report(run)
    assert out == run / "report.html" and out.exists()
    page = out.read_text()
    pngs = images(page, run)
    assert {p.name for p in pngs} >= {"reward.png", "kl.png", "response_length.png", "loss.png",
                                      "rubric_score_mean.png", "other_metrics.png"}
    for p in pngs:
        assert p.parent == run / "report" and p.read_bytes().startswith(PNG_MAGIC)
    for number in ("0.125", "0.625", "0.25", "0.75", "+0.5"):
        assert number in page
    assert "grpo" in page and "tiny-random" in page and "0.1 min" in page  # 3 x 2 s of step time
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "say &lt;b&gt;hi&lt;/b&gt;" in page and "hello &amp; hi" in page


def test_nan_strings_and_missing_keys_are_skipped():
    series = metric_series([{"step": 1, "loss": 1.0, "kl": "nan"}, {"step": 2, "loss": "inf"},
                            {"step": 3, "loss": 0.5, "kl": 0.1, "note": "text"}])
    assert series["loss"] == ([1.0, 3.0], [1.0, 0.5])
    assert series["kl"] == ([3.0], [0.1])
    assert "note" not in series and "step" not in series


def test_missing_pieces_become_notes(tmp_path):
    run = make_run(tmp_path, metrics=[{"step": 1, "loss": 1.0}], evals=False)
    page = write_report(run, tmp_path / "elsewhere" / "r.html").read_text()
    assert "No eval-before.json" in page and "No eval-before.jsonl" in page
    assert "reward: not logged" in page and "KL to reference: not logged" in page
    pngs = images(page, tmp_path / "elsewhere")
    assert [p.name for p in pngs] == ["loss.png"] and pngs[0].read_bytes().startswith(PNG_MAGIC)


def test_empty_metrics_file(tmp_path):
    run = make_run(tmp_path, metrics=[])
    page = write_report(run).read_text()
    assert "holds no numeric metrics" in page and "<img" not in page and "0.625" in page


def test_missing_run_or_metrics_raises_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        write_report(tmp_path / "nope")
    (tmp_path / "bare").mkdir()
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        write_report(tmp_path / "bare")


def test_cli_report(tmp_path):
    run = make_run(tmp_path)
    code, out, _ = run_cli(["report", str(run)])
    assert code == 0 and (run / "report.html").exists() and "report.html" in out
    code, _, _ = run_cli(["report", str(run), "--output", str(tmp_path / "x.html")])
    assert code == 0 and (tmp_path / "x.html").exists()
    code, _, err = run_cli(["report", str(tmp_path / "missing")])
    assert code == 2 and err.startswith("error: ") and "missing" in err and "Traceback" not in err
    code, out, _ = run_cli(["report", "--help"])
    assert code == 0 and "RUN_DIR" in out and "--output" in out
