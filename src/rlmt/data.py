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
from typing import Any, Iterable, Literal, Sequence

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


# ---------------------------------------------------------------------------------------------- tokenizing


@dataclass(frozen=True)
class PromptFormat:
    """How rows become token ids: chat template or plain text, and an optional system message."""

    chat: bool = True
    system_prompt: str | None = None

    def messages(self, prompt: str | list) -> list[dict]:
        if isinstance(prompt, list):
            return prompt
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [{"role": "user", "content": prompt}]

    def prompt_text(self, tokenizer, prompt: str | list) -> str:
        if self.chat and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(self.messages(prompt), tokenize=False, add_generation_prompt=True)
        if isinstance(prompt, list):
            return "\n".join(m["content"] for m in prompt) + "\n"
        return prompt


def encode_prompt(tokenizer, fmt: PromptFormat, prompt: str | list) -> list[int]:
    return tokenizer(fmt.prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def completion_end_ids(tokenizer) -> list[int]:
    """Tokens that end an assistant turn (the EOS, which for chat models closes the turn)."""
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


@dataclass
class SFTExample:
    """Token ids of one SFT example; the loss falls on ``completion_ids`` only."""

    prompt_ids: list[int]
    completion_ids: list[int]


def split_sft_row(row: dict) -> tuple[str | list, str]:
    """(prompt, completion) of an SFT row; for ``messages`` rows the last assistant turn is the completion."""
    if "completion" in row:
        return row["prompt"], row["completion"]
    msgs = row["messages"]
    return msgs[:-1], msgs[-1]["content"]


def prompt_ids_within_limit(row: Row, prompt, tokenizer, fmt: PromptFormat, max_prompt_tokens: int,
                           on_invalid: str = "error", report: LoadReport | None = None) -> list[int] | None:
    """Token ids of ``prompt``; None (skipped, counted) or a :class:`DataError` when it is too long."""
    ids = encode_prompt(tokenizer, fmt, prompt)
    if len(ids) <= max_prompt_tokens:
        return ids
    if on_invalid == "skip":
        if report is not None:
            report.skip("prompt longer than data.max_prompt_tokens")
        return None
    raise DataError(row.file, row.line, "prompt" if "prompt" in row.data else "messages",
                    f"prompt is {len(ids)} tokens, longer than data.max_prompt_tokens={max_prompt_tokens}")


def encode_completion(tokenizer, text: str, max_completion_tokens: int, report: LoadReport | None = None,
                      field_name: str = "completion") -> list[int]:
    """Completion ids followed by the end-of-turn token, truncated to ``max_completion_tokens`` (counted)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + completion_end_ids(tokenizer)
    if len(ids) > max_completion_tokens:
        ids = ids[:max_completion_tokens]
        if report is not None:
            report.skip(f"{field_name} truncated to data.max_completion_tokens (kept)")
    return ids


def tokenize_sft(rows: Sequence[Row], tokenizer, fmt: PromptFormat, max_prompt_tokens: int,
                 max_completion_tokens: int, on_invalid: str = "error",
                 report: LoadReport | None = None) -> list[SFTExample]:
    """Tokenize SFT rows; over-long prompts are an error (or skipped), long completions are truncated."""
    out = []
    for row in rows:
        prompt, completion = split_sft_row(row.data)
        p_ids = prompt_ids_within_limit(row, prompt, tokenizer, fmt, max_prompt_tokens, on_invalid, report)
        if p_ids is not None:
            out.append(SFTExample(p_ids, encode_completion(tokenizer, completion, max_completion_tokens, report)))
    return out


def check_prompt_lengths(rows: Sequence[Row], tokenizer, fmt: PromptFormat, max_prompt_tokens: int,
                         on_invalid: str = "error", report: LoadReport | None = None) -> list[Row]:
    """Drop (or reject) prompt rows whose formatted prompt exceeds ``max_prompt_tokens``."""
    return [row for row in rows if prompt_ids_within_limit(row, row.data["prompt"], tokenizer, fmt,
                                                           max_prompt_tokens, on_invalid, report) is not None]
