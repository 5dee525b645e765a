"""The sandbox and the ``code_tests`` reward against hostile and honest code.

Every hostile program must score as a failure within its limits and leave no process behind. "Behind" is
checked three ways: no descendant of this test process, no process carrying this process's sandbox marker
in its command line (forks inherit it), and (as root) no live process of this process's sandbox uids.
"""

from __future__ import annotations

import os
import secrets
import socket
import time

import pytest

from rlmt.rewards import build_reward_source
from rlmt.rewards.code_tests import CodeTestsReward, extract_code, normalize_output
from rlmt.rewards.sandbox import _UID_BASE, MARKER, SandboxLimits, run_sandboxed

LIMITS = SandboxLimits(wall_seconds=2.0, cpu_seconds=2.0, memory_mb=256, output_bytes=16 * 1024)
SLACK = 1.5  # seconds allowed beyond the wall limit for start-up, killing and reaping
AS_ROOT = os.geteuid() == 0


def _survivors() -> list[str]:
    """Live processes started by sandboxes of this test process (see the module docstring)."""
    me, marker = os.getpid(), f"{MARKER}={os.getpid()}"
    uid_lo = _UID_BASE + (me % 4_000_000) * 512
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if status.get("State", "").strip().startswith("Z"):
            continue  # already dead, waiting to be reaped
        uid = int(status["Uid"].split()[0])
        if marker in cmdline or uid_lo <= uid < uid_lo + 512 or _descends_from(int(entry), me):
            found.append(f"{entry}: {cmdline[:80]}")
    return found


def _descends_from(pid: int, ancestor: int) -> bool:
    for _ in range(64):
        try:
            with open(f"/proc/{pid}/status") as f:
                pid = int(next(line for line in f if line.startswith("PPid:")).split()[1])
        except (OSError, StopIteration):
            return False
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
    return False


def _score(code: str, tests: list | str, **kwargs) -> tuple[float | None, dict]:
    reward = CodeTestsReward(wall_seconds=LIMITS.wall_seconds, cpu_seconds=LIMITS.cpu_seconds,
                             memory_mb=LIMITS.memory_mb, output_bytes=LIMITS.output_bytes, **kwargs)
    start = time.monotonic()
    result = reward.score([{"prompt": "p", "tests": tests}], [f"```python\n{code}\n```"])
    assert time.monotonic() - start < len(tests if isinstance(tests, list) else [1]) * (LIMITS.wall_seconds + SLACK)
    return result.scores[0], result.details[0]


@pytest.fixture(autouse=True)
def no_survivors():
    yield
    assert _survivors() == []


ESCAPED = [{"input": "", "output": "escaped"}]  # a hostile program prints "escaped" only if its attack worked


def test_infinite_loop_times_out():
    res = run_sandboxed("while True: pass", limits=LIMITS)
    # wall and CPU limits are both 2 s: on an idle machine either may fire first; both end the loop in time
    assert (res.timed_out and res.killed_reason == "timeout") or res.killed_reason == "cpu"
    assert res.returncode != 0 and res.wall_seconds < LIMITS.wall_seconds + SLACK
    assert _score("while True: pass", [{"input": "", "output": ""}])[0] == 0.0


def test_fork_bomb_with_os_fork_and_subprocess():
    score, details = _score("import os\nwhile True:\n    os.fork()\nprint('escaped')", ESCAPED)
    assert score == 0.0 and "PermissionError" in details["tests"][0]["stderr_tail"]
    code = ("import subprocess, sys\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\nprint('escaped')")
    assert _score(code, ESCAPED)[0] == 0.0


def test_fork_bomb_through_libc_bypassing_python():
    code = ("import ctypes\nlibc = ctypes.CDLL(None)\nforked = 0\nfor _ in range(200):\n"
            "    pid = libc.fork()\n    if pid == 0:\n        libc.pause()  # a child that got out sits here\n"
            "    forked += pid > 0\nprint('escaped' if forked else 'contained')")
    res = run_sandboxed(code, limits=LIMITS)
    assert "escaped" not in res.stdout
    if AS_ROOT:  # the sandbox uid makes the kernel enforce RLIMIT_NPROC
        assert res.stdout.strip() == "contained"


def test_memory_hog_fails_fast():
    res = run_sandboxed("x = bytearray(4 << 30)\nprint('escaped')", limits=LIMITS)
    assert res.killed_reason == "memory" and "escaped" not in res.stdout
    assert _score("x = bytearray(4 << 30)\nprint('escaped')", ESCAPED)[0] == 0.0


def test_no_network_even_to_a_local_listener():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        python_level = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('escaped')"
        # The real socket type, fished out from under the Python-level block: only the namespace stops it.
        raw = ("import socket\nreal = [c for c in type.mro(socket.socket) if c.__module__ == '_socket'][0]\n"
               f"s = real(socket.AF_INET, socket.SOCK_STREAM)\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\n"
               "print('escaped')")
        for code in (python_level, raw):
            score, details = _score(code, ESCAPED)
            assert score == 0.0
        if AS_ROOT:  # the kernel refused: the child's network namespace has no usable interface
            assert "Network is unreachable" in details["tests"][0]["stderr_tail"]
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_parent_environment_is_not_visible(monkeypatch):
    secret = f"rlmt-secret-{secrets.token_hex(8)}"
    monkeypatch.setenv("RLMT_SANDBOX_TEST_SECRET", secret)
    code = ("import os\nprint(dict(os.environ))\n"
            "print(open(f'/proc/{os.getppid()}/environ', 'rb').read())")
    res = run_sandboxed(code, limits=LIMITS)
    assert secret not in res.stdout and secret not in res.stderr
    assert res.stdout.splitlines()[0] == str({"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"})
    score, _ = _score("import os\nprint(os.environ.get('RLMT_SANDBOX_TEST_SECRET'))", [{"input": "", "output": secret}])
    assert score == 0.0


