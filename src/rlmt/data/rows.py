"""Reading, validating and tokenizing rows.

Row kinds (DESIGN.md, "The user's surface"):

- prompt rows: ``prompt`` (text, or a list of chat messages) plus task fields (``answer``, ``tests``, ...);
- SFT rows: ``prompt`` + ``completion``, or ``messages`` whose last message is the assistant's reply;
- preference rows: ``prompt``, ``chosen``, ``rejected`` (two different completions: a pair whose chosen
  equals its rejected carries no preference and would only dilute the step with a zero-gradient term);
- step rows (process reward models): ``prompt``, ``steps`` (non-empty strings), ``labels`` (numbers in
  [0, 1] or booleans, one per step).

Every row is validated before any training starts. A problem raises :class:`DataError` naming the file,
the line (a dataset's row) and the field, and the source column of a field renamed by ``data.columns``; with
``on_invalid="skip"`` the row is dropped and counted instead. Where rows are read from (JSONL, JSON, CSV,
Parquet, ``save_to_disk`` directories, hub datasets) and what a file must be made of is
:mod:`rlmt.data.sources`. A skip that leaves no row is an error that counts what was dropped, by reason
(:meth:`LoadReport.require`), at each stage that filters (reading, prompt length, tokenizing). Fields a
reward source reads are checked by :func:`check_fields` with the data, before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

from rlmt.data.sources import DataError, RowProblem, SourceOptions, open_source

RowKind = Literal["prompt", "sft", "preference", "steps"]
FieldCheck = Callable[[Any], "str | None"]
"""A check of one field's value: None when it is fine, else the problem in words."""


@dataclass
class Row:
    """A validated row and where it came from."""

    data: dict[str, Any]
    file: str
    line: int


@dataclass
class LoadReport:
    """What was read and what was filtered (``skipped`` maps a reason to its count; a reason ending in
    "(kept)" counts an adjustment, not a drop)."""

    rows: list[Row]
    skipped: dict[str, int] = field(default_factory=dict)
    file: str = ""

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def dropped(self) -> dict[str, int]:
        """The reasons rows were dropped for, most frequent first."""
        drops = [(r, n) for r, n in self.skipped.items() if not r.endswith("(kept)")]
        return dict(sorted(drops, key=lambda rn: (-rn[1], rn[0])))

    def require(self, left: int) -> None:
        """Raise :class:`DataError` when a stage left ``left == 0`` rows: what was dropped, or that the file
        held none."""
        if left:
            return
        drops = self.dropped()
        if drops:
            summary = ", ".join(f"{reason}: {n}" for reason, n in drops.items())
            raise DataError(self.file, 0, None, f"0 rows left; dropped: {summary}")
        raise DataError(self.file, 0, None, "no rows (the file is empty)")


def _check_text(row: dict, key: str) -> str | None:
    value = row.get(key)
    if key not in row:
        return "missing"
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not value.strip():
        return "must not be empty"
    return None


def _check_messages(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return "must be a non-empty list of {role, content} messages"
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {i} must be an object with string 'role' and 'content'"
        if m["role"] not in ("system", "user", "assistant", "tool"):
            return f"message {i} has unknown role {m['role']!r}"
    return None


def _check_prompt(row: dict) -> tuple[str, str] | None:
    if "prompt" not in row:
        return "prompt", "missing"
    if isinstance(row["prompt"], list):
        err = _check_messages(row["prompt"])
        return ("prompt", err) if err else None
    err = _check_text(row, "prompt")
    return ("prompt", err) if err else None


def _check_steps(row: dict) -> tuple[str, str] | None:
    steps, labels = row.get("steps"), row.get("labels")
    if not isinstance(steps, list) or not steps:
        return "steps", "missing" if "steps" not in row else "must be a non-empty list of strings"
    for i, s in enumerate(steps):
        if not isinstance(s, str) or not s.strip():
            return "steps", f"step {i} must be a non-empty string, got {s!r}"
    if not isinstance(labels, list):
        return "labels", "missing" if "labels" not in row else "must be a list of numbers in [0, 1] or booleans"
    if len(labels) != len(steps):
        return "labels", f"{len(labels)} labels for {len(steps)} steps"
    for i, y in enumerate(labels):
        if not isinstance(y, (bool, int, float)) or not 0 <= y <= 1:
            return "labels", f"label {i} must be a number in [0, 1] or a boolean, got {y!r}"
    return None


def validate_row(row: Any, kind: RowKind) -> tuple[str | None, str] | None:
    """Return (field, problem) for an invalid row, None for a valid one."""
    if not isinstance(row, dict):
        return None, f"a row must be a JSON object, got {type(row).__name__}"
    if kind == "sft" and "messages" in row and "completion" not in row:
        err = _check_messages(row["messages"])
        if err:
            return "messages", err
        if row["messages"][-1]["role"] != "assistant" or not row["messages"][-1]["content"].strip():
            return "messages", "the last message must be a non-empty assistant reply"
        return None
    bad = _check_prompt(row)
    if bad:
        return bad
    if kind == "steps":
        return _check_steps(row)
    keys = {"prompt": [], "sft": ["completion"], "preference": ["chosen", "rejected"]}[kind]
    for key in keys:
        err = _check_text(row, key)
        if err:
            return key, err
    if kind == "preference" and row["chosen"] == row["rejected"]:
        return "rejected", "identical to 'chosen' (no preference: a zero-gradient pair)"
    return None


def load_rows(path: str, kind: RowKind, on_invalid: str = "error", limit: int = 0,
              source: SourceOptions = SourceOptions()) -> LoadReport:
    """Read and validate every row of ``path`` (any source of :mod:`rlmt.data.sources`, read with ``source``:
    split, subset, column mapping); raise :class:`DataError` on the first bad one (or skip it), and when no
    row is left."""
    opened = open_source(path, source)
    report = LoadReport(rows=[], file=opened.origin)
    for lineno, raw in opened.rows:
        if limit and len(report.rows) >= limit:
            break
        if isinstance(raw, RowProblem):
            if on_invalid == "skip":
                report.skip(raw.reason)
                continue
            raise DataError(opened.origin, lineno, None, raw.message)
        bad = validate_row(raw, kind)
        if bad:
            if on_invalid == "skip":
                report.skip(f"{bad[0]}: {bad[1]}" if bad[0] else bad[1])
                continue
            raise DataError(opened.origin, lineno, bad[0], bad[1])
        report.rows.append(Row(raw, opened.origin, lineno))
    report.require(len(report.rows))
    return report


def check_fields(rows: Sequence[Row], fields: Mapping[str, FieldCheck], reader: str, on_invalid: str = "error",
                 report: LoadReport | None = None) -> list[Row]:
    """The rows whose ``fields`` pass their checks; a row that fails is a :class:`DataError` naming its file,
    line and field and ``reader`` (who needs the field, e.g. "reward source 'math_answer'"), or with
    ``on_invalid="skip"`` dropped and counted in ``report``. A missing field (or a null one) is "missing"."""
    kept = []
    for row in rows:
        problem = None
        for name, check in fields.items():
            value = row.data.get(name)
            problem = "missing" if value is None else check(value)
            if problem:
                break
        if not problem:
            kept.append(row)
        elif on_invalid == "skip":
            if report is not None:
                report.skip(f"{name}: {problem} ({reader})")
        else:
            raise DataError(row.file, row.line, name, f"{problem} ({reader} reads it)")
    return kept
