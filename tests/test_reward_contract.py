"""The reward-source contract: misbehaving sources are clear errors naming the source, never a silent 0."""

import math

import pytest

from rlmt.rewards import RewardError, RewardResult, score_checked


class Fixed:
    name = "fixed"

    def __init__(self, scores, raises=None):
        self.scores, self.raises = scores, raises

    def score(self, rows, responses):
        if self.raises:
            raise self.raises
        return RewardResult(list(self.scores), [{} for _ in self.scores])


ROWS, RESP = [{"prompt": "a"}, {"prompt": "b"}], ["x", "y"]


def test_exception_names_the_source():
    with pytest.raises(RewardError, match="'fixed' raised KeyError"):
        score_checked(Fixed([], raises=KeyError("answer")), ROWS, RESP)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_is_an_error_or_counted_none(bad):
    with pytest.raises(RewardError, match="non-finite"):
        score_checked(Fixed([1.0, bad]), ROWS, RESP)
    out = score_checked(Fixed([1.0, bad]), ROWS, RESP, invalid_as_none=True)
    assert out.scores == [1.0, None] and "non-finite" in out.details[1]["error"]


def test_wrong_count_is_always_an_error():
    for scores in ([1.0], [1.0, 0.0, 1.0]):
        with pytest.raises(RewardError, match="returned .* scores for 2 responses"):
            score_checked(Fixed(scores), ROWS, RESP, invalid_as_none=True)


def test_none_passes_through_and_numbers_are_floats():
    out = score_checked(Fixed([None, 1]), ROWS, RESP)
    assert out.scores[0] is None and isinstance(out.scores[1], float) and not math.isnan(out.scores[1])
