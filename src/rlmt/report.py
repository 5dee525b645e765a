"""An HTML report of one run directory: header, before/after eval table, metric plots, sample responses.

``write_report(run_dir)`` reads ``config.yaml``, ``metrics.jsonl`` and, when present, ``eval-{before,after}.json``
and ``eval-{before,after}.jsonl``; it writes ``RUN_DIR/report.html`` and its PNGs under ``RUN_DIR/report/``.
Missing pieces become a note in the page; only a missing run directory or ``metrics.jsonl`` is an error.
Every string from the run (prompts, responses, keys) is HTML-escaped: responses are untrusted model output.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from rlmt.records import read_metrics

Series = dict[str, tuple[list[float], list[float]]]  # key -> (steps, values), finite values only
MAX_SAMPLES = 8
MAX_CHARS = 2000  # of one shown response or prompt
# (file stem, title, keys drawn as lines); "reward/std" is drawn as a band around "reward/mean".
FIXED_PLOTS = [("reward", "reward", ["reward/mean"]), ("kl", "KL to reference", ["kl", "approx_kl"]),
               ("response_length", "response length (tokens)", ["response_length/mean"]), ("loss", "loss", ["loss"])]
BANDS = {"reward/mean": "reward/std", "response_length/mean": "response_length/std"}
CSS = ("body{font-family:sans-serif;margin:2em;max-width:1300px}table{border-collapse:collapse;margin:1em 0}"
       "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}"
       "pre{white-space:pre-wrap;margin:0;max-width:560px}.note{color:#777;font-style:italic}img{max-width:100%}")


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


def _read_samples(path: Path) -> dict[str, dict[str, Any]]:
    """The first sample per prompt of an eval JSONL file, in file order."""
    first: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return first
    for line in path.read_text().splitlines():
        try:
            s = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(s, dict) and "prompt" in s:
            first.setdefault(str(s["prompt"]), s)
    return first


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


def _draw(ax: Any, series: Series, keys: list[str], title: str) -> None:
    for k in keys:
        xs, ys = series[k]
        style = "-o" if len(xs) <= 20 else "-"
        ax.plot(xs, ys, style, markersize=3, label=k)
        band = BANDS.get(k)
        if band in series:
            std = dict(zip(*series[band]))
            pts = [(x, y, std[x]) for x, y in zip(xs, ys) if x in std]
            if pts:
                ax.fill_between([p[0] for p in pts], [p[1] - p[2] for p in pts], [p[1] + p[2] for p in pts],
                                alpha=0.25, label=f"± {band}")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(keys) > 1 or any(BANDS.get(k) in series for k in keys):
        ax.legend(fontsize=7)


def _save(fig: Any, plot_dir: Path, stem: str, html_dir: Path) -> str:
    path = plot_dir / f"{stem}.png"
    fig.savefig(path, dpi=90)
    rel = os.path.relpath(path, html_dir).replace(os.sep, "/")
    return f'<img src="{html.escape(rel)}" alt="{html.escape(stem)}">'


def plot_metrics(series: Series, plot_dir: Path, html_dir: Path) -> list[str]:
    """PNG plots of the metrics under ``plot_dir``; returns HTML fragments (images and notes) in page order.

    Fixed plots (reward, KL, response length, loss), then one plot per ``rubric/<item>/<stat>`` statistic
    (a line per item), then every other numeric key as small multiples.
    """
    plot_dir.mkdir(parents=True, exist_ok=True)
    parts, used = [], set(BANDS.values())
    for stem, title, keys in FIXED_PLOTS:
        present = [k for k in keys if k in series]
        used.update(keys)
        if not present:
            parts.append(f'<p class="note">{html.escape(title)}: not logged in this run.</p>')
            continue
        fig, axes = _figure()
        _draw(axes[0][0], series, present, title)
        parts.append(_save(fig, plot_dir, stem, html_dir))
    rubric: dict[str, list[str]] = defaultdict(list)
    for k in sorted(series):
        if k.startswith("rubric/"):
            rubric[k.rsplit("/", 1)[-1] if k.count("/") >= 2 else "value"].append(k)
            used.add(k)
    for stat, keys in rubric.items():
        fig, axes = _figure(size=(7.0, 4.0))
        _draw(axes[0][0], series, keys, f"rubric: {stat}")
        axes[0][0].legend(fontsize=6, ncol=2)
        parts.append(_save(fig, plot_dir, "rubric_" + "".join(c if c.isalnum() else "_" for c in stat), html_dir))
    rest = [k for k in sorted(series) if k not in used]
    if rest:
        ncols = min(4, len(rest))
        nrows = math.ceil(len(rest) / ncols)
        fig, axes = _figure(ncols, nrows, size=(3.2, 2.4))
        for i, ax in enumerate(ax for row in axes for ax in row):
            if i < len(rest):
                _draw(ax, series, [rest[i]], rest[i])
            else:
                ax.set_visible(False)
        parts.append(_save(fig, plot_dir, "other_metrics", html_dir))
    return parts


def _header(run_dir: Path, config: dict[str, Any], rows: list[dict[str, Any]], series: Series) -> str:
    model = config.get("model", {})
    model_name = model.get("name") if isinstance(model, dict) else model
    steps = [s for s in (_number(r.get("step")) for r in rows) if s is not None]
    items = [("run", str(run_dir)), ("algorithm", config.get("algorithm", "?")), ("model", model_name or "?"),
             ("steps", f"{int(max(steps)) if steps else 0} ({len(rows)} logged rows)")]
    for key in ("time/elapsed_s", "wall_time_s"):
        if key in series:
            items.append(("wall time", f"{series[key][1][-1] / 60:.1f} min"))
            break
    else:
        if "time/step_s" in series:
            items.append(("wall time", f"{sum(series['time/step_s'][1]) / 60:.1f} min (sum of step times)"))
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
            cells.append(f"<td>{_text(s.get('response'))}reward: {_fmt(s.get('reward'))}</td>" if s
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
        parts += plot_metrics(series, (run_dir / "report").resolve(), output.parent.resolve())
    else:
        parts.append(f'<p class="note">{html.escape(str(metrics_path))} holds no numeric metrics.</p>')
    parts.append(_samples_table(run_dir))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(f'<!doctype html><html><head><meta charset="utf-8"><title>rlmt report: '
                      f"{html.escape(run_dir.name)}</title><style>{CSS}</style></head><body>\n"
                      + "\n".join(parts) + "\n</body></html>\n")
    return output

