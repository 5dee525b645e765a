"""An HTML report of one run directory: header, before/after eval table, metric plots, sample responses.

``write_report(run_dir)`` reads ``config.yaml``, ``metrics.jsonl``, ``summary.json`` and, when present,
``eval-{before,after}.json``, ``eval-{before,after}.jsonl`` and ``rounds/round-*.jsonl``; it writes one
self-contained ``RUN_DIR/report.html``: the plots are inline PNG data URIs, so the page can be moved or mailed
alone. Missing pieces become a note in the page; only a missing run directory or ``metrics.jsonl`` is an error.
Every string from the run (prompts, responses, keys) is HTML-escaped: responses are untrusted model output.

What the plots promise: the reward's mean ± std band is clipped to the range its scores can take (declared by
the reward source, :func:`rlmt.rewards.declared_range`, else the lowest and highest reward the records hold),
the response-length band to [0, ``rollout.max_new_tokens``]; the KL to the reference and ``approx_kl`` (to
pi_old: how far one update moved the policy) are separate plots; steps are integer ticks; each y tick label
is its own value (no offset or multiplier), and a near-constant series gets a fixed range around its value;
legends sit outside the data. The wall time is the one measured (``summary.json``, else the last row's
``time/elapsed_s``: :mod:`rlmt.records`), never a sum of step times.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rlmt.records import read_metrics

Series = dict[str, tuple[list[float], list[float]]]  # key -> (steps, values), finite values only
Bounds = tuple[float | None, float | None]  # the lowest and highest value a series' band may reach
MAX_SAMPLES = 8
MAX_CHARS = 2000  # of one shown response or prompt
NEAR_CONSTANT = 1e-3  # a series whose spread is below this fraction of its value is drawn in a fixed range
FIXED_RANGE = 0.05  # that range: the value ± this fraction of it (± this itself around 0)
# (stem, title, keys drawn as lines); each key of BANDS is drawn with its std as a band
FIXED_PLOTS = [("reward", "reward", ["reward/mean"]), ("kl", "KL to the reference", ["kl"]),
               ("approx_kl", "approx_kl: KL to pi_old within an update", ["approx_kl"]),
               ("response_length", "response length (tokens)", ["response_length/mean"]), ("loss", "loss", ["loss"])]
BANDS = {"reward/mean": "reward/std", "response_length/mean": "response_length/std"}
CSS = ("body{font-family:sans-serif;margin:2em;max-width:1300px}table{border-collapse:collapse;margin:1em 0}"
       "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}"
       "pre{white-space:pre-wrap;margin:0;max-width:560px}.note{color:#777;font-style:italic}img{max-width:100%}"
       "figure{margin:1em 0}figcaption{color:#555;font-size:90%}")


@dataclass
class Plot:
    """One plot of the page: a matplotlib ``figure``, or None with a ``caption`` saying what is missing."""

    stem: str
    title: str
    figure: Any | None
    caption: str = ""


def _number(v: Any) -> float | None:
    """A finite float from a logged value ("nan"/"inf" strings and non-numbers give None)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return None
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None


def metric_series(rows: list[dict[str, Any]]) -> Series:
    """Per numeric key, the steps and finite values of the rows that logged it (``step`` falls back to row index)."""
    out: Series = defaultdict(lambda: ([], []))
    for i, row in enumerate(rows):
        step = _number(row.get("step"))
        for k, v in row.items():
            x = _number(v)
            if k != "step" and x is not None:
                out[k][0].append(step if step is not None else float(i))
                out[k][1].append(x)
    return dict(out)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_config(path: Path) -> dict[str, Any]:
    """``config.yaml`` as a dict; {} when it is missing or unreadable."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, skipping lines that do not parse; [] when it is missing."""
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            out.append(row)
    return out


