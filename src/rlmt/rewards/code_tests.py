"""``code_tests``: reward a response by running its Python code against the row's tests in the sandbox.

A row's ``tests`` field (name configurable) is either

* a list of ``{"input": stdin, "output": expected stdout}`` cases: the program passes a case when it exits
  with code 0 within the limits and its stdout equals the expected text, compared as *text* after
  normalising line endings and trailing whitespace (per line and at the end). Comparing text, not Python
  objects, is what stops an object whose ``__eq__`` always returns True from passing; or
* a string of Python ``assert`` statements (or a list of such strings, one test each): the program is the
  code, then the asserts, then ``print(<nonce>)`` with a fresh random nonce per run; it passes when it exits
  with code 0 and the last line of stdout is that nonce. An early ``sys.exit(0)`` or ``os._exit(0)`` in the
  code skips the asserts and the nonce, and so fails. Every single ``a == b`` / ``a != b`` in the tests is
  rewritten to a checked comparison that fails when a plain value (int, str, list, dict, ...) is compared
  with anything that is not plain, at any depth, so an always-equal object cannot pass
  ``assert f(x) == 3``. These are Python-level guards against reward hacks a policy stumbles on, not
  against code that patches builtins or introspects the interpreter to find the nonce.

Score: the fraction of tests passed with ``partial_credit``, else 1.0 only when all pass (stopping at the
first failure). A row without tests scores ``None`` (not the response's fault); a response without code 0.
"""

from __future__ import annotations

import ast
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from rlmt.rewards.base import RewardResult
from rlmt.rewards.sandbox import SandboxLimits, SandboxResult, run_sandboxed

_PYTHON_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_ANY_FENCE = re.compile(r"```[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_STDERR_TAIL = 300  # characters of stderr kept in details, enough for the exception line

# Defined after the user's code (so it cannot be pre-empted by it) and called by the rewritten asserts.
_COMPARE_HELPER = '''
def __rlmt_compare__(left, right, want_equal):
    plain = (bool, int, float, complex, str, bytes, type(None), list, tuple, dict, set, frozenset)
    def refuse(a, b):
        raise AssertionError(f"compared {type(a).__name__} with {type(b).__name__}: a plain value "
                             "may only be compared with a plain value")
    def hashable_plain(k):
        if type(k) not in plain:
            refuse(k, None)
        if type(k) in (tuple, frozenset):
            for x in k:
                hashable_plain(x)
    def check(a, b):
        if (type(a) in plain) != (type(b) in plain):
            refuse(a, b)
        if type(a) in (list, tuple) and type(b) is type(a) and len(a) == len(b):
            for x, y in zip(a, b):
                check(x, y)
        elif type(a) is dict and type(b) is dict:
            for k in [*a, *b]:
                hashable_plain(k)
            for k in a.keys() & b.keys():
                check(a[k], b[k])
        elif type(a) in (set, frozenset) and type(b) in (set, frozenset):
            for x in [*a, *b]:
                hashable_plain(x)
    check(left, right)
    return left == right if want_equal else left != right
'''


class _CheckedComparisons(ast.NodeTransformer):
    """Rewrites ``a == b`` / ``a != b`` (single comparisons) to ``__rlmt_compare__(a, b, want_equal)``."""

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        if len(node.ops) != 1 or not isinstance(node.ops[0], (ast.Eq, ast.NotEq)):
            return node
        call = ast.Call(func=ast.Name("__rlmt_compare__", ast.Load()), keywords=[],
                        args=[node.left, node.comparators[0], ast.Constant(isinstance(node.ops[0], ast.Eq))])
        return ast.copy_location(call, node)


def checked_asserts(asserts: str) -> str:
    """``asserts`` with every single ``==`` / ``!=`` checked (see the module doc); unchanged if it does not
    parse (it will then fail in the sandbox as it is)."""
    try:
        tree = _CheckedComparisons().visit(ast.parse(asserts))
    except SyntaxError:
        return asserts
    return _COMPARE_HELPER + "\n" + ast.unparse(ast.fix_missing_locations(tree))


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


def run_io_test(code: str, test: dict, limits: SandboxLimits) -> dict[str, Any]:
    """Run ``code`` on ``test["input"]`` and compare its stdout as text to ``test["output"]``."""
    res = run_sandboxed(code, stdin=str(test.get("input", "")), limits=limits)
    ok = _exited_cleanly(res) and normalize_output(res.stdout) == normalize_output(str(test.get("output", "")))
    return _test_detail(ok, res)


def run_assert_test(code: str, asserts: str, limits: SandboxLimits) -> dict[str, Any]:
    """Run ``code``, then ``asserts``, then print a fresh nonce; pass only if the nonce ends stdout."""
    nonce = f"rlmt-tests-passed-{secrets.token_hex(16)}"
    res = run_sandboxed(f"{code}\n\n{checked_asserts(asserts)}\n\nprint({nonce!r})\n", limits=limits)
    lines = res.stdout.rstrip().splitlines()
    ok = _exited_cleanly(res) and bool(lines) and lines[-1].rstrip() == nonce
    return _test_detail(ok, res)


def _exited_cleanly(res: SandboxResult) -> bool:
    return res.killed_reason is None and res.returncode == 0


def _test_detail(passed: bool, res: SandboxResult) -> dict[str, Any]:
    return {"passed": passed, "returncode": res.returncode, "killed_reason": res.killed_reason,
            "wall_seconds": round(res.wall_seconds, 3), "stderr_tail": res.stderr[-_STDERR_TAIL:]}


class CodeTestsReward:
    """Reward = share of the row's tests that the response's code passes in the sandbox (see module doc).

    Args:
        tests_field: row field holding the tests.
        extract_code: take the last fenced code block of the response (else the whole response as code).
        partial_credit: score the fraction passed; otherwise all-or-nothing.
        max_workers: responses evaluated concurrently (each test is one sandboxed interpreter).
        **limits: :class:`SandboxLimits` fields (``wall_seconds``, ``cpu_seconds``, ``memory_mb``,
            ``max_processes``, ``output_bytes``, ``file_size_bytes``) for every test run.
    """

    name = "code_tests"

    def __init__(self, tests_field: str = "tests", extract_code: bool = True, partial_credit: bool = False,
                 max_workers: int = 2, **limits: Any) -> None:
        if max_workers < 1:
            raise ValueError(f"code_tests: max_workers must be >= 1, got {max_workers}")
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
            if isinstance(test, dict):
                detail = run_io_test(code, test, self.limits)
            elif isinstance(test, str):
                detail = run_assert_test(code, test, self.limits)
            else:
                return None, {"error": f"test of type {type(test).__name__}; expected dict or str"}
            details.append(detail)
            if not detail["passed"] and not self.partial_credit:
                break  # all-or-nothing: the score is already 0
        passed = sum(d["passed"] for d in details)
        score = passed / len(tests) if self.partial_credit else float(passed == len(tests))
        return score, {"passed": passed, "total": len(tests), "tests": details}
