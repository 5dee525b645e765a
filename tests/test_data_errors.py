"""Data files that are not what they claim to be: clear ``file:line`` errors (never tracebacks) for binary or
non-UTF-8 bytes, integers past Python's digit limit, nesting too deep, a skip that leaves nothing, and
preference pairs whose chosen and rejected completions are the same."""

from __future__ import annotations

import json

import pytest

from rlmt.cli import main
from rlmt.data import DataError, PromptFormat, load_rows, tokenize_preference
from rlmt.models import tiny_tokenizer

HUGE = "9" * 5000  # past Python's 4300-digit limit of int(str)


def _lines(path, lines: list[bytes]) -> str:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(path)


def _row(prompt="What is 2 + 2?", completion="4") -> bytes:
    return json.dumps({"prompt": prompt, "completion": completion}).encode()


# ------------------------------------------------------------------------------------------ bytes


def test_non_utf8_line_names_file_line_and_column(tmp_path):
    path = _lines(tmp_path / "d.jsonl", [_row(), b'{"prompt": "caf\xe9", "completion": "x"}', _row()])
    with pytest.raises(DataError) as e:
        load_rows(path, "sft")
    assert (e.value.file, e.value.line) == (path, 2)
    assert str(e.value).startswith(f"{path}:2: not UTF-8 text")
    assert "0xe9" in str(e.value) and "column 16" in str(e.value)


def test_binary_file_is_a_data_error_not_a_traceback(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4)  # a gzip header and binary noise
    with pytest.raises(DataError) as e:
        load_rows(str(path), "prompt")
    assert e.value.file == str(path) and e.value.line == 1
    assert "binary" in str(e.value)


def test_non_utf8_lines_are_skipped_and_counted(tmp_path):
    path = _lines(tmp_path / "d.jsonl", [_row("a"), b"\xff\xfe garbage", _row("b")])
    report = load_rows(path, "sft", on_invalid="skip")
    assert [r.data["prompt"] for r in report.rows] == ["a", "b"]
    assert report.skipped == {"not UTF-8 text": 1}


def test_a_leading_byte_order_mark_is_accepted(tmp_path):
    path = _lines(tmp_path / "d.jsonl", [b"\xef\xbb\xbf" + _row("a"), _row("b")])
    assert [r.data["prompt"] for r in load_rows(path, "sft").rows] == ["a", "b"]


def test_non_utf8_json_file_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[\n {"prompt": "a", "completion": "b"},\n {"prompt": "\xff", "completion": "b"}\n]\n')
    with pytest.raises(DataError) as e:
        load_rows(str(path), "sft")
    assert e.value.line == 3 and "not UTF-8 text" in str(e.value)


# ------------------------------------------------------------------------------------------ numbers, nesting


def test_integer_past_the_digit_limit_names_file_and_line(tmp_path):
    path = _lines(tmp_path / "d.jsonl", [b'{"prompt": "p", "answer": 4}', f'{{"prompt": "p", "answer": {HUGE}}}'.encode()])
    with pytest.raises(DataError) as e:
        load_rows(path, "prompt")
    assert (e.value.file, e.value.line) == (path, 2)
    assert "4300" in str(e.value) and "as a string" in str(e.value)


def test_integer_past_the_digit_limit_in_a_json_file_names_its_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(f'[\n {{"prompt": "a", "answer": 1}},\n {{"prompt": "b", "answer": {HUGE}}}\n]\n')
    with pytest.raises(DataError) as e:
        load_rows(str(path), "prompt")
    assert e.value.line == 3 and "4300" in str(e.value)


def test_integer_past_the_digit_limit_is_skipped_and_counted(tmp_path):
    path = _lines(tmp_path / "d.jsonl", [b'{"prompt": "p", "answer": 4}', f'{{"prompt": "q", "answer": {HUGE}}}'.encode()])
    report = load_rows(path, "prompt", on_invalid="skip")
    assert len(report.rows) == 1 and list(report.skipped) == ["number too long"]