def _read_samples(path: Path) -> dict[str, dict[str, Any]]:
    """The first sample per prompt of an eval JSONL file, in file order."""
    first: dict[str, dict[str, Any]] = {}
    for s in _read_jsonl(path):
        if "prompt" in s:
            first.setdefault(str(s["prompt"]), s)
    return first


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    value = config.get(name)
    return value if isinstance(value, dict) else {}


def declared_reward_range(config: dict[str, Any]) -> tuple[float, float, str] | None:
    """(lowest, highest, source name) of the scores the run's reward source can give, from its class
    (:func:`rlmt.rewards.declared_range`); None for a source that declares none, a multi-turn environment
    (``env.source``: its rewards are the environment's), or a config that does not name a known source."""
    if _section(config, "env").get("source"):
        return None
    from rlmt.rewards import METHOD_SOURCES, declared_range, reward_source_class

    name, args = _section(config, "reward").get("source"), _section(config, "reward").get("args") or {}
    name = METHOD_SOURCES.get(str(config.get("algorithm")), name)  # a method with a source of its own (GRAPE)
    try:
        bounds = declared_range(reward_source_class(str(name), args), args)
    except Exception:  # noqa: BLE001 - an unknown source or bad args: the run's own error, not the report's
        return None
    return (float(bounds[0]), float(bounds[1]), str(name)) if bounds is not None else None


def observed_rewards(run_dir: Path, series: Series) -> list[float]:
    """Every reward value the run's records hold: the scored eval samples, the kept responses of rejection
    rounds, and the logged ``reward/mean`` (and ``reward/min`` / ``reward/max`` where logged); a mean lies
    between the lowest and the highest reward, so none widens the range."""
    values = [v for k in ("reward/mean", "reward/min", "reward/max") for v in series.get(k, ([], []))[1]]
    files = [run_dir / f"eval-{w}.jsonl" for w in ("before", "after")] + sorted(run_dir.glob("rounds/round-*.jsonl"))
    for path in files:
        values += [x for x in (_number(s.get("reward")) for s in _read_jsonl(path)) if x is not None]
    return values


def band_bounds(run_dir: Path, config: dict[str, Any], series: Series) -> tuple[dict[str, Bounds], dict[str, str]]:
    """Per banded key, the (low, high) its band is clipped to, and a caption saying where they come from."""
    bounds: dict[str, Bounds] = {}
    captions: dict[str, str] = {}
    declared = declared_reward_range(config) if "reward/mean" in series else None
    seen = observed_rewards(run_dir, series) if "reward/mean" in series else []
    if declared is not None and all(declared[0] <= v <= declared[1] for v in seen):
        bounds["reward/mean"] = declared[:2]
        captions["reward/mean"] = f"the range reward source {declared[2]!r} declares"
    elif seen:  # no declared range, or records that contradict it: what the records hold
        bounds["reward/mean"] = (min(seen), max(seen))
        captions["reward/mean"] = "the lowest and highest reward in the run's records" + (
            f"; they leave the range {declared[2]!r} declares, {_clip_text(declared[:2])}" if declared else "")
    single_turn = not _section(config, "env").get("source")
    cap = _number(_section(config, "rollout").get("max_new_tokens")) if single_turn else None
    bounds["response_length/mean"] = (0.0, cap)
    captions["response_length/mean"] = "0 and rollout.max_new_tokens" if cap is not None else "0"
    return bounds, captions


def _fmt(v: Any) -> str:
    x = _number(v)
    if x is None:
        return html.escape("—" if v is None else str(v))
    return f"{x:.4g}"


def _text(v: Any) -> str:
    s = "" if v is None else str(v)
    s = s if len(s) <= MAX_CHARS else s[:MAX_CHARS] + f" … [{len(s) - MAX_CHARS} more characters]"
    return f"<pre>{html.escape(s)}</pre>"


