"""Verifier reward sources: math answer extraction, number parsing and matching, regex rewards."""

from __future__ import annotations

import time
from fractions import Fraction

import pytest

from rlmt.rewards import RewardError, build_reward_source, score_checked
from rlmt.rewards.math_answer import MathAnswerReward, answers_match, extract_answer, parse_number
from rlmt.rewards.regex import RegexReward


@pytest.mark.parametrize("text, expected", [
    ("So the result is \\boxed{42}.", "42"),
    ("\\boxed{1} then later \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac{\\sqrt{3}}{2}}", "\\dfrac{\\sqrt{3}}{2}"),
    ("first \\boxed{7} then a truncated \\boxed{\\frac{1}{", "7"),
    ("Natalia sold 48 clips.\n#### 72", "72"),
    ("#### 1,234\n", "1,234"),
    ("The answer is 17.", "17"),
    ("the ANSWER IS: 3.5. Done.", "3.5"),
    ("Answer: $12", "12"),
    ("**Answer:** 8", "8"),
    ("The answer is 5 apples.\nThen 99", "5 apples"),
    ("I got 3 then 4 and finally 10", "10"),
    ("Total is 1,234.", "1,234"),
    ("x = -7", "-7"),
    ("the probability is \\frac{3}{4}", "3/4"),
    ("roughly 5. Nothing else", "5"),
    ("halve it: .5", ".5"),
    ("The answer isn't 5, it's 6", "6"),
    ("no numbers here", None),
    ("", None),
])
def test_extract_answer_auto(text, expected):
    assert extract_answer(text) == expected


def test_marker_precedence_over_last_number():
    text = "The answer is \\boxed{12}. Check: 3 + 9 = 12, and 100 other things"
    assert extract_answer(text) == "12"
    assert extract_answer(text, mode="last_number") == "100"
    assert extract_answer("#### 5\nextra 9") == "5"
    assert extract_answer("answer is 4 ... \\boxed{6} ... #### 8") == "6"  # boxed beats #### and phrase
    assert extract_answer("answer is 4 and later #### 8") == "8"  # #### beats the phrase


def test_extract_answer_modes():
    assert extract_answer("I think 42", mode="marked") is None
    assert extract_answer("Answer: 42", mode="marked") == "42"
    assert extract_answer("Answer: 42 or 43", mode="last_number") == "43"
    with pytest.raises(ValueError, match="mode"):
        extract_answer("1", mode="first")


def test_extract_answer_scans_only_the_tail():
    text = "\\boxed{1}" + "x" * 10_000 + " so 7"
    assert extract_answer(text) == "7"


@pytest.mark.parametrize("s, expected", [
    ("42", Fraction(42)),
    ("-5", Fraction(-5)),
    ("+5", Fraction(5)),
    ("\u22125", Fraction(-5)),
    ("1,234", Fraction(1234)),
    ("1,234,567.5", Fraction(2469135, 2)),
    ("3.25", Fraction(13, 4)),
    (".5", Fraction(1, 2)),
    ("5.", Fraction(5)),
    ("1e3", Fraction(1000)),
    ("2.5E-2", Fraction(1, 40)),
    ("3/4", Fraction(3, 4)),
    ("-3/4", Fraction(-3, 4)),
    ("\\frac{3}{4}", Fraction(3, 4)),
    ("\\dfrac{1}{2}", Fraction(1, 2)),
    ("\\tfrac12", Fraction(1, 2)),
    ("-\\frac{3}{4}", Fraction(-3, 4)),
    ("$12", Fraction(12)),
    ("\\$12.50", Fraction(25, 2)),
    ("$\\frac{7}{2}$", Fraction(7, 2)),
    ("12 dollars", Fraction(12)),
    ("12 dollars.", Fraction(12)),
    ("5 \\text{ cm}", Fraction(5)),
    ("90^\\circ", Fraction(90)),
    ("50%", Fraction(50)),
    ("50\\%", Fraction(50)),
    ("x = 5", Fraction(5)),
    ("3 + 4 = 7", Fraction(7)),
    ("1\\,234", Fraction(1234)),
    ("  7  ", Fraction(7)),
])
def test_parse_number(s, expected):
    assert parse_number(s) == expected