def test_stdout_flood_is_cut_off():
    code = "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)"
    res = run_sandboxed(code, limits=LIMITS)
    assert res.killed_reason == "output_limit" and not res.timed_out
    assert len(res.stdout) == LIMITS.output_bytes and res.wall_seconds < LIMITS.wall_seconds


def test_early_exit_before_asserts_fails():
    for exit_call in ("import sys; sys.exit(0)", "import os; os._exit(0)"):
        score, details = _score(f"def add(a, b):\n    return a - b\n{exit_call}", "assert add(1, 2) == 3")
        assert score == 0.0 and details["tests"][0]["returncode"] == 0  # exited "successfully", still failed


ALWAYS_EQUAL = ("class Anything:\n    def __eq__(self, other):\n        return True\n"
                "    def __ne__(self, other):\n        return False\n")


def test_always_equal_object_cannot_pass():
    assert _score(ALWAYS_EQUAL + "print(Anything())", [{"input": "", "output": "42"}])[0] == 0.0
    returned = ALWAYS_EQUAL + "def solve(n):\n    return Anything()\n"
    assert _score(returned, "assert solve(1) == 42")[0] == 0.0
    assert _score(returned.replace("Anything()", "[Anything()]"), "assert solve(1) == [42]")[0] == 0.0
    int_like = "class Sneaky(int):\n    __eq__ = lambda self, other: True\ndef solve(n):\n    return Sneaky(0)\n"
    assert _score(int_like, "assert solve(1) == 42")[0] == 0.0


def test_correct_solutions_pass():
    code = "n = int(input())\nprint(' '.join(str(i * i) for i in range(n)))  \n"
    io_tests = [{"input": "3\n", "output": "0 1 4"}, {"input": "1", "output": "0\n\n"}]
    score, details = _score(code, io_tests)
    assert score == 1.0 and [t["passed"] for t in details["tests"]] == [True, True]
    asserts = "assert square(3) == 9\nassert square(-2) != 5\nassert [square(i) for i in range(3)] == [0, 1, 4]"
    score, details = _score("def square(x):\n    return x * x", asserts)
    assert score == 1.0, details
    assert _score("def square(x):\n    return x * x", [asserts, "assert square(2) == 4"])[0] == 1.0


def test_partial_credit_math():
    code = "x = int(input())\nprint(x * 2 if x < 3 else x)"
    tests = [{"input": str(i), "output": str(2 * i)} for i in range(4)]  # passes 0, 1, 2; fails 3
    score, details = _score(code, tests, partial_credit=True)
    assert score == pytest.approx(3 / 4)
    assert [t["passed"] for t in details["tests"]] == [True, True, True, False]
    score, details = _score(code, tests)  # all-or-nothing stops at the first failure
    assert score == 0.0 and details["passed"] == 3 and len(details["tests"]) == 4


def test_no_code_and_no_tests():
    reward = build_reward_source("code_tests", {"wall_seconds": 2})
    result = reward.score([{"tests": "assert True"}, {"prompt": "no tests"}], ["```python\n\n```", "print(1)"])
    assert result.scores == [0.0, None]
    assert "error" in result.details[0] and "error" in result.details[1]
    with pytest.raises(ValueError, match="bad arguments"):
        build_reward_source("code_tests", {"wall_secs": 2})


def test_concurrent_responses_score_independently():
    reward = CodeTestsReward(wall_seconds=2, max_workers=2)
    rows = [{"tests": [{"input": "2", "output": "4"}]}] * 4
    responses = ["print(int(input()) ** 2)", "print(4)", "print(5)", "```py\nprint(int(input()) * 2)\n```"]
    assert reward.score(rows, responses).scores == [1.0, 1.0, 0.0, 1.0]


def test_extract_code_and_normalize_output():
    text = "Plan:\n```python\nprint(1)\n```\nbetter:\n```python\nprint(2)\n```\nDone."
    assert extract_code(text) == "print(2)\n"
    assert extract_code("```\nprint(3)\n```") == "print(3)\n"
    assert extract_code("```python\nprint(4)") == "print(4)"  # truncated generation
    assert extract_code("print(5)") == "print(5)"
    assert normalize_output("a  \r\nb\t\n\n") == "a\nb"


def test_the_tests_field_is_checked_with_the_data():
    from rlmt.rewards import declared_fields
    from rlmt.rewards.code_tests import tests_problem
    assert list(declared_fields(CodeTestsReward, {"tests_field": "checks"})) == ["checks"]
    assert tests_problem("assert f(1) == 2") is None and tests_problem([{"input": "1", "output": 2}, "assert 1"]) is None
    assert tests_problem("  ") == "must not be empty"
    assert tests_problem([]) == "must be a string of asserts or a non-empty list of tests, got list"
    assert tests_problem({"input": "1"}) == "must be a string of asserts or a non-empty list of tests, got dict"
    assert tests_problem([{"input": "1"}]) == "test 0 has no 'output'"
    assert tests_problem(["assert 1", 3]) == "test 1 must be a string of asserts or {input, output}, got int"
    assert tests_problem([{"input": ["1"], "output": "1"}]) == "test 0: 'input' must be text, got list"