def test_nesting_too_deep_is_a_data_error(tmp_path):
    path = _lines(tmp_path / "d.jsonl", [b'{"prompt": "p", "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"])
    with pytest.raises(DataError) as e:
        load_rows(path, "prompt")
    assert e.value.line == 1 and "nested too deeply" in str(e.value)


# ------------------------------------------------------------------------------------------ nothing left


def test_skip_that_leaves_no_rows_says_what_was_dropped(tmp_path):
    path = _lines(tmp_path / "d.jsonl", [b'{"prompt": "x"}', b"{bad", b'{"prompt": "y"}'])
    with pytest.raises(DataError) as e:
        load_rows(path, "sft", on_invalid="skip")
    assert str(e.value) == f"{path}: 0 rows left; dropped: completion: missing: 2, malformed JSON: 1"


def test_empty_file_says_it_is_empty(tmp_path):
    path = _lines(tmp_path / "d.jsonl", [b"", b"  "])
    with pytest.raises(DataError) as e:
        load_rows(path, "prompt")
    assert str(e.value) == f"{path}: no rows (the file is empty)"


def test_cli_skip_that_leaves_no_rows_after_the_length_filter_is_one_error_line(tmp_path, capsys):
    """Every prompt is longer than data.max_prompt_tokens: with skip, the run stops with the count instead of
    dividing by zero rows."""
    path = _lines(tmp_path / "d.jsonl", [_row("x" * 200, "a"), _row("y" * 200, "b")])
    rc = main(["train", "algorithm=sft", "model.name=tiny-random", f"data.train={path}", "data.on_invalid=skip",
               "data.max_prompt_tokens=8", f"run.output_dir={tmp_path / 'run'}", "run.progress=false"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"error: {path}: 0 rows left; dropped: prompt longer than data.max_prompt_tokens: 2" in err


def test_cli_binary_data_file_is_one_error_line(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_bytes(bytes(range(256)))
    rc = main(["train", "algorithm=sft", "model.name=tiny-random", f"data.train={path}",
               f"run.output_dir={tmp_path / 'run'}", "run.progress=false"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and err.startswith(f"error: {path}:1: ")


# ------------------------------------------------------------------------------------------ preference pairs


def _pairs(tmp_path, rows: list[dict]) -> str:
    path = tmp_path / "pref.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_chosen_equal_to_rejected_is_an_error_naming_the_line(tmp_path):
    path = _pairs(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b"},
                             {"prompt": "p", "chosen": "same", "rejected": "same"}])
    with pytest.raises(DataError) as e:
        load_rows(path, "preference")
    assert (e.value.line, e.value.field) == (2, "rejected")
    assert "identical to 'chosen'" in e.value.message


def test_chosen_equal_to_rejected_is_a_counted_filter_when_skipping(tmp_path):
    path = _pairs(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b"},
                             {"prompt": "p", "chosen": "same", "rejected": "same"}])
    report = load_rows(path, "preference", on_invalid="skip")
    assert len(report.rows) == 1
    assert list(report.skipped) == ["rejected: identical to 'chosen' (no preference: a zero-gradient pair)"]


def test_pair_identical_after_truncation_is_an_error_or_counted(tmp_path):
    tok = tiny_tokenizer()
    path = _pairs(tmp_path, [{"prompt": "p", "chosen": "abc", "rejected": "xyz"},
                             {"prompt": "p", "chosen": "0123456789 yes", "rejected": "0123456789 no"}])
    report = load_rows(path, "preference")
    with pytest.raises(DataError) as e:
        tokenize_preference(report.rows, tok, PromptFormat(), 64, 5)
    assert (e.value.line, e.value.field) == (2, "rejected")
    assert "data.max_completion_tokens=5" in e.value.message
    pairs = tokenize_preference(report.rows, tok, PromptFormat(), 64, 5, on_invalid="skip", report=report)
    assert len(pairs) == 1
    assert report.skipped["chosen and rejected identical after truncation to data.max_completion_tokens"] == 1
