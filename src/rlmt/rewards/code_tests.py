"""``code_tests``: reward a response by running its Python code against the row's tests in the sandbox.

A row's ``tests`` field (name configurable) is either

* a list of ``{"input": stdin, "output": expected stdout}`` cases: the program passes a case when it exits
  with code 0 within the limits and its stdout equals the expected text, compared as *text* after
  normalising line endings and trailing whitespace (per line and at the end). Comparing text, not Python
  objects, is what stops an object whose ``__eq__`` always returns True from passing; or
* a string of Python ``assert`` statements (or a list of such strings, one test each): the program is the
  code, then the tests with every assert turned into a probe (:mod:`rlmt.rewards.probes`). The child only
  reports the values of the asserts' non-literal parts as plain typed JSON; the parent keeps the literals
  and the comparisons and computes the verdict. No token exists that the code could read and print to pass;
  an early ``sys.exit(0)`` or ``os._exit(0)`` leaves asserts unreported and fails; an object whose ``__eq__``
  always returns True, or an ``int`` subclass, is not a plain value and fails.

Every test runs in :func:`rlmt.rewards.sandbox.run_sandboxed`. When the sandbox cannot isolate the program
(``isolation: strict``, the default, and a layer such as user namespaces is unavailable), nothing runs: the
response is unscored (``None``, counted by the reward contract) and one warning names the missing layer.
``isolation: best_effort`` is the explicit opt-in to run with the layers that could be built.

Score: the fraction of tests passed with ``partial_credit``, else 1.0 only when all pass (stopping at the
first failure). A row without tests scores ``None`` (not the response's fault); a response without code 0.
"""

from __future__ import annotations

import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from rlmt.rewards.base import RewardResult
from rlmt.rewards.probes import compile_probes, verdict
from rlmt.rewards.sandbox import ISOLATION, SandboxLimits, SandboxResult, SandboxUnavailable, run_sandboxed

