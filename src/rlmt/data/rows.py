"""Reading, validating and tokenizing rows.

Row kinds (DESIGN.md, "The user's surface"):

- prompt rows: ``prompt`` (text, or a list of chat messages) plus task fields (``answer``, ``tests``, ...);
- SFT rows: ``prompt`` + ``completion``, or ``messages`` whose last message is the assistant's reply;
- preference rows: ``prompt``, ``chosen``, ``rejected`` (two different completions: a pair whose chosen
  equals its rejected carries no preference and would only dilute the step with a zero-gradient term);
- step rows (process reward models): ``prompt``, ``steps`` (non-empty strings), ``labels`` (numbers in
  [0, 1] or booleans, one per step).

Every row is validated before any training starts. A problem raises :class:`DataError` naming the file,
the line and the field; with ``on_invalid="skip"`` the row is dropped and counted instead. What a file is
made of is checked too: a line that is not UTF-8 (named with the byte and its column), an integer longer
than Python parses (``sys.get_int_max_str_digits()``, 4300 digits by default: write it as a string) and JSON
nested too deeply are row problems (skippable); a NUL byte means a binary file and stops the read whatever
``on_invalid`` says. A skip that leaves no row is an error that counts what was dropped, by reason
(:meth:`LoadReport.require`), at each stage that filters (reading, prompt length, tokenizing). Fields a
reward source reads are checked by :func:`check_fields` with the data, before any model loads.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

RowKind = Literal["prompt", "sft", "preference", "steps"]
FieldCheck = Callable[[Any], "str | None"]
"""A check of one field's value: None when it is fine, else the problem in words."""


class DataError(ValueError):
    """Bad input data: names the file, line and field (a problem of the whole file has line 0 and no line)."""

    def __init__(self, file: str, line: int, field_name: str | None, message: str):
        self.file, self.line, self.field, self.message = file, line, field_name, message
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: field {field_name!r}: {message}" if field_name else f"{where}: {message}")


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


class _RowProblem(ValueError):
    """A line that could not be read as a row: the reason counted when skipping, and the message."""

    def __init__(self, reason: str, message: str):
        self.reason, self.message = reason, message
        super().__init__(message)


def _digits_limit() -> int:
    return sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 4300


def _parse_json(text: str) -> Any:
    """``json.loads`` with the failures that are not JSONDecodeError turned into :class:`_RowProblem`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _RowProblem("malformed JSON", f"malformed JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:  # int(str) past the digit limit
        if "digits" not in str(e):
            raise _RowProblem("malformed JSON", f"malformed JSON ({e})") from None
        raise _RowProblem("number too long", f"a number with more than {_digits_limit()} digits (Python's limit "
                                             "for reading an integer); write it as a string") from None
    except RecursionError:
        raise _RowProblem("nested too deeply", "JSON nested too deeply to read") from None


def _bytes_problem(data: bytes) -> tuple[int, bool, str] | None:
    """Where ``data`` stops being UTF-8 text: (byte offset, binary?, the problem), or None. A NUL byte means a
    binary file; an undecodable byte, text in another encoding."""
    nul = data.find(b"\x00")
    if nul >= 0:
        column = nul - (data.rfind(b"\n", 0, nul) + 1) + 1
        return nul, True, f"binary data (a NUL byte at column {column}): not a UTF-8 text file"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        return e.start, False, (f"not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}); "
                                "save the file as UTF-8")
    return None


def _read_jsonl(path: str) -> Iterable[tuple[int, Any]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
            bad = _bytes_problem(raw)
            if bad is not None:
                if bad[1]:
                    raise DataError(path, lineno, None, bad[2])
                yield lineno, _RowProblem("not UTF-8 text", bad[2])
                continue
            text = raw.decode("utf-8")
            if not text.strip():
                continue
            try:
                yield lineno, _parse_json(text)
            except _RowProblem as p:
                yield lineno, p


def _json_error_line(text: str, problem: _RowProblem) -> int:
    """The line of a whole-file JSON failure: the parser's, or the line of the over-long number."""
    if problem.reason == "number too long":
        m = re.search("[0-9]{%d,}" % (_digits_limit() + 1), text)
        return text.count("\n", 0, m.start()) + 1 if m else 1
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        return e.lineno
    except (ValueError, RecursionError):
        pass
    return 1


def _read_json_list(path: str) -> Iterable[tuple[int, Any]]:
    data = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")
    bad = _bytes_problem(data)
    if bad is not None:
        raise DataError(path, data.count(b"\n", 0, bad[0]) + 1, None, bad[2])
    text = data.decode("utf-8")
    try:
        rows = _parse_json(text)
    except _RowProblem as p:
        raise DataError(path, _json_error_line(text, p), None, p.message) from None
    if not isinstance(rows, list):
        raise DataError(path, 1, None, "a .json data file must hold a list of rows")
    yield from enumerate(rows, 1)


def _read_dataset(path: str, suffix: str) -> Iterable[tuple[int, Any]]:
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise DataError(path, 0, None, "not .jsonl/.json; reading other formats needs `pip install datasets`") from None
    kind = {".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}.get(suffix)
    if kind is None:
        raise DataError(path, 0, None, f"unsupported data file type {suffix!r}")
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - any reader failure is this file's problem
        raise DataError(path, 0, None, f"cannot be read as {kind}: {type(e).__name__}: {e}") from None
    yield from (((i + 2 if kind == "csv" else i + 1), dict(r)) for i, r in enumerate(ds))


def _read_raw(path: str) -> Iterable[tuple[int, Any]]:
    """(line, parsed row or the :class:`_RowProblem` of that line) for every non-blank line of ``path``."""
    if not str(path):  # Path("") is "." and exists; say what is missing instead
        raise DataError("<none>", 0, None, "no data file given: set data.train (or data.eval)")
    p = Path(path)
    if not p.exists():
        raise DataError(path, 0, None, "file does not exist")
    if p.is_dir():
        raise DataError(path, 0, None, "is a directory, not a data file")
    if p.suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    if p.suffix == ".json":
        return _read_json_list(path)
    return _read_dataset(path, p.suffix)
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


def load_rows(path: str, kind: RowKind, on_invalid: str = "error", limit: int = 0) -> LoadReport:
    """Read and validate every row of ``path``; raise :class:`DataError` on the first bad one (or skip it), and
    when no row is left."""
    report = LoadReport(rows=[], file=str(path))
    for lineno, raw in _read_raw(path):
        if limit and len(report.rows) >= limit:
            break
        if isinstance(raw, _RowProblem):
            if on_invalid == "skip":
                report.skip(raw.reason)
                continue
            raise DataError(path, lineno, None, raw.message)
        bad = validate_row(raw, kind)
        if bad:
            if on_invalid == "skip":
                report.skip(f"{bad[0]}: {bad[1]}" if bad[0] else bad[1])
                continue
            raise DataError(path, lineno, bad[0], bad[1])
        report.rows.append(Row(raw, path, lineno))
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
