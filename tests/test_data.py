"""Data: every row validated before training; errors name file, line and field; skip mode counts reasons."""

from __future__ import annotations

import json

import pytest

from rlmt.data import (
    DataError,
    PromptFormat,
    check_prompt_lengths,
    encode_prompt,
    load_rows,
    tokenize_sft,
    validate_row,
)
from rlmt.models import tiny_tokenizer

CHAT = PromptFormat(chat=True)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_jsonl(path, lines: list) -> str:
    """Write rows (dicts are JSON-encoded, strings written verbatim) one per line; return the path."""
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return str(path)


def sft(prompt="What is 2 + 2?", completion="4", **extra) -> dict:
    return {"prompt": prompt, "completion": completion, **extra}


def chatml(messages: list[dict], generation_prompt: bool = True) -> str:
    """The ChatML text the tiny tokenizer's template renders, written out by hand."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


# ------------------------------------------------------------------------------------------ reading


def test_valid_sft_rows_keep_their_data_and_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [sft("a", "b"), "", sft("c", "d", id=7)])
    report = load_rows(path, "sft")
    assert [r.data for r in report.rows] == [sft("a", "b"), sft("c", "d", id=7)]
    assert [r.line for r in report.rows] == [1, 3]
    assert all(r.file == path for r in report.rows)
    assert report.skipped == {}


def test_malformed_json_names_file_and_line_counting_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [sft(), "", "   ", sft(), '{"prompt": "x", "completion": '])
    with pytest.raises(DataError) as e:
        load_rows(path, "sft")
    assert e.value.file == path
    assert e.value.line == 5
    assert str(e.value).startswith(f"{path}:5: malformed JSON")


def test_malformed_json_in_middle_stops_at_that_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [sft(), "{not json}", sft()])
    with pytest.raises(DataError, match=r":2: malformed JSON"):
        load_rows(path, "sft")


@pytest.mark.parametrize("row, field, problem", [
    ({"completion": "4"}, "prompt", "missing"),
    ({"prompt": "q"}, "completion", "missing"),
    ({"prompt": 42, "completion": "4"}, "prompt", "must be a string, got int"),
    ({"prompt": "q", "completion": None}, "completion", "must be a string, got NoneType"),
    ({"prompt": "q", "completion": ""}, "completion", "must not be empty"),
    ({"prompt": "q", "completion": " \n\t"}, "completion", "must not be empty"),
    ({"prompt": "   ", "completion": "a"}, "prompt", "must not be empty"),
])
def test_bad_sft_field_names_line_and_field(tmp_path, row, field, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [sft(), sft(), row])
    with pytest.raises(DataError) as e:
        load_rows(path, "sft")
    assert (e.value.file, e.value.line, e.value.field) == (path, 3, field)
    assert problem in e.value.message
    assert str(e.value) == f"{path}:3: field {field!r}: {e.value.message}"


def test_row_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [sft(), '["a", "b"]'])
    with pytest.raises(DataError) as e:
        load_rows(path, "sft")
    assert e.value.line == 2 and e.value.field is None
    assert "must be a JSON object, got list" in str(e.value)


def test_messages_rows_are_valid_sft(tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}])
    assert load_rows(path, "sft").rows[0].data == {"messages": msgs}


@pytest.mark.parametrize("messages, problem", [
    ([{"role": "user", "content": "hi"}], "last message must be a non-empty assistant reply"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "non-empty assistant reply"),
    ([], "non-empty list"),
    ("hi", "non-empty list"),
    ([{"role": "user"}], "message 0 must be an object with string 'role' and 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "message 1 has unknown role 'robot'"),
])
def test_bad_messages_rows(tmp_path, messages, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    with pytest.raises(DataError) as e:
        load_rows(path, "sft")
    assert (e.value.line, e.value.field) == (1, "messages")
    assert problem in e.value.message


def test_prompt_may_be_chat_messages(tmp_path):
    prompt = [{"role": "user", "content": "2+2?"}]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": prompt, "answer": 4}])
    sft_rows = write_jsonl(tmp_path / "sft.jsonl", [sft(prompt, "4")])
    assert load_rows(prompts, "prompt").rows[0].data["prompt"] == prompt
    assert load_rows(sft_rows, "sft").rows[0].data == {"prompt": prompt, "completion": "4"}


def test_prompt_as_bad_chat_messages(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": [{"role": "user", "content": 3}]}])
    with pytest.raises(DataError) as e:
        load_rows(path, "prompt")
    assert (e.value.line, e.value.field) == (1, "prompt")


def test_prompt_rows_only_need_a_prompt_and_keep_task_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2+2?", "answer": 4, "tests": ["assert f()"]}])
    assert load_rows(path, "prompt").rows[0].data == {"prompt": "2+2?", "answer": 4, "tests": ["assert f()"]}


def test_preference_rows(tmp_path):
    good = {"prompt": "p", "chosen": "yes", "rejected": "no"}
    path = write_jsonl(tmp_path / "d.jsonl", [good, {"prompt": "p", "chosen": "yes"}])
    with pytest.raises(DataError) as e:
        load_rows(path, "preference")
    assert (e.value.line, e.value.field, e.value.message) == (2, "rejected", "missing")
    path2 = write_jsonl(tmp_path / "ok.jsonl", [good])
    assert load_rows(path2, "preference").rows[0].data == good


def test_preference_row_with_empty_chosen(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "", "rejected": "no"}])
    with pytest.raises(DataError) as e:
        load_rows(path, "preference")
    assert e.value.field == "chosen"


def test_validate_row_directly():
    assert validate_row(sft(), "sft") is None
    assert validate_row({"prompt": "p"}, "sft") == ("completion", "missing")
    assert validate_row({"prompt": "p"}, "prompt") is None
    assert validate_row("text", "prompt") == (None, "a row must be a JSON object, got str")


def test_skip_mode_drops_bad_rows_and_counts_them_by_reason(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        sft("a", "1"),
        "{broken",
        {"prompt": "b"},
        {"prompt": "c"},
        {"prompt": 5, "completion": "x"},
        sft("d", "2"),
        "",
        sft("e", ""),
    ])
    report = load_rows(path, "sft", on_invalid="skip")
    assert [r.data["prompt"] for r in report.rows] == ["a", "d"]
    assert [r.line for r in report.rows] == [1, 6]
    assert report.skipped == {
        "malformed JSON": 1,
        "completion: missing": 2,
        "prompt: must be a string, got int": 1,
        "completion: must not be empty": 1,
    }


def test_file_with_no_valid_rows_is_an_error_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x"}, "", "{bad"])
    with pytest.raises(DataError, match="0 rows left; dropped: "):
        load_rows(path, "sft", on_invalid="skip")


def test_empty_file_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["", "  "])
    with pytest.raises(DataError, match="no rows") as e:
        load_rows(path, "prompt")
    assert e.value.file == path


def test_limit_takes_first_rows_and_ignores_rows_after_it(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [sft("a"), sft("b"), sft("c"), "{broken"])
    report = load_rows(path, "sft", limit=2)
    assert [r.data["prompt"] for r in report.rows] == ["a", "b"]
    assert len(load_rows(path, "sft", limit=3).rows) == 3  # the broken line 4 is never reached


def test_limit_counts_valid_rows_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [sft("a"), {"prompt": "x"}, sft("b"), sft("c")])
    report = load_rows(path, "sft", on_invalid="skip", limit=2)
    assert [r.data["prompt"] for r in report.rows] == ["a", "b"]
    assert report.skipped == {"completion: missing": 1}


def test_json_list_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([sft("a"), sft("b"), {"prompt": "c", "completion": 3}], indent=2))
    with pytest.raises(DataError) as e:
        load_rows(str(path), "sft")
    assert (e.value.line, e.value.field) == (3, "completion")  # for .json, "line" is the row's index (1-based)
    path.write_text(json.dumps([sft("a"), sft("b")]))
    assert [r.line for r in load_rows(str(path), "sft").rows] == [1, 2]


def test_json_file_must_hold_a_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(sft()))
    with pytest.raises(DataError, match="must hold a list of rows"):
        load_rows(str(path), "sft")


def test_malformed_json_file_reports_the_text_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": oops}\n]\n')
    with pytest.raises(DataError) as e:
        load_rows(str(path), "sft")
    assert e.value.line == 3
    assert "malformed JSON" in str(e.value)


def test_nonexistent_file(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="does not exist") as e:
        load_rows(missing, "sft")
    assert e.value.file == missing
    assert str(e.value).startswith(missing)


def test_unsupported_extension_is_a_data_error(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError) as e:
        load_rows(str(path), "prompt")
    assert e.value.file == str(path)


# ------------------------------------------------------------------------------------------ tokenizing


def rows_of(tmp_path, lines, kind="sft", name="d.jsonl"):
    return load_rows(write_jsonl(tmp_path / name, lines), kind)


def test_prompt_ids_equal_the_chat_template_encoding(tok, tmp_path):
    report = rows_of(tmp_path, [sft("What is 2 + 2?", "4")])
    (ex,) = tokenize_sft(report.rows, tok, CHAT, 512, 512)
    expected_text = chatml([{"role": "user", "content": "What is 2 + 2?"}])
    assert ex.prompt_ids == tok(expected_text, add_special_tokens=False)["input_ids"]
    templated = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}],
                                        tokenize=True, add_generation_prompt=True)
    templated = templated if isinstance(templated, list) else templated["input_ids"]  # transformers 5: a dict
    assert ex.prompt_ids == templated
    assert tok.decode(ex.prompt_ids) == expected_text


def test_completion_ends_with_eos(tok, tmp_path):
    report = rows_of(tmp_path, [sft("q", "The answer is 4.")])
    (ex,) = tokenize_sft(report.rows, tok, CHAT, 512, 512)
    assert ex.completion_ids[-1] == tok.eos_token_id
    assert ex.completion_ids[:-1] == tok("The answer is 4.", add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id not in ex.completion_ids[:-1]
    # prompt + completion is the full ChatML conversation, the turn closed by <|im_end|>
    assert tok.decode(ex.prompt_ids + ex.completion_ids) == chatml(
        [{"role": "user", "content": "q"}], generation_prompt=True) + "The answer is 4.<|im_end|>"


def test_system_prompt_is_prepended(tok, tmp_path):
    report = rows_of(tmp_path, [sft("q", "a")])
    (ex,) = tokenize_sft(report.rows, tok, PromptFormat(chat=True, system_prompt="Be brief."), 512, 512)
    assert tok.decode(ex.prompt_ids) == chatml([{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "q"}])


def test_messages_row_splits_at_the_last_assistant_turn(tok, tmp_path):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    report = rows_of(tmp_path, [{"messages": msgs}])
    (ex,) = tokenize_sft(report.rows, tok, CHAT, 512, 512)
    assert tok.decode(ex.prompt_ids) == chatml(msgs[:-1])
    assert tok.decode(ex.completion_ids) == "4<|im_end|>"


def test_plain_text_format_without_chat_template(tok, tmp_path):
    report = rows_of(tmp_path, [sft("Q: 2+2\nA:", " 4")])
    (ex,) = tokenize_sft(report.rows, tok, PromptFormat(chat=False), 512, 512)
    assert tok.decode(ex.prompt_ids) == "Q: 2+2\nA:"
    assert tok.decode(ex.completion_ids) == " 4<|im_end|>"


def _prompt_len(tok, prompt) -> int:
    return len(encode_prompt(tok, CHAT, prompt))


def test_over_long_prompt_in_sft_names_line_field_and_max(tok, tmp_path):
    long_prompt = "x" * 100
    report = rows_of(tmp_path, [sft("short"), "", sft(long_prompt)])
    n = _prompt_len(tok, long_prompt)
    limit = n - 1
    assert _prompt_len(tok, "short") <= limit
    with pytest.raises(DataError) as e:
        tokenize_sft(report.rows, tok, CHAT, limit, 512)
    assert (e.value.line, e.value.field) == (3, "prompt")
    assert f"prompt is {n} tokens" in e.value.message
    assert f"data.max_prompt_tokens={limit}" in e.value.message
    assert str(e.value).startswith(f"{report.rows[0].file}:3: field 'prompt'")
    # exactly at the limit is allowed
    assert len(tokenize_sft(report.rows, tok, CHAT, n, 512)) == 2


def test_over_long_messages_prompt_names_the_messages_field(tok, tmp_path):
    msgs = [{"role": "user", "content": "y" * 80}, {"role": "assistant", "content": "ok"}]
    report = rows_of(tmp_path, [{"messages": msgs}])
    with pytest.raises(DataError) as e:
        tokenize_sft(report.rows, tok, CHAT, 20, 512)
    assert (e.value.line, e.value.field) == (1, "messages")
    assert "data.max_prompt_tokens=20" in e.value.message


def test_over_long_prompt_skipped_and_counted(tok, tmp_path):
    report = rows_of(tmp_path, [sft("a"), sft("z" * 100), sft("b"), sft("w" * 200)])
    examples = tokenize_sft(report.rows, tok, CHAT, 40, 512, on_invalid="skip", report=report)
    assert len(examples) == 2
    assert [tok.decode(e.completion_ids) for e in examples] == ["4<|im_end|>"] * 2
    assert report.skipped == {"prompt longer than data.max_prompt_tokens": 2}


def test_long_completion_is_truncated_and_counted(tok, tmp_path):
    report = rows_of(tmp_path, [sft("a", "0123456789"), sft("b", "01"), sft("c", "abcdefghijklmnop")])
    examples = tokenize_sft(report.rows, tok, CHAT, 512, 5, report=report)
    assert [len(e.completion_ids) for e in examples] == [5, 3, 5]
    assert tok.decode(examples[0].completion_ids) == "01234"  # cut from the end: the EOS goes
    assert tok.decode(examples[1].completion_ids) == "01<|im_end|>"
    assert report.skipped == {"completion truncated to data.max_completion_tokens (kept)": 2}


def test_completion_exactly_at_limit_is_not_counted(tok, tmp_path):
    report = rows_of(tmp_path, [sft("a", "0123")])  # 4 bytes + EOS = 5 tokens
    (ex,) = tokenize_sft(report.rows, tok, CHAT, 512, 5, report=report)
    assert ex.completion_ids[-1] == tok.eos_token_id
    assert report.skipped == {}


def test_check_prompt_lengths_error_names_line_field_and_max(tok, tmp_path):
    report = rows_of(tmp_path, [{"prompt": "ok", "answer": 1}, {"prompt": "q" * 60, "answer": 2}], kind="prompt")
    n = _prompt_len(tok, "q" * 60)
    with pytest.raises(DataError) as e:
        check_prompt_lengths(report.rows, tok, CHAT, 30)
    assert (e.value.line, e.value.field) == (2, "prompt")
    assert f"prompt is {n} tokens" in e.value.message
    assert "data.max_prompt_tokens=30" in e.value.message


def test_check_prompt_lengths_skip_keeps_short_rows(tok, tmp_path):
    prompt_msgs = [{"role": "user", "content": "m" * 60}]
    report = rows_of(tmp_path, [{"prompt": "ok"}, {"prompt": "q" * 60}, {"prompt": prompt_msgs}, {"prompt": "ok2"}],
                     kind="prompt")
    kept = check_prompt_lengths(report.rows, tok, CHAT, 30, on_invalid="skip", report=report)
    assert [r.data["prompt"] for r in kept] == ["ok", "ok2"]
    assert [r.line for r in kept] == [1, 4]
    assert report.skipped == {"prompt longer than data.max_prompt_tokens": 2}


def test_prompt_given_as_messages_is_templated_as_is(tok, tmp_path):
    prompt = [{"role": "system", "content": "S"}, {"role": "user", "content": "2+2?"}]
    report = rows_of(tmp_path, [sft(prompt, "4")])
    # a system_prompt in the format applies to text prompts only; message prompts carry their own
    (ex,) = tokenize_sft(report.rows, tok, PromptFormat(chat=True, system_prompt="ignored"), 512, 512)
    assert tok.decode(ex.prompt_ids) == chatml(prompt)


def test_empty_path_says_no_file_was_given():
    # an unset data.train is "", which Path() would read as the current directory
    with pytest.raises(DataError, match=r"no data file given: set data\.train"):
        load_rows("", "sft")