@pytest.mark.parametrize("s", [
    "", "abc", "1/0", "3 and 4", "(1, 2)", "x^2", "2\\pi", "\\sqrt{2}", "x-5", "1e999999999", "1e-1001",
    "5!", "2*3",
])
def test_parse_number_rejects(s):
    assert parse_number(s) is None


def test_exponent_at_the_cap_is_exact():
    assert parse_number("1e1000") == Fraction(10) ** 1000
    assert parse_number("1e-1000") == Fraction(1, 10 ** 1000)


@pytest.mark.parametrize("text", [
    "1e999999999", "the answer is 1e999999999", "9" * 3000 + "e99999999999", "\\boxed{1e-999999999}",
    "1" * 5000, "{" * 4000 + "\\boxed{" * 2000, ("1," * 3000) + "5",
])
def test_adversarial_inputs_are_fast(text):
    start = time.perf_counter()
    extracted = extract_answer(text)
    value = parse_number(extracted) if extracted is not None else None
    answers_match(extracted, 1)
    assert time.perf_counter() - start < 1.0
    assert value is None or abs(value) < Fraction(10) ** 4001


@pytest.mark.parametrize("pred, gold", [
    ("0.5", "1/2"), ("1/2", "\\frac{1}{2}"), ("\\frac{1}{2}", 0.5), ("0.5", Fraction(1, 2)),
    ("1,234", 1234), ("1234", "1,234"), ("$1,234.00", 1234), ("0.1", 0.1), ("-3", -3), ("1e2", 100),
    ("72", "72"), ("5 apples", 5), ("(1, 2)", "(1,2)"), ("\\sqrt{2}", "\\sqrt{2}"), ("B", "b"),
    ("\\dfrac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}"),
])
def test_answers_match(pred, gold):
    assert answers_match(pred, gold)


@pytest.mark.parametrize("pred, gold", [
    ("0.5", "0.51"), ("1234", 1235), ("x^2", 2), ("\\sqrt{2}", 2), (None, 1), ("", ""), ("A", "B"),
    ("0.333", "1/3"), ("50%", 0.5), ("1", True),
])
def test_answers_do_not_match(pred, gold):
    assert not answers_match(pred, gold)


def test_answers_match_relative_tolerance():
    assert answers_match("0.333", "1/3", rel_tol=1e-2)
    assert not answers_match("0.3", "1/3", rel_tol=1e-2)
    assert answers_match("100.5", 100, rel_tol=0.01)
    assert not answers_match("102", 100, rel_tol=0.01)


def test_math_answer_reward_scores_and_details():
    source = MathAnswerReward()
    rows = [{"prompt": "p", "answer": 72}, {"prompt": "p", "answer": "1/2"}, {"prompt": "p", "answer": 3.0},
            {"prompt": "p", "answer": 5}]
    responses = ["... #### 72", "it is \\boxed{0.5}", "I computed 4", "I cannot say"]
    result = source.score(rows, responses)
    assert result.scores == [1.0, 1.0, 0.0, 0.0]
    assert result.details[0] == {"extracted": "72", "gold": 72, "correct": True}
    assert result.details[2] == {"extracted": "4", "gold": 3.0, "correct": False}
    assert result.details[3] == {"extracted": None, "gold": 5, "correct": False}


def test_math_answer_reward_custom_values_field_and_mode():
    source = MathAnswerReward(answer_field="target", mode="marked", correct=2.0, incorrect=-1.0)
    result = source.score([{"target": "7"}, {"target": "7"}], ["Answer: 7", "7"])
    assert result.scores == [2.0, -1.0]
    assert result.details[1]["extracted"] is None


@pytest.mark.parametrize("rows", [[{"answer": 1}, {"prompt": "p"}], [{"answer": 1}, {"answer": None}]])
def test_math_answer_reward_missing_field_raises(rows):
    with pytest.raises(ValueError, match=r"row 1 .*'answer'"):
        MathAnswerReward().score(rows, ["1", "1"])


@pytest.mark.parametrize("kwargs", [{"mode": "first"}, {"rel_tol": -0.1}, {"rel_tol": float("nan")},
                                    {"correct": float("inf")}])