def _figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (7.0, 3.6)):
    """A matplotlib figure on the Agg canvas, without pyplot (no global backend state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols if ncols > 1 else size[0], size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def tick_labels(values: list[float]) -> list[str]:
    """Each tick's own value with the fewest significant digits (2 to 10) that tell the ticks apart; a tick
    within 1e-9 of the largest from 0 is "0" (float noise of the tick arithmetic)."""
    scale = max((abs(v) for v in values), default=0.0)
    values = [0.0 if abs(v) <= 1e-9 * scale else v for v in values]
    labels = [f"{v:.2g}" for v in values]
    for digits in range(2, 11):
        labels = [f"{v:.{digits}g}" for v in values]
        if len(set(labels)) == len(labels):
            break
    return labels


def _style(ax: Any, xs: list[float], ys: list[float]) -> None:
    """Integer step ticks; y labels by :func:`tick_labels`; a near-constant ``ys`` in a fixed range."""
    from matplotlib.ticker import Formatter, FuncFormatter, MaxNLocator

    class Labels(Formatter):
        def __call__(self, x, pos=None):
            return tick_labels([x])[0]

        def format_ticks(self, values):
            return tick_labels(list(values))

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}"))
    if xs and max(xs) - min(xs) < 2:
        ax.set_xlim(min(xs) - 1, max(xs) + 1)
    ax.yaxis.set_major_formatter(Labels())
    if ys:
        lo, hi = min(ys), max(ys)
        mid = (lo + hi) / 2
        if hi - lo <= NEAR_CONSTANT * abs(mid):  # includes an exactly constant series
            half = FIXED_RANGE * abs(mid) if mid != 0 else FIXED_RANGE
            ax.set_ylim(mid - half, mid + half)


def _draw(ax: Any, series: Series, keys: list[str], title: str, bounds: dict[str, Bounds],
          legend: bool = True) -> None:
    all_x, all_y = [], []
    for k in keys:
        xs, ys = series[k]
        ax.plot(xs, ys, "-o" if len(xs) <= 20 else "-", markersize=3, label=k)
        all_x += xs
        all_y += ys
        band = BANDS.get(k)
        if band in series:
            std = dict(zip(*series[band]))
            low, high = bounds.get(k, (None, None))
            pts = [(x, y - std[x], y + std[x]) for x, y in zip(xs, ys) if x in std]
            pts = [(x, lo if low is None else max(low, lo), hi if high is None else min(high, hi))
                   for x, lo, hi in pts]
            if pts:
                ax.fill_between([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], alpha=0.25,
                                label=f"± {band}")
                all_y += [p[1] for p in pts] + [p[2] for p in pts]
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    _style(ax, all_x, all_y)
    if legend and (len(keys) > 1 or any(BANDS.get(k) in series for k in keys)):
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                  ncol=1 if len(keys) <= 12 else 2)


def plot_metrics(series: Series, bounds: dict[str, Bounds] | None = None,
                 captions: dict[str, str] | None = None) -> list[Plot]:
    """The plots of the page in order: fixed plots (reward, KL to the reference, approx_kl, response length,
    loss), one per ``rubric/<item>/<stat>`` statistic (a line per item), then every other numeric key as small
    multiples. ``bounds``: per banded key, the (low, high) its band is clipped to (:func:`band_bounds`)."""
    bounds, captions = bounds or {}, captions or {}
    plots, used = [], set(BANDS.values())
    for stem, title, keys in FIXED_PLOTS:
        present = [k for k in keys if k in series]
        used.update(keys)
        if not present:
            plots.append(Plot(stem, title, None, "not logged in this run"))
            continue
        fig, axes = _figure()
        _draw(axes[0][0], series, present, title, bounds)
        banded = [k for k in present if BANDS.get(k) in series]
        caption = "; ".join(f"band: {k} ± {BANDS[k]}, clipped to {_clip_text(bounds.get(k))}"
                            + (f" ({captions[k]})" if k in captions else "") for k in banded)
        plots.append(Plot(stem, title, fig, caption))
    rubric: dict[str, list[str]] = defaultdict(list)
    for k in sorted(series):
        if k.startswith("rubric/"):
            rubric[k.rsplit("/", 1)[-1] if k.count("/") >= 2 else "value"].append(k)
            used.add(k)
    for stat, keys in rubric.items():
        fig, axes = _figure(size=(8.0, 4.0))
        _draw(axes[0][0], series, keys, f"rubric: {stat}", bounds)
        plots.append(Plot("rubric_" + "".join(c if c.isalnum() else "_" for c in stat), f"rubric: {stat}", fig))
    rest = [k for k in sorted(series) if k not in used]
    if rest:
        ncols = min(4, len(rest))
        nrows = math.ceil(len(rest) / ncols)
        fig, axes = _figure(ncols, nrows, size=(3.2, 2.4))
        for i, ax in enumerate(ax for row in axes for ax in row):
            if i < len(rest):
                _draw(ax, series, [rest[i]], rest[i], bounds, legend=False)
            else:
                ax.set_visible(False)
        plots.append(Plot("other_metrics", "other metrics", fig))
    return plots


def _clip_text(b: Bounds | None) -> str:
    low, high = b or (None, None)
    return f"[{'-inf' if low is None else f'{low:.4g}'}, {'inf' if high is None else f'{high:.4g}'}]"


def _embed(plot: Plot) -> str:
    """The plot as an ``<img>`` with an inline PNG data URI (or its note when it has no figure)."""
    if plot.figure is None:
        return f'<p class="note">{html.escape(plot.title)}: {html.escape(plot.caption)}.</p>'
    buf = io.BytesIO()
    plot.figure.savefig(buf, format="png", dpi=90)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    caption = f"<figcaption>{html.escape(plot.caption)}</figcaption>" if plot.caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(plot.stem)}">{caption}</figure>'


def duration(seconds: float) -> str:
    """``42.0 s``, ``12.6 min`` or ``3.20 h``."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def wall_time(run_dir: Path, series: Series) -> str:
    """The run's measured wall time: ``summary.json`` (written when the run ended), else the last row's
    ``time/elapsed_s`` (a run still going, or killed); a run that recorded neither says so."""
    summary = _read_json(run_dir / "summary.json")
    wall = _number(summary.get("wall_s")) if isinstance(summary, dict) else None
    if wall is not None:
        parts = [f"from {summary.get('started', '?')} to {summary.get('ended', '?')}"]
        training = _number(summary.get("training_s"))
        if training is not None:
            parts.append(f"training steps {duration(training)}")
        resumed = _number(summary.get("resumed_at_s"))
        if resumed:
            parts.append(f"resumed: {duration(resumed)} recorded before the resume")
        return f"{duration(wall)} ({'; '.join(parts)})"
    if "time/elapsed_s" in series:
        steps, values = series["time/elapsed_s"]
        return f"{duration(values[-1])} to step {steps[-1]:.0f} (no summary.json: the run has not ended)"
    return "not recorded"


