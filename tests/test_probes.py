"""Assert-style tests judged by the parent: the semantics of the probes and the attacks on them."""

from __future__ import annotations

import pytest

from rlmt.rewards.code_tests import CodeTestsReward
from rlmt.rewards.probes import compile_probes, decode, verdict


def _score(code: str, tests: str | list) -> tuple[float | None, dict]:
    result = CodeTestsReward(wall_seconds=5, cpu_seconds=5).score([{"tests": tests}], [f"```python\n{code}\n```"])
    return result.scores[0], result.details[0]


# Reads its own program (the bootstrap's frame holds it), forges a passing report for every probe of the
# protocol, prints every token-looking string found there on a line of its own (last), then exits "successfully".
# Before the parent judged the values, printing the token was enough to pass.
FORGER = r'''
import os, re, sys
frame, source = sys._getframe(), ""
while frame is not None:
    for value in list(frame.f_locals.values()):
        if isinstance(value, str) and "rlmt" in value and len(value) > len(source):
            source = value
    frame = frame.f_back
nonce = (re.findall(r"rlmt-probe-[0-9a-f]+", source) or ["none"])[0]
for k in range(source.count("__rlmt_probe__(") + 1):
    os.write(1, f'\n{nonce} {k} [{{"i":"0"}},{{"i":"0"}}]\n{nonce} {k} [{{"i":"0"}}]\n'.encode())
os.write(1, f"\n{nonce} done\n".encode())
for token in sorted(set(re.findall(r"rlmt-[a-z-]+-[0-9a-f]{16,}", source))):
    os.write(1, ("\n" + token + "\n").encode())
os._exit(0)
'''


def test_a_program_cannot_pass_by_printing_tokens_or_forging_reports():
    tests = "assert add(1, 2) == 3\nassert add(2, 2) == 4"
    score, details = _score("def add(a, b):\n    return 0\n" + FORGER, tests)
    assert score == 0.0, details
    assert _score("def add(a, b):\n    return a + b\n", tests)[0] == 1.0


def test_literal_expectations_never_enter_the_child():
    plan = compile_probes("assert solve(7) == 987654321\nassert solve(8) in [13579, 24680]\nassert not odd(4)")
    assert plan is not None
    for secret in ("987654321", "13579", "24680"):
        assert secret not in plan.child_source
    tests_part = plan.child_source.split("del __rlmt_harness__")[1]
    assert "not" not in tests_part and "solve(7)" in tests_part and "odd(4)" in tests_part


@pytest.mark.parametrize(("code", "tests", "passed"), [
    ("def f(r):\n    return r", "assert f([]) == [] or f([])[0] == 1", True),  # short-circuit: the IndexError
    ("def f(r):\n    return r", "assert f([2]) == [] or f([2])[0] == 1", False),  # ... is needed here
    ("def f(x):\n    return x * 2", "assert 0 < f(3) <= 6 < f(4)", True),
    ("def f(x):\n    return x * 2", "assert 0 < f(3) < 6", False),
    ("def f():\n    return None", "assert f() is None\nassert f() is not False", True),
    ("def f():\n    return [1, 2]", "assert f() == (1, 2)", False),  # a list is not a tuple, as in Python
    ("def f():\n    return {1: 'a', (2, 3): b'x'}", "assert f() == {(2, 3): b'x', 1: 'a'}", True),
    ("def f():\n    return {1, 2}", "assert f() == {2, 1} and f() != frozenset()", True),
    ("def f():\n    return float('nan')", "assert f() == f()", False),
    ("def f():\n    return 10 ** 5000", "assert f() == 10 ** 5000 and f() > 10 ** 4999", True),  # > 4300 digits
    ("def f():\n    return 'caf\\u00e9 \\ud800'", "assert f() == 'caf\\u00e9 \\ud800'", True),
    ("def f(x):\n    return x > 1", "assert f(2)\nassert not f(1)", True),
    ("def f(x):\n    return x > 1", "assert not f(2)", False),
    ("def sq(x):\n    return x * x", "def check(candidate):\n    for i in range(3):\n        assert candidate(i) == i * i\n"
     "check(sq)", True),
    ("def sq(x):\n    return x * x", "def check(candidate):\n    assert candidate(2) == 4\n", False),  # never called
    ("def sq(x):\n    return x * x", "if sq(2) != 4:\n    raise ValueError", True),  # no assert: must run to the end
    ("def sq(x):\n    return x * x\nimport sys\nsys.exit(0)", "if sq(2) != 4:\n    raise ValueError", False),
    ("from __future__ import annotations\ndef f(x: int) -> int:\n    return x", "assert f(1) == 1", True),
    ("def f():\n    return lambda: 1", "assert f() == 1", False),  # not a plain value
    ("def f():\n    x = []\n    x.append(x)\n    return x", "assert f() == [[]]", False),  # too deep
])
def test_assert_semantics(code, tests, passed):
    score, details = _score(code, tests)
    assert score == float(passed), details


def test_verdict_rejects_malformed_reports():
    plan = compile_probes("assert f(1) == 2")
    assert plan is not None
    good = f'{plan.nonce} 0 [{{"i":"2"}}]\n{plan.nonce} done'
    assert verdict(plan, good) == (True, "")
    for stdout in (f"{plan.nonce} done",  # the assert never reported
                   f'{plan.nonce} 0 [{{"i":"2"}}]',  # no end marker
                   good + f'\n{plan.nonce} 0 [{{"i":"3"}}]',  # a second, failing run of the same assert
                   good + f'\n{plan.nonce} 0 [{{"i":"2"}},{{"i":"2"}}]',  # wrong number of leaves
                   good + f'\n{plan.nonce} 7 [{{"i":"2"}}]',  # an assert that does not exist
                   f'{plan.nonce} 0 [{{"x":"2"}}]\n{plan.nonce} done',  # unknown tag
                   f'{plan.nonce} 0 [{{"i":"zz"}}]\n{plan.nonce} done',
                   f'{plan.nonce} 0 not json\n{plan.nonce} done'):
        assert verdict(plan, stdout)[0] is False, stdout


def test_decode_round_trips_plain_values():
    assert decode({"t": [{"i": "-ff"}, {"f": (0.1).hex()}, {"c": ["0x1p+0", "-0x1p+1"]}, {"N": 0}, {"B": 1}]}) == (
        -255, 0.1, 1 - 2j, None, True)
    assert decode({"F": [{"s": "6869"}]}) == frozenset({"hi"})
