"""``rlmt report``: a self-contained HTML report of a fake run directory (plots are inline PNGs, eval numbers
shown, model output escaped), graceful notes for missing pieces, clear errors for a missing run; what the plots
promise (the reward band within the reward's range, approx_kl apart from the KL to the reference, integer step
ticks, plain y labels, legends outside the data) read back from the matplotlib figures; the wall time the
records measured."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from rlmt.cli import main
from rlmt.records import RunRecorder, read_metrics
from rlmt.report import band_bounds, duration, metric_series, plot_metrics, tick_labels, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert(1)</script>"


def make_run(root: Path, metrics: list[dict] | None = None, evals: bool = True, config: dict | None = None) -> Path:
    run = root / "run"
    run.mkdir()
    config = {"algorithm": "grpo", "model": {"name": "tiny-random"}} if config is None else config
    (run / "config.yaml").write_text(yaml.safe_dump(config))
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


class References(HTMLParser):
    """Every attribute of the page that can load something (src, href, srcset, data, ...), and each image."""

    LOADING = {"src", "href", "srcset", "data", "action", "poster", "background", "formaction"}

    def __init__(self, page: str):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.images: dict[str, bytes] = {}  # alt -> the PNG bytes of its data URI
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.refs += [(tag, k, v or "") for k, v in attrs.items() if k in self.LOADING]
        if tag == "img" and (attrs.get("src") or "").startswith("data:image/png;base64,"):
            self.images[attrs["alt"]] = base64.b64decode(attrs["src"].split(",", 1)[1], validate=True)


def images(page: str) -> dict[str, bytes]:
    return References(page).images


def test_report_has_plots_eval_numbers_and_escaped_samples(tmp_path):
    run = make_run(tmp_path)
    out = write_report(run)
    assert out == run / "report.html" and out.exists()
    page = out.read_text()
    pngs = images(page)
    assert set(pngs) == {"reward", "kl", "approx_kl", "response_length", "loss", "rubric_score_mean",
                         "other_metrics"}
    assert all(png.startswith(PNG_MAGIC) for png in pngs.values())
    for number in ("0.125", "0.625", "0.25", "0.75", "+0.5"):
        assert number in page
    assert "grpo" in page and "tiny-random" in page
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
    assert "reward: not logged" in page and "KL to the reference: not logged" in page
    assert "approx_kl: KL to pi_old within an update: not logged" in page
    assert list(images(page)) == ["loss"] and images(page)["loss"].startswith(PNG_MAGIC)
    assert "wall time</th><td>not recorded" in page  # no summary.json, no time/elapsed_s


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


# ------------------------------------------------------------------------------------- what the page promises


def plots(rows: list[dict], run_dir: Path, config: dict | None = None) -> dict:
    series = metric_series(rows)
    return {p.stem: p for p in plot_metrics(series, *band_bounds(run_dir, config or {}, series))}


def drawn(fig):
    fig.canvas.draw()
    return [ax for ax in fig.axes if ax.get_visible()]


def band_limits(plot) -> tuple[float, float]:
    """The lowest and highest y the reward plot's band reaches."""
    (ax,) = drawn(plot.figure)
    (band,) = ax.collections
    ys = [y for path in band.get_paths() for y in path.vertices[:, 1]]
    return min(ys), max(ys)


def test_the_page_is_self_contained(tmp_path):
    """Nothing outside the page is referenced: every src is an inline PNG, nothing else loads, and no image
    directory is written beside it."""
    run = make_run(tmp_path)
    page = write_report(run).read_text()
    refs = References(page)
    assert refs.refs and all(attr == "src" and tag == "img" and v.startswith("data:image/png;base64,")
                             for tag, attr, v in refs.refs), [r[:2] + (r[2][:40],) for r in refs.refs]
    assert len(refs.images) == len(refs.refs) and all(png.startswith(PNG_MAGIC) for png in refs.images.values())
    assert "url(" not in page and "<link" not in page and "<script" not in page
    assert sorted(p.name for p in run.iterdir()) == sorted(["config.yaml", "metrics.jsonl", "eval-before.json",
                                                             "eval-after.json", "eval-before.jsonl",
                                                             "eval-after.jsonl", "report.html"])


