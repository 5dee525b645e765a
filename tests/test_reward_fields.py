"""The fields a reward source reads are checked with the data, before any model loads, naming file, line
and field; a gold answer of the wrong type is an error, never a silent 0 (or a silent match)."""

from __future__ import annotations

import json

import pytest

import rlmt.train.session as session
from rlmt.cli import main
from rlmt.data import DataError, load_rows
from rlmt.rewards import RewardError, declared_fields, reward_fields, score_checked
from rlmt.rewards.math_answer import MathAnswerReward, gold_answer_problem
from rlmt.config import load_config


@pytest.fixture
def no_model(monkeypatch):
    def refuse(cfg):
        raise AssertionError("the model loaded before the data was checked")
    monkeypatch.setattr(session, "prepare_model", refuse)


def _prompts(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _grpo(data, out, *extra) -> int:
    return main(["train", "algorithm=grpo", "model.name=tiny-random", f"data.train={data}", "optim.max_steps=1",
                 "rollout.num_samples=2", "rollout.batch_prompts=2", "rollout.max_new_tokens=4",
                 f"run.output_dir={out}", "run.progress=false", *extra])


GOOD = {"prompt": "What is 2 + 2?", "answer": 4}


def test_missing_answer_is_a_data_error_before_the_model_loads(tmp_path, no_model, capsys):
    data = _prompts(tmp_path / "p.jsonl", [GOOD, GOOD, {"prompt": "What is 3 + 3?"}])
    assert _grpo(data, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith(f"error: {data}:3: field 'answer': missing (reward source 'math_answer' reads it)")


def test_the_answer_field_argument_names_the_field_checked(tmp_path, no_model, capsys):
    data = _prompts(tmp_path / "p.jsonl", [GOOD])
    assert _grpo(data, tmp_path / "run", "reward.args={answer_field: gold}") == 2
    assert f"error: {data}:1: field 'gold': missing" in capsys.readouterr().err


@pytest.mark.parametrize("gold, problem", [
    ([4], "must be a number or a string, got list"),  # printed as "[4]" it would match 4
    (True, "must be a number or a string, got a boolean"),
    ({"value": 4}, "must be a number or a string, got dict"),
    ("  ", "must not be empty"),
])
def test_answer_of_the_wrong_type_is_a_data_error(tmp_path, no_model, capsys, gold, problem):
    data = _prompts(tmp_path / "p.jsonl", [GOOD, {"prompt": "What is 2 + 2?", "answer": gold}])
    assert _grpo(data, tmp_path / "run") == 2
    assert f"error: {data}:2: field 'answer': {problem} (reward source 'math_answer' reads it)" in capsys.readouterr().err


def test_skip_drops_and_counts_rows_without_the_field_and_none_left_is_an_error(tmp_path):
    data = _prompts(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b", "answer": [1]}])
    cfg = load_config(None, ["algorithm=grpo", f"data.train={data}", "data.on_invalid=skip"])
    from rlmt.rewards import check_reward_fields

    report = load_rows(data, "prompt", "skip")
    with pytest.raises(DataError) as e:
        check_reward_fields(cfg, report.rows, report)
    assert str(e.value) == (f"{data}: 0 rows left; dropped: answer: missing (reward source 'math_answer'): 1, "
                            "answer: must be a number or a string, got list (reward source 'math_answer'): 1")
    data2 = _prompts(tmp_path / "q.jsonl", [GOOD, {"prompt": "b"}])
    report = load_rows(data2, "prompt", "skip")
    assert [r.line for r in check_reward_fields(cfg, report.rows, report)] == [1]
    assert report.skipped == {"answer: missing (reward source 'math_answer')": 1}


def test_eval_data_is_checked_before_training(tmp_path, no_model, capsys):
    train = _prompts(tmp_path / "p.jsonl", [GOOD])
    held = _prompts(tmp_path / "h.jsonl", [GOOD, {"prompt": "x", "answer": None}])
    assert _grpo(train, tmp_path / "run", f"data.eval={held}", "run.eval_before_after=true") == 2
    assert f"error: {held}:2: field 'answer': missing" in capsys.readouterr().err


def test_rlmt_eval_checks_the_fields_before_the_model_loads(tmp_path, no_model, capsys):
    data = _prompts(tmp_path / "p.jsonl", [{"prompt": "x", "answer": False}])
    assert main(["eval", "model.name=tiny-random", f"data.eval={data}"]) == 2
    assert f"error: {data}:1: field 'answer': must be a number or a string" in capsys.readouterr().err


def test_a_source_that_declares_no_fields_checks_none(tmp_path):
    cfg = load_config(None, ["algorithm=grpo", "reward.source=regex", "reward.args={pattern: x}"])
    assert reward_fields(cfg) == {}

    class Custom:
        name = "custom"

        @classmethod
        def required_fields(cls, args):
            return {args.get("key", "k"): lambda v: None if isinstance(v, int) else "must be an int"}

    assert declared_fields(Custom, {"key": "z"}).keys() == {"z"}
    assert declared_fields(Custom, {})["k"]("s") == "must be an int"


def test_scoring_an_unchecked_row_with_a_wrong_type_answer_is_an_error_not_zero():
    source = MathAnswerReward()
    with pytest.raises(RewardError, match="row 0: field 'answer' must be a number or a string, got list"):
        score_checked(source, [{"prompt": "p", "answer": [4]}], ["4"])
    with pytest.raises(RewardError, match="got a boolean"):
        score_checked(source, [{"prompt": "p", "answer": True}], ["true"])
    assert score_checked(source, [{"prompt": "p", "answer": "x^2"}], ["\\boxed{x^2}"]).scores == [1.0]


def test_gold_answer_problem():
    assert [gold_answer_problem(g) for g in (4, 0.5, "1/2", "x^2")] == [None] * 4
    assert gold_answer_problem(float("nan")) == "must be a finite number, got nan"
    assert gold_answer_problem(None) == "must be a number or a string, got NoneType"