def _header(run_dir: Path, config: dict[str, Any], rows: list[dict[str, Any]], series: Series) -> str:
    model = config.get("model", {})
    model_name = model.get("name") if isinstance(model, dict) else model
    steps = [s for s in (_number(r.get("step")) for r in rows) if s is not None]
    items = [("run", str(run_dir)), ("algorithm", config.get("algorithm", "?")), ("model", model_name or "?"),
             ("steps", f"{int(max(steps)) if steps else 0} ({len(rows)} logged rows)"),
             ("wall time", wall_time(run_dir, series))]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in items)
    return f"<h1>rlmt run report</h1><table>{body}</table>"


def _eval_table(run_dir: Path) -> str:
    before, after = (_read_json(run_dir / f"eval-{w}.json") for w in ("before", "after"))
    before, after = (d if isinstance(d, dict) else {} for d in (before, after))
    if not before and not after:
        return '<h2>Evaluation</h2><p class="note">No eval-before.json / eval-after.json in this run.</p>'
    rows = []
    for k in list(dict.fromkeys([*before, *after])):
        b, a = _number(before.get(k)), _number(after.get(k))
        delta = f"{a - b:+.4g}" if a is not None and b is not None else ""
        rows.append(f"<tr><td>{html.escape(str(k))}</td><td>{_fmt(before.get(k))}</td>"
                    f"<td>{_fmt(after.get(k))}</td><td>{delta}</td></tr>")
    return ("<h2>Evaluation</h2><table><tr><th>metric</th><th>before</th><th>after</th><th>change</th></tr>"
            + "".join(rows) + "</table>")


