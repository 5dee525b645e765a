"""Where rows come from: data files, ``save_to_disk`` directories and hub datasets, read into plain dicts.

``data.train`` / ``data.eval`` name one of:

- a JSONL file (``.jsonl``, ``.ndjson``) or a ``.json`` list: positions are text lines;
- a CSV file (``.csv``): every cell is the text written there, so ``007`` and ``1e3`` stay strings; the fields
  rlmt reads as lists (``prompt`` and ``messages`` as chat messages, ``steps``, ``labels``, ``tests``) or as a
  number (``reward``) are decoded from a JSON cell when the cell holds one of that kind. Positions are the
  line a record starts on (the header is line 1);
- a Parquet or Arrow file (``.parquet``, ``.arrow``), typed by its own schema, read with ``datasets``;
- a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (a DatasetDict's split:
  ``data.split``, ``data.eval_split`` for ``data.eval``);
- a Hugging Face hub dataset id (``org/name``, not an existing path, no data-file suffix), read with
  ``datasets.load_dataset(name, data.subset, split=...)``: the user's ``HF_DATASETS_OFFLINE``,
  ``HF_HUB_OFFLINE`` and cache apply, nothing here sets them.

A dataset's positions are rows, counted from 1. ``data.columns`` ({rlmt field: source column}) renames
columns on every row before it is checked; an error about such a field names the column too.

What a text file is made of is checked: a line that is not UTF-8 (named with the byte and its column), an
integer longer than Python parses (``sys.get_int_max_str_digits()``, 4300 digits by default: write it as a
string) and JSON nested too deeply are row problems (skippable); a NUL byte means a binary file and stops the
read whatever ``data.on_invalid`` says.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".arrow", ".txt", ".tsv")
"""Suffixes that make a name a file path, never a hub id (``.txt``, ``.tsv``: refused as unsupported)."""

# org/name as the hub spells a repository id (huggingface_hub.utils.validate_repo_id)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


class Origin(str):
    """Where rows came from, as errors show it (a path; ``name, split S`` for a dataset), and how to point into
    it: ``unit`` "line" (a text file's line: ``file:12``) or "row" (a dataset's row from 1: ``name, row 12``);
    ``columns``: rlmt field -> the source column it was read from (``data.columns``). A ``str`` everywhere
    else."""

    unit: str
    columns: dict[str, str]

    def __new__(cls, text: str, unit: str = "line", columns: Mapping[str, str] | None = None) -> "Origin":
        obj = super().__new__(cls, text)
        obj.unit, obj.columns = unit, dict(columns or {})
        return obj

    def __reduce__(self):
        return Origin, (str(self), self.unit, self.columns)


class DataError(ValueError):
    """Bad input data: names the file, line (a dataset's row) and field, and the source column of a renamed
    field (a problem of the whole file has line 0 and no line)."""

    def __init__(self, file: str, line: int, field_name: str | None, message: str):
        self.file, self.line, self.field, self.message = file, line, field_name, message
        row = getattr(file, "unit", "line") == "row"
        where = (f"{file}, row {line}" if row else f"{file}:{line}") if line else file
        column = getattr(file, "columns", {}).get(field_name) if field_name else None
        named = f"{field_name!r} (column {column!r})" if column else repr(field_name)
        super().__init__(f"{where}: field {named}: {message}" if field_name else f"{where}: {message}")


@dataclass(frozen=True)
class SourceOptions:
    """How a dataset source is read: ``split`` and ``subset`` of a hub dataset or a DatasetDict directory
    (``split_key``: the config key that chose the split, for errors), and ``columns`` {rlmt field: source
    column} renamed on every row of any source."""

    split: str = "train"
    subset: str | None = None
    columns: Mapping[str, str] = field(default_factory=dict)
    split_key: str = "data.split"

    @classmethod
    def of(cls, data: Any, which: str = "train") -> "SourceOptions":
        """The options of ``data.train`` (``which="train"``) or ``data.eval`` from the config's data section."""
        if which == "eval":
            return cls(data.eval_split, data.subset or None, dict(data.columns), "data.eval_split")
        return cls(data.split, data.subset or None, dict(data.columns), "data.split")


class RowProblem(ValueError):
    """A position that could not be read as a row: the reason counted when skipping, and the message."""

    def __init__(self, reason: str, message: str):
        self.reason, self.message = reason, message
        super().__init__(message)


@dataclass
class OpenedSource:
    """A source ready to read: its :class:`Origin` and (position, row dict or the :class:`RowProblem` there)."""

    origin: Origin
    rows: Iterable[tuple[int, Any]]


def is_hub_dataset_id(name: str) -> bool:
    """Whether ``name`` reads as a hub dataset id: ``org/name``, no data-file suffix, no existing path."""
    return (bool(_HUB_ID.match(name)) and Path(name).suffix not in DATA_SUFFIXES and "--" not in name
            and ".." not in name and not Path(name).expanduser().exists())


def open_source(path: str, options: SourceOptions = SourceOptions()) -> OpenedSource:
    """Open ``path`` as the module docstring says; a problem of the whole source is a :class:`DataError`."""
    if not str(path):  # Path("") is "." and exists; say what is missing instead
        raise DataError("<none>", 0, None, "no data file given: set data.train (or data.eval)")
    p = Path(path)
    columns = dict(options.columns)
    if not p.exists():
        if is_hub_dataset_id(str(path)):
            return _hub_dataset(str(path), options)
        raise DataError(path, 0, None, "file does not exist")
    if p.is_dir():
        return _disk_dataset(str(path), options)
    origin = Origin(str(path), "line", columns)
    if p.suffix in (".jsonl", ".ndjson"):
        return OpenedSource(origin, _renamed(_read_jsonl(origin), columns))
    if p.suffix == ".json":
        return OpenedSource(origin, _renamed(_read_json_list(origin), columns))
    if p.suffix == ".csv":
        return OpenedSource(origin, _typed_cells(_renamed(_read_csv(origin), columns)))
    return _file_dataset(origin, p.suffix)


# ------------------------------------------------------------------------------------------ text files


def _digits_limit() -> int:
    return sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 4300


def _parse_json(text: str) -> Any:
    """``json.loads`` with the failures that are not JSONDecodeError turned into :class:`RowProblem`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RowProblem("malformed JSON", f"malformed JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:  # int(str) past the digit limit
        if "digits" not in str(e):
            raise RowProblem("malformed JSON", f"malformed JSON ({e})") from None
        raise RowProblem("number too long", f"a number with more than {_digits_limit()} digits (Python's limit "
                                            "for reading an integer); write it as a string") from None
    except RecursionError:
        raise RowProblem("nested too deeply", "JSON nested too deeply to read") from None


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


def _read_jsonl(path: Origin) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
            bad = _bytes_problem(raw)
            if bad is not None:
                if bad[1]:
                    raise DataError(path, lineno, None, bad[2])
                yield lineno, RowProblem("not UTF-8 text", bad[2])
                continue
            text = raw.decode("utf-8")
            if not text.strip():
                continue
            try:
                yield lineno, _parse_json(text)
            except RowProblem as p:
                yield lineno, p


def _json_error_line(text: str, problem: RowProblem) -> int:
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


def _utf8_text(path: Origin) -> str:
    """The whole file as text (a byte order mark dropped); a NUL or undecodable byte is a DataError at its line."""
    data = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")
    bad = _bytes_problem(data)
    if bad is not None:
        raise DataError(path, data.count(b"\n", 0, bad[0]) + 1, None, bad[2])
    return data.decode("utf-8")


def _read_json_list(path: Origin) -> Iterator[tuple[int, Any]]:
    text = _utf8_text(path)
    try:
        rows = _parse_json(text)
    except RowProblem as p:
        raise DataError(path, _json_error_line(text, p), None, p.message) from None
    if not isinstance(rows, list):
        raise DataError(path, 1, None, "a .json data file must hold a list of rows")
    yield from enumerate(rows, 1)


def _read_csv(path: Origin) -> Iterator[tuple[int, Any]]:
    """(line a record starts on, {column: cell text}) of every non-blank record after the header."""
    reader = csv.reader(io.StringIO(_utf8_text(path), newline=""), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise DataError(path, reader.line_num, None, f"malformed CSV header ({e})") from None
    if not header or not any(h.strip() for h in header):
        raise DataError(path, 1, None, "no header row (a CSV data file names its columns on line 1)")
    if len(set(header)) != len(header):
        twice = sorted({h for h in header if header.count(h) > 1})
        raise DataError(path, 1, None, f"the header names a column more than once: {twice}")
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield start, RowProblem("malformed CSV", f"malformed CSV ({e})")
            continue
        if not cells or cells == [""]:
            continue
        if len(cells) != len(header):
            yield start, RowProblem("malformed CSV", f"malformed CSV ({len(cells)} cells for the header's "
                                                     f"{len(header)} columns)")
            continue
        yield start, dict(zip(header, cells))


def _chat(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


# Fields rlmt reads as lists or numbers, and which JSON a CSV cell of that field is decoded to (a prompt only
# when it is a chat: a list of message objects).
_STRUCTURED_CELLS: dict[str, Callable[[Any], bool]] = {
    "prompt": _chat, "messages": _chat,
    "steps": lambda v: isinstance(v, list), "labels": lambda v: isinstance(v, list),
    "tests": lambda v: isinstance(v, list),
    "reward": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


def _typed_cells(rows: Iterable[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
    """CSV rows with the structured fields (:data:`_STRUCTURED_CELLS`) decoded where the cell holds that JSON;
    every other cell stays the text written."""
    for n, row in rows:
        if isinstance(row, dict):
            row = dict(row)
            for key, wanted in _STRUCTURED_CELLS.items():
                if isinstance(row.get(key), str):
                    try:
                        value = json.loads(row[key])
                    except (ValueError, RecursionError):
                        continue
                    if wanted(value):
                        row[key] = value
        yield n, row


def _renamed(rows: Iterable[tuple[int, Any]], columns: Mapping[str, str]) -> Iterator[tuple[int, Any]]:
    """Rows with ``columns`` {rlmt field: source column} applied: each field takes its column's value (the
    column no longer appears under its own name; a field absent from the source stays absent)."""
    for n, row in rows:
        if columns and isinstance(row, dict):
            mapped = set(columns.values())
            out = {k: v for k, v in row.items() if k not in mapped}
            out.update({f: row[c] for f, c in columns.items() if c in row})
            row = out
        yield n, row


# ------------------------------------------------------------------------------------------ datasets


def _datasets(origin: str, what: str):
    try:
        import datasets
    except ImportError:
        raise DataError(origin, 0, None, f"reading {what} needs the datasets library: "
                                         "`pip install datasets` (or rlmt[datasets])") from None
    return datasets


def _dataset_rows(ds, origin: Origin, columns: Mapping[str, str], first: int = 1) -> OpenedSource:
    rows = ((i + first, dict(r)) for i, r in enumerate(ds))
    return OpenedSource(origin, _renamed(rows, columns))


def _file_dataset(origin: Origin, suffix: str) -> OpenedSource:
    kind = {".parquet": "parquet", ".arrow": "arrow"}.get(suffix)
    if kind is None:
        raise DataError(origin, 0, None, f"unsupported data file type {suffix!r} (read: .jsonl, .json, .csv, "
                                         ".parquet, .arrow, a save_to_disk directory, a hub dataset id)")
    datasets = _datasets(origin, f"{kind} files")
    try:
        ds = datasets.load_dataset(kind, data_files=str(origin), split="train")
    except Exception as e:  # noqa: BLE001 - any reader failure is this file's problem
        raise DataError(origin, 0, None, f"cannot be read as {kind}: {type(e).__name__}: {_first_line(e)}") from None
    return _dataset_rows(ds, Origin(origin, "row", origin.columns), dict(origin.columns))


def _disk_dataset(path: str, options: SourceOptions) -> OpenedSource:
    """A ``save_to_disk`` directory: a Dataset, or a DatasetDict read at ``options.split``."""
    d = Path(path)
    if not ((d / "dataset_dict.json").exists() or (d / "state.json").exists()):
        raise DataError(path, 0, None, "is a directory, not a data file or a directory written by "
                                       "Dataset.save_to_disk")
    datasets = _datasets(path, "a save_to_disk directory")
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001
        raise DataError(path, 0, None, f"cannot be read by datasets.load_from_disk: {type(e).__name__}: "
                                       f"{_first_line(e)}") from None
    name = path
    if isinstance(ds, datasets.DatasetDict):
        if options.split not in ds:
            raise DataError(path, 0, None, f"{options.split_key}={options.split!r}: no such split; it has "
                                           f"{sorted(ds)}")
        ds, name = ds[options.split], f"{path}, split {options.split}"
    return _dataset_rows(ds, Origin(name, "row", options.columns), options.columns)


def _hub_dataset(name: str, options: SourceOptions) -> OpenedSource:
    """``datasets.load_dataset(name, subset, split=split)``; one DataError line when it cannot be had."""
    datasets = _datasets(name, "a hub dataset")
    try:
        ds = datasets.load_dataset(name, options.subset, split=options.split)
    except Exception as e:  # noqa: BLE001 - offline, no such dataset, subset or split: all one line
        raise DataError(name, 0, None, _hub_problem(name, options, e, datasets)) from None
    label = f"{name}, {f'subset {options.subset}, ' if options.subset else ''}split {options.split}"
    return _dataset_rows(ds, Origin(label, "row", options.columns), options.columns)


def _hub_problem(name: str, options: SourceOptions, error: Exception, datasets) -> str:
    text = _first_line(error)
    if "unknown split" in text.lower():
        return f"{options.split_key}={options.split!r}: {text}"
    if "config" in text.lower():  # no such subset, or one is needed
        return f"{f'data.subset={options.subset!r}' if options.subset else 'data.subset (not set)'}: {text}"
    offline = getattr(datasets.config, "HF_HUB_OFFLINE", False)
    where = (f" (offline, and not in the datasets cache {datasets.config.HF_DATASETS_CACHE})" if offline else "")
    return f"not a local file or directory, and the hub dataset could not be loaded{where}: {text}"


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