_PYTHON_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_ANY_FENCE = re.compile(r"```[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_STDERR_TAIL = 300  # characters of stderr kept in details, enough for the exception line


def extract_code(response: str) -> str:
    """The last ```python (or ```py) fenced block; else the last fenced block of any kind; else the whole
    response. A fence left open (a truncated generation) runs to the end of the response."""
    for fence in (_PYTHON_FENCE, _ANY_FENCE):
        blocks = fence.findall(response)
        if blocks:
            return blocks[-1]
    return response


def normalize_output(text: str) -> str:
    """Text for comparison: ``\\r\\n`` as ``\\n``, trailing whitespace dropped from each line and the end."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).rstrip()


def run_io_test(code: str, test: dict, limits: SandboxLimits, isolation: str = "strict") -> dict[str, Any]:
    """Run ``code`` on ``test["input"]`` and compare its stdout as text to ``test["output"]``."""
    res = run_sandboxed(code, stdin=str(test.get("input", "")), limits=limits, isolation=isolation)
    ok = _exited_cleanly(res) and normalize_output(res.stdout) == normalize_output(str(test.get("output", "")))
    return _test_detail(ok, res)


def run_assert_test(code: str, asserts: str, limits: SandboxLimits, isolation: str = "strict") -> dict[str, Any]:
    """Run ``code`` then the probed ``asserts``; the parent decides from the reported values."""
    plan = compile_probes(asserts)
    if plan is None:  # the tests do not parse: run them as they are, so the failure shows in stderr
        res = run_sandboxed(f"{code}\n\n{asserts}\n", limits=limits, isolation=isolation)
        return {**_test_detail(False, res), "why": "the tests do not parse"}
    res = run_sandboxed(f"{code}\n\n{plan.child_source}", limits=limits, isolation=isolation)
    ok, why = verdict(plan, res.stdout)
    ok = ok and _exited_cleanly(res)
    return {**_test_detail(ok, res), **({"why": why} if why else {})}


def _exited_cleanly(res: SandboxResult) -> bool:
    return res.killed_reason is None and res.returncode == 0


def _test_detail(passed: bool, res: SandboxResult) -> dict[str, Any]:
    detail = {"passed": passed, "returncode": res.returncode, "killed_reason": res.killed_reason,
              "wall_seconds": round(res.wall_seconds, 3), "stderr_tail": res.stderr[-_STDERR_TAIL:]}
    if res.missing_layers:  # only with isolation: best_effort
        detail["missing_layers"] = list(res.missing_layers)
    return detail


def tests_problem(tests: Any) -> str | None:
    """Why a row's ``tests`` value cannot be run, or None (checked with the data, before the model loads)."""
    if isinstance(tests, str):
        return None if tests.strip() else "must not be empty"
    if not isinstance(tests, list) or not tests:
        return f"must be a string of asserts or a non-empty list of tests, got {type(tests).__name__}"
    for i, test in enumerate(tests):
        if isinstance(test, str):
            continue
        if not isinstance(test, dict):
            return f"test {i} must be a string of asserts or {{input, output}}, got {type(test).__name__}"
        if "output" not in test:
            return f"test {i} has no 'output'"
        for key in ("input", "output"):
            value = test.get(key, "")
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                return f"test {i}: '{key}' must be text, got {type(value).__name__}"
    return None


class CodeTestsReward:
    """Reward = share of the row's tests that the response's code passes in the sandbox (see module doc).

    Args:
        tests_field: row field holding the tests.
        extract_code: take the last fenced code block of the response (else the whole response as code).
        partial_credit: score the fraction passed; otherwise all-or-nothing.
        max_workers: responses evaluated concurrently (each test is one sandboxed interpreter).
        isolation: ``strict`` (default): refuse to run, and leave the response unscored, when any isolation
            layer of the sandbox cannot be built; ``best_effort``: run with the layers that could be built.
        **limits: :class:`SandboxLimits` fields (``wall_seconds``, ``cpu_seconds``, ``memory_mb``,
            ``max_processes``, ``output_bytes``, ``file_size_bytes``) for every test run.
    """

    name = "code_tests"

    @classmethod
    def required_fields(cls, args: dict[str, Any]) -> dict[str, Any]:
        """The tests field (``tests_field``) and its check."""
        return {args.get("tests_field", "tests"): tests_problem}

    @classmethod
    def score_range(cls, args: dict[str, Any]) -> tuple[float, float]:
        """The share of tests passed: 0 to 1 (all-or-nothing gives only the ends)."""
        return 0.0, 1.0

    def __init__(self, tests_field: str = "tests", extract_code: bool = True, partial_credit: bool = False,
                 max_workers: int = 2, isolation: str = "strict", **limits: Any) -> None:
        if max_workers < 1:
            raise ValueError(f"code_tests: max_workers must be >= 1, got {max_workers}")
        if isolation not in ISOLATION:
            raise ValueError(f"code_tests: isolation must be one of {list(ISOLATION)}, got {isolation!r}")
        self.isolation = isolation
        self.tests_field = tests_field
        self.extract_code = extract_code
        self.partial_credit = partial_credit
        self.max_workers = max_workers
        self.limits = SandboxLimits(**limits)  # an unknown key is a TypeError, reported by the registry

    def score(self, rows: Sequence[dict], responses: Sequence[str]) -> RewardResult:
        """Score each response against its row's tests; runs up to ``max_workers`` responses at once."""
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            results = list(pool.map(self._score_one, rows, responses))
        return RewardResult([s for s, _ in results], [d for _, d in results])

    def _score_one(self, row: dict, response: str) -> tuple[float | None, dict[str, Any]]:
        tests = row.get(self.tests_field)
        if isinstance(tests, str):
            tests = [tests]
        if not isinstance(tests, list) or not tests:
            return None, {"error": f"row has no tests in field {self.tests_field!r}"}
        code = extract_code(response) if self.extract_code else response
        if not code.strip():
            return 0.0, {"error": "no code in response", "passed": 0, "total": len(tests)}
        details: list[dict[str, Any]] = []
        for test in tests:
            try:
                if isinstance(test, dict):
                    detail = run_io_test(code, test, self.limits, self.isolation)
                elif isinstance(test, str):
                    detail = run_assert_test(code, test, self.limits, self.isolation)
                else:
                    return None, {"error": f"test of type {type(test).__name__}; expected dict or str"}
            except SandboxUnavailable as e:
                warnings.warn(f"code_tests: {e}; responses are left unscored", RuntimeWarning, stacklevel=2)
                return None, {"error": f"sandbox unavailable: {e.layer}", "detail": e.detail}
            if detail.get("missing_layers"):
                warnings.warn(f"code_tests: isolation best_effort: running without {detail['missing_layers']}",
                              RuntimeWarning, stacklevel=2)
            details.append(detail)
            if not detail["passed"] and not self.partial_credit:
                break  # all-or-nothing: the score is already 0
        passed = sum(d["passed"] for d in details)
        score = passed / len(tests) if self.partial_credit else float(passed == len(tests))
        return score, {"passed": passed, "total": len(tests), "tests": details}