def _shown(sample: dict[str, Any]) -> str:
    """A sample's response, or a multi-turn episode's whole conversation (``details.transcript``: every
    message after the first user turn, role by role, each escaped), with its turn and tool counts."""
    details = sample.get("details") if isinstance(sample.get("details"), dict) else {}
    transcript = details.get("transcript")
    if not isinstance(transcript, list):
        return _text(sample.get("response"))
    first_user = next((i for i, m in enumerate(transcript) if isinstance(m, dict) and m.get("role") == "user"), -1)
    turns = [m for m in transcript[first_user + 1:] if isinstance(m, dict)]
    body = "".join(f'<div class="turn"><b>{html.escape(str(m.get("role")))}</b>{_text(m.get("content"))}</div>'
                   for m in turns)
    counts = ", ".join(f"{k.replace('_', ' ')} {details[k]}" for k in ("turns", "tool_calls", "tool_errors",
                                                                     "truncated") if k in details)
    return f'{body}<p class="note">{html.escape(counts)}</p>'


def _samples_table(run_dir: Path) -> str:
    before, after = (_read_samples(run_dir / f"eval-{w}.jsonl") for w in ("before", "after"))
    prompts = [p for p in before if p in after] or list(before or after)
    if not prompts:
        return '<h2>Samples</h2><p class="note">No eval-before.jsonl / eval-after.jsonl in this run.</p>'
    rows = []
    for p in prompts[:MAX_SAMPLES]:
        cells = []
        for side in (before, after):
            s = side.get(p)
            cells.append(f"<td>{_shown(s)}reward: {_fmt(s.get('reward'))}</td>" if s
                         else '<td class="note">no sample</td>')
        rows.append(f"<tr><td>{_text(p)}</td>{''.join(cells)}</tr>")
    return (f"<h2>Samples (first {min(len(prompts), MAX_SAMPLES)} prompts)</h2><table><tr><th>prompt</th>"
            "<th>before</th><th>after</th></tr>" + "".join(rows) + "</table>")


def write_report(run_dir: Path, output: Path | None = None) -> Path:
    """Write an HTML report of ``run_dir`` to ``output`` (default ``run_dir/report.html``); returns its path.

    Raises FileNotFoundError (naming the path) when ``run_dir`` or its ``metrics.jsonl`` is missing.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path}: no metrics.jsonl in the run directory")
    output = Path(output) if output is not None else run_dir / "report.html"
    config = _read_config(run_dir / "config.yaml")
    rows = read_metrics(metrics_path)
    series = metric_series(rows)
    parts = [_header(run_dir, config, rows, series)]
    if not config:
        parts.append('<p class="note">No readable config.yaml in this run.</p>')
    parts.append(_eval_table(run_dir))
    parts.append("<h2>Training metrics</h2>")
    if series:
        parts += [_embed(p) for p in plot_metrics(series, *band_bounds(run_dir, config, series))]
    else:
        parts.append(f'<p class="note">{html.escape(str(metrics_path))} holds no numeric metrics.</p>')
    parts.append(_samples_table(run_dir))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(f'<!doctype html><html><head><meta charset="utf-8"><title>rlmt report: '
                      f"{html.escape(run_dir.name)}</title><style>{CSS}</style></head><body>\n"
                      + "\n".join(parts) + "\n</body></html>\n")
    return output