REWARDS = [{"step": 1, "reward/mean": 0.9, "reward/std": 0.3}, {"step": 2, "reward/mean": 0.1, "reward/std": 0.3},
           {"step": 3, "reward/mean": 0.5, "reward/std": 0.1}]


def test_the_reward_band_is_clipped_to_the_range_the_source_declares(tmp_path):
    """math_answer gives only `correct` or `incorrect`: 0.9 + 0.3 is drawn at 1, 0.1 - 0.3 at 0; a band inside
    the range (0.5 ± 0.1) is drawn as it is; with other scores the range follows them."""
    config = {"algorithm": "grpo", "reward": {"source": "math_answer", "args": {}}}
    reward = plots(REWARDS, tmp_path, config)["reward"]
    assert band_limits(reward) == (0.0, 1.0)
    (ax,) = drawn(reward.figure)
    (band,) = ax.collections
    at_3 = sorted({round(float(y), 12) for x, y in band.get_paths()[0].vertices if x == 3.0})
    assert at_3 == [0.4, 0.6]
    assert "clipped to [0, 1]" in reward.caption and "math_answer" in reward.caption
    config["reward"]["args"] = {"correct": 2.0, "incorrect": -1.0}
    assert band_limits(plots(REWARDS, tmp_path, config)["reward"]) == (pytest.approx(-0.2), pytest.approx(1.2))
    config = {"reward": {"source": "regex", "args": {"pattern": "x", "reward": 1.0, "penalty": -0.1}}}
    assert band_limits(plots(REWARDS, tmp_path, config)["reward"]) == (-0.1, 1.0)
    config["reward"]["args"] = {"pattern": "x", "reward": 0.5, "penalty": 0.25}  # contradicted by the means
    reward = plots(REWARDS, tmp_path, config)["reward"]
    assert band_limits(reward) == (0.1, 0.9) and "they leave the range 'regex' declares, [0.25, 0.5]" in reward.caption


def test_without_a_declared_range_the_band_stays_within_the_rewards_recorded(tmp_path):
    """A reward model declares no bounds; GRAPE's rubric is its own source (not reward.source), and a multi-turn
    environment's rewards are its own: the band is clipped to the lowest and highest reward the records hold
    (eval samples, rejection rounds' kept responses, the logged means)."""
    run = make_run(tmp_path, metrics=REWARDS, evals=False)
    (run / "eval-before.jsonl").write_text(json.dumps({"prompt": "p", "response": "r", "reward": 0.05}) + "\n")
    (run / "rounds").mkdir()
    (run / "rounds" / "round-0.jsonl").write_text(json.dumps({"response": "r", "reward": 0.95}) + "\n")
    for config in ({"algorithm": "grpo", "reward": {"source": "reward_model", "args": {"path": "rm"}}},
                   {"algorithm": "grape", "reward": {"source": "math_answer"}},
                   {"algorithm": "grpo", "reward": {"source": "math_answer"}, "env": {"source": "calculator"}}):
        reward = plots(REWARDS, run, config)["reward"]
        assert band_limits(reward) == (0.05, 0.95), config
        assert "lowest and highest reward in the run's records" in reward.caption
    (run / "rounds" / "round-0.jsonl").unlink()
    (run / "eval-before.jsonl").unlink()  # the means alone: 0.1 .. 0.9
    assert band_limits(plots(REWARDS, run, {"reward": {"source": "reward_model"}})["reward"]) == (0.1, 0.9)


def test_the_length_band_stays_between_0_and_max_new_tokens(tmp_path):
    rows = [{"step": 1, "response_length/mean": 3.0, "response_length/std": 5.0},
            {"step": 2, "response_length/mean": 14.0, "response_length/std": 5.0}]
    length = plots(rows, tmp_path, {"rollout": {"max_new_tokens": 16}})["response_length"]
    assert band_limits(length) == (0.0, 16.0)


