"""Reading, validating and tokenizing rows.

Row kinds (DESIGN.md, "The user's surface"):

- prompt rows: ``prompt`` (text, or a list of chat messages) plus task fields (``answer``, ``tests``, ...);
- SFT rows: ``prompt`` + ``completion``, or ``messages`` whose last message is the assistant's reply;
- preference rows: ``prompt``, ``chosen``, ``rejected``;
- step rows (process reward models): ``prompt``, ``steps`` (non-empty strings), ``labels`` (numbers in
  [0, 1] or booleans, one per step).

Every row is validated before any training starts. A problem raises :class:`DataError` naming the file,
the line and the field; with ``on_invalid="skip"`` the row is dropped and counted instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

RowKind = Literal["prompt", "sft", "preference", "steps"]


class DataError(ValueError):
    """Bad input data: names the file, line and field."""

    def __init__(self, file: str, line: int, field_name: str | None, message: str):
        self.file, self.line, self.field, self.message = file, line, field_name, message
        where = f"{file}:{line}"
        super().__init__(f"{where}: field {field_name!r}: {message}" if field_name else f"{where}: {message}")


@dataclass
class Row:
    """A validated row and where it came from."""

    data: dict[str, Any]
    file: str
    line: int


@dataclass
class LoadReport:
    """What was read and what was filtered (``skipped`` maps a reason to its count)."""

    rows: list[Row]
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _read_raw(path: str) -> Iterable[tuple[int, Any]]:
    if not str(path):  # Path("") is "." and exists; say what is missing instead
        raise DataError("<none>", 0, None, "no data file given: set data.train (or data.eval)")
    p = Path(path)
    if not p.exists():
        raise DataError(path, 0, None, "file does not exist")
    if p.suffix in (".jsonl", ".ndjson"):
        with p.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    yield lineno, DataError(path, lineno, None, f"malformed JSON ({e.msg} at column {e.colno})")
        return
    if p.suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(path, e.lineno, None, f"malformed JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DataError(path, 1, None, "a .json data file must hold a list of rows")
        yield from enumerate(data, 1)
        return
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise DataError(path, 0, None, "not .jsonl/.json; reading other formats needs `pip install datasets`") from None
    kind = {".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}.get(p.suffix)
    if kind is None:
        raise DataError(path, 0, None, f"unsupported data file type {p.suffix!r}")
    ds = datasets.load_dataset(kind, data_files=str(p), split="train")
    yield from (((i + 2 if kind == "csv" else i + 1), dict(r)) for i, r in enumerate(ds))


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
    return None


def load_rows(path: str, kind: RowKind, on_invalid: str = "error", limit: int = 0) -> LoadReport:
    """Read and validate every row of ``path``; raise :class:`DataError` on the first bad one (or skip it)."""
    report = LoadReport(rows=[])
    for lineno, raw in _read_raw(path):
        if limit and len(report.rows) >= limit:
            break
        if isinstance(raw, DataError):
            if on_invalid == "skip":
                report.skip("malformed JSON")
                continue
            raise raw
        bad = validate_row(raw, kind)
        if bad:
            if on_invalid == "skip":
                report.skip(f"{bad[0]}: {bad[1]}")
                continue
            raise DataError(path, lineno, bad[0], bad[1])
        report.rows.append(Row(raw, path, lineno))
    if not report.rows:
        raise DataError(path, 0, None, "no valid rows")
    return report