def test_math_answer_reward_bad_config(kwargs):
    with pytest.raises(ValueError):
        MathAnswerReward(**kwargs)


def test_math_answer_through_registry_and_score_checked():
    source = build_reward_source("math_answer", {"answer_field": "gold", "rel_tol": 0.0})
    assert source.name == "math_answer"
    rows = [{"prompt": "2+2?", "gold": 4}, {"prompt": "half?", "gold": "\\frac{1}{2}"}, {"prompt": "?", "gold": 9}]
    result = score_checked(source, rows, ["2+2 = \\boxed{4}", "The answer is 0.5.", "no idea"])
    assert result.scores == [1.0, 1.0, 0.0]
    assert [d["correct"] for d in result.details] == [True, True, False]
    with pytest.raises(RewardError, match="'gold'"):
        score_checked(source, [{"prompt": "x"}], ["1"])
    with pytest.raises(ValueError, match=r"reward\.args\.answer_key: not an argument .* did you mean .answer_field."):
        build_reward_source("math_answer", {"answer_key": "gold"})


@pytest.mark.parametrize("pattern, mode, flags, response, matched", [
    (r"<answer>.*</answer>", "search", [], "think <answer>4</answer>", True),
    (r"<answer>.*</answer>", "fullmatch", [], "think <answer>4</answer>", False),
    (r".*<answer>.*</answer>", "fullmatch", [], "think <answer>4</answer>", True),
    (r"<ANSWER>", "search", [], "<answer>", False),
    (r"<ANSWER>", "search", ["IGNORECASE"], "<answer>", True),
    (r"a.b", "search", [], "a\nb", False),
    (r"a.b", "search", ["DOTALL"], "a\nb", True),
    (r"^b$", "search", [], "a\nb\nc", False),
    (r"^b$", "search", ["MULTILINE"], "a\nb\nc", True),
    (r"^B$", "search", ["ignorecase", "MULTILINE"], "a\nb\nc", True),
])
def test_regex_modes_and_flags(pattern, mode, flags, response, matched):
    source = RegexReward(pattern=pattern, mode=mode, flags=flags, reward=1.0, penalty=-1.0)
    result = source.score([{}], [response])
    assert result.scores == [1.0 if matched else -1.0]
    assert result.details[0]["matched"] is matched


@pytest.mark.parametrize("kwargs, message", [
    ({"pattern": "(unclosed"}, "invalid pattern"),
    ({"pattern": "a", "flags": ["IGNORE_CASE"]}, "unknown flag"),
    ({"pattern": "a", "flags": "IGNORECASE"}, "list of names"),
    ({"pattern": "a", "mode": "match"}, "unknown mode"),
    ({"pattern": "a", "scan_chars": 0}, "scan_chars"),
    ({"pattern": "a", "max_chars": -1}, "max_chars"),
    ({"pattern": "a", "reward": float("nan")}, "finite"),
])
def test_regex_invalid_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RegexReward(**kwargs)


def test_regex_max_chars_and_scan_chars():
    source = RegexReward(pattern="ok", max_chars=10, penalty=-0.5)
    result = source.score([{}, {}], ["ok", "ok" + "x" * 20])
    assert result.scores == [1.0, -0.5]
    assert result.details[1]["too_long"] is True

    scanned = RegexReward(pattern="needle", scan_chars=100)
    assert scanned.score([{}, {}], ["x" * 50 + "needle", "x" * 200 + "needle"]).scores == [1.0, 0.0]
    whole = RegexReward(pattern="x*", mode="fullmatch", scan_chars=100)
    result = whole.score([{}, {}], ["x" * 100, "x" * 101])
    assert result.scores == [1.0, 0.0]  # a response past scan_chars cannot be checked whole
    assert result.details[1]["truncated"] is True


def test_regex_through_registry_and_score_checked():
    source = build_reward_source("regex", {"pattern": r"\\boxed\{", "reward": 0.2})
    assert source.name == "regex"
    result = score_checked(source, [{"prompt": "a"}, {"prompt": "b"}], ["\\boxed{1}", "1"])
    assert result.scores == [0.2, 0.0]
    with pytest.raises(ValueError, match="invalid pattern"):
        build_reward_source("regex", {"pattern": "[a-"})