def test_approx_kl_is_plotted_apart_from_the_kl_to_the_reference(tmp_path):
    """They measure different things (pi vs pi_ref over the run; pi vs pi_old within one update) at scales
    that differ by orders of magnitude: each has its own figure and axes."""
    rows = [{"step": s, "kl": 0.01 * s, "approx_kl": 1e-6 * s} for s in (1, 2, 3)]
    got = plots(rows, tmp_path)
    (kl,), (approx,) = drawn(got["kl"].figure), drawn(got["approx_kl"].figure)
    assert [line.get_label() for line in kl.lines] == ["kl"]
    assert [line.get_label() for line in approx.lines] == ["approx_kl"]
    assert list(approx.lines[0].get_ydata()) == [1e-6, 2e-6, 3e-6]
    assert got["kl"].figure is not got["approx_kl"].figure
    assert approx.get_ylim()[1] < 1e-5 < 0.01 < kl.get_ylim()[1]  # neither squashed by the other's scale


@pytest.mark.parametrize("steps", [[1], [1, 2, 3], [2, 3, 4, 5, 6, 7], list(range(1, 301))])
def test_step_ticks_are_integers(tmp_path, steps):
    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-5, "rubric/a/score_mean": 0.5} for s in steps]
    for plot in plots(rows, tmp_path).values():
        if plot.figure is None:
            continue
        for ax in drawn(plot.figure):
            lo, hi = ax.get_xlim()
            shown = [t for t in ax.get_xticks() if lo <= t <= hi]
            assert shown and all(t == int(t) for t in shown), (plot.stem, list(ax.get_xticks()))
            labels = [t.get_text() for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi]
            assert labels == [str(int(t)) for t in shown]
            assert lo <= min(steps) and max(steps) <= hi


def y_labels(ax) -> list[str]:
    lo, hi = ax.get_ylim()
    return [t.get_text() for t in ax.get_yticklabels() if lo <= t.get_position()[1] <= hi]


def test_near_constant_series_have_plain_labels_and_a_fixed_range(tmp_path):
    """No offset ("+1", "1e-7") for the reader to combine: every label is its own value, the labels differ,
    and a series that varies by less than 0.1% of its value is drawn in its value ± 5% (± 0.05 around 0)."""
    rows = [{"step": s, "ratio_mean": r, "lr": 1e-5, "kl": 0.0, "approx_kl": a, "loss": l}
            for s, r, a, l in [(1, 1.0, 4.9e-14, 2.0), (2, 0.99999997, 4.7e-14, 2.001), (3, 1.00000004, 5.2e-14, 2.002)]]
    got = plots(rows, tmp_path)
    axes = {ax.get_title(): ax for p in got.values() if p.figure is not None for ax in drawn(p.figure)}
    for title, ax in axes.items():
        assert ax.yaxis.get_offset_text().get_text() == "", title
        labels = y_labels(ax)
        assert len(labels) >= 2 and len(set(labels)) == len(labels), (title, labels)
        lo, hi = ax.get_ylim()
        assert all(lo <= float(t) <= hi for t in labels), (title, labels)
    for title, value in (("ratio_mean", 1.0), ("lr", 1e-5)):
        lo, hi = axes[title].get_ylim()
        mid = (min(r[title] for r in rows) + max(r[title] for r in rows)) / 2
        assert (lo, hi) == (pytest.approx(mid - 0.05 * mid), pytest.approx(mid + 0.05 * mid)), title
    assert axes["KL to the reference"].get_ylim() == (-0.05, 0.05)
    assert "4.8e-14" in y_labels(axes["approx_kl: KL to pi_old within an update"])  # varies: autoscaled


def test_tick_labels_take_the_digits_that_tell_ticks_apart():
    assert tick_labels([0.999, 1.0, 1.001]) == ["0.999", "1", "1.001"]
    assert tick_labels([2.77e-17, 0.5, 1.0]) == ["0", "0.5", "1"]  # float noise of a tick at 0
    assert tick_labels([1.0, 1.00001, 1.00002]) == ["1", "1.00001", "1.00002"]
    assert tick_labels([1e4, 1.5e4]) == ["1e+04", "1.5e+04"]


def test_the_rubric_legend_sits_outside_the_data(tmp_path):
    items = [f"item_{i}" for i in range(8)]
    rows = [{"step": s, **{f"rubric/{it}/score_mean": 0.1 * i + 0.01 * s for i, it in enumerate(items)}}
            for s in (1, 2, 3)]
    fig = plots(rows, tmp_path)["rubric_score_mean"].figure
    (ax,) = drawn(fig)
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [f"rubric/{it}/score_mean" for it in items]
    box, data = legend.get_window_extent(), ax.get_window_extent()
    assert box.x0 >= data.x1  # right of the axes, over no data
    assert box.x1 <= fig.bbox.x1 + 1  # and inside the figure


def test_the_wall_time_is_the_one_the_records_measured(tmp_path):
    """summary.json's wall_s when the run ended; the last time/elapsed_s of a run that has not; never the sum
    of the step times (here 3 x 2 s)."""
    rows = [{"step": s, "loss": 1.0, "time/step_s": 2.0, "time/elapsed_s": 40.0 * s} for s in (1, 2, 3)]
    run = make_run(tmp_path, metrics=rows, evals=False)
    assert "wall time</th><td>2.0 min to step 3 (no summary.json" in write_report(run).read_text()
    (run / "summary.json").write_text(json.dumps({"steps": 3, "wall_s": 754.2, "training_s": 120.0,
                                                  "resumed_at_s": 0.0, "started": "S", "ended": "E"}))
    page = write_report(run).read_text()
    assert "wall time</th><td>12.6 min (from S to E; training steps 2.0 min)" in page
    assert duration(30.44) == "30.4 s" and duration(754.2) == "12.6 min" and duration(4 * 3600) == "4.00 h"


def test_the_recorder_measures_the_wall_time_the_report_shows(tmp_path):
    """RunRecorder: time/elapsed_s on every row and summary.json at close, from the clock, including the time
    before the first step; a resumed run continues from the kept row's time."""
    run = tmp_path / "run"
    rec = RunRecorder(run, {"algorithm": "sft"}, progress=False)
    time.sleep(0.3)  # the model load's tail and the evaluation before training
    rec.start_steps()
    for step in (1, 2):
        time.sleep(0.05)
        rec.log(step, {"loss": 1.0, "time/step_s": 0.001})
    rec.close()
    rows, summary = read_metrics(run), json.loads((run / "summary.json").read_text())
    elapsed = [r["time/elapsed_s"] for r in rows]
    assert 0.35 <= elapsed[0] < elapsed[1] <= summary["wall_s"]
    assert summary["steps"] == 2 and 0.05 <= summary["training_s"] <= summary["wall_s"] - 0.3
    assert f"wall time</th><td>{duration(summary['wall_s'])} (from " in write_report(run).read_text()

    resumed = RunRecorder(run, {"algorithm": "sft"}, resume_step=1, progress=False)
    resumed.log(2, {"loss": 1.0})
    resumed.close()
    rows, summary = read_metrics(run), json.loads((run / "summary.json").read_text())
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["time/elapsed_s"] >= elapsed[0]
    assert summary["resumed_at_s"] == elapsed[0] and summary["wall_s"] >= elapsed[0] and summary["steps"] == 2


def test_episodes_are_shown_whole_and_escaped(tmp_path):
    """A multi-turn run's samples show every turn of the episode (tool calls, tool replies, the answer), each
    escaped, with its turn and tool counts."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.5}) + "\n")
    (run / "config.yaml").write_text("algorithm: grpo\nenv: {source: tool_arithmetic}\n")
    transcript = [{"role": "system", "content": "tools"}, {"role": "user", "content": "What is 2 * 3?"},
                  {"role": "assistant", "content": '<tool_call>{"name": "calculator"}</tool_call>'},
                  {"role": "tool", "content": "<script>alert(6)</script>"},
                  {"role": "assistant", "content": "The answer is 6."}]
    episode = {"prompt": "What is 2 * 3?", "response": "The answer is 6.", "reward": 1.0,
               "details": {"turns": 2, "tool_calls": 1, "tool_errors": 0, "truncated": False,
                           "transcript": transcript}}
    for tag in ("before", "after"):
        (run / f"eval-{tag}.jsonl").write_text(json.dumps(episode) + "\n")
    page = write_report(run).read_text()
    assert page.count("&lt;tool_call&gt;{&quot;name&quot;: &quot;calculator&quot;}&lt;/tool_call&gt;") == 2
    assert "<script>alert(6)" not in page and page.count("&lt;script&gt;alert(6)&lt;/script&gt;") == 2
    assert page.count("The answer is 6.") == 2 and "tool calls 1" in page and "turns 2" in page
    assert page.index("&lt;tool_call&gt;") < page.index("&lt;script&gt;alert(6)") < page.index("The answer is 6.")
