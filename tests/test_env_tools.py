"""Tools (rlmt.envs.tools): parsing what the model writes, the calculator's bounds, every bad call as an error the
model sees, user tools with a time limit, the python tool in the sandbox, and the shipped environments' rules."""

import json
import os
import time

import pytest

from rlmt.config import Config, ConfigError, EnvConfig
from rlmt.envs import ToolCall, ToolError, Toolbox, calculate, parse_tool_calls, toolbox_for
from rlmt.envs.arithmetic import ToolArithmetic
from rlmt.envs.guess import GuessNumber
from rlmt.envs.tools import calculator_tool, user_tool


def _cfg(**env) -> Config:
    return Config(env=EnvConfig(**env))


def call(name, **arguments) -> str:
    return f'<tool_call>{json.dumps({"name": name, "arguments": arguments})}</tool_call>'


def test_parse_tool_calls():
    text = "first " + call("calculator", expression="1+2") + " then " + call("python", code="print(1)")
    assert parse_tool_calls(text) == [ToolCall("calculator", {"expression": "1+2"}),
                                      ToolCall("python", {"code": "print(1)"})]
    assert parse_tool_calls("no calls here") == []
    assert parse_tool_calls('<tool_call>{"name": "x", "arguments": "{\\"a\\": 1}"}</tool_call>') == [
        ToolCall("x", {"a": 1})]  # arguments written as a JSON string
    bad = parse_tool_calls("<tool_call>{name: calculator}</tool_call>")
    assert len(bad) == 1 and "not valid JSON" in bad[0].error
    assert "name" in parse_tool_calls('<tool_call>[1, 2]</tool_call>')[0].error
    assert "JSON object" in parse_tool_calls('<tool_call>{"name": "x", "arguments": [1]}</tool_call>')[0].error
    unclosed = parse_tool_calls('<tool_call>{"name": "calculator"')
    assert len(unclosed) == 1 and "not closed" in unclosed[0].error


@pytest.mark.parametrize("expr,value", [("1234 * 5678", 7006652), ("(1 + 2) * 3 - 4 / 8", 8.5), ("2 ** 10", 1024),
                                        ("-7 // 2", -4), ("17 % 5", 2), ("1.5e3 + 1", 1501.0)])
def test_calculator_values(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize("expr,problem", [("__import__('os')", "only numbers"), ("x + 1", "only numbers"),
                                          ("9 ** 9 ** 9", "exponent"), ("(10 ** 60) ** 60", "digits"),
                                          ("1 / 0", "division by zero"), ("1" * 201, "longer than"),
                                          ("1e308 * 10", "not finite"), ("[1, 2]", "only numbers"),
                                          ("(-8) ** 0.5", "complex"), ("1 +", "not an arithmetic")])
def test_calculator_refuses_and_bounds(expr, problem):
    t0 = time.perf_counter()
    with pytest.raises(ToolError, match=problem):
        calculate(expr)
    assert time.perf_counter() - t0 < 1.0


def test_every_bad_call_becomes_an_error_the_model_sees():
    box = Toolbox([calculator_tool(), user_tool("env_tools:broken"), user_tool("env_tools:lookup")], timeout_s=2)
    assert box.call(ToolCall("calculator", {"expression": "6 * 7"})) == ("42", False)
    cases = {"malformed": (parse_tool_calls("<tool_call>{oops</tool_call>")[0], "not valid JSON"),
             "unknown tool": (ToolCall("search", {}), "unknown tool 'search'"),
             "missing argument": (ToolCall("calculator", {}), "missing argument"),
             "unknown argument": (ToolCall("calculator", {"expression": "1", "x": 2}), "unknown argument"),
             "wrong type": (ToolCall("calculator", {"expression": 12}), "must be string"),
             "tool error": (ToolCall("calculator", {"expression": "1/0"}), "division by zero"),
             "tool raises": (ToolCall("broken", {"x": "this"}), "RuntimeError: cannot handle this"),
             "schema attribute": (ToolCall("lookup", {"key": "b"}), "KeyError")}
    for name, (c, message) in cases.items():
        reply, failed = box.call(c)
        assert failed and reply.startswith("error:") and message in reply, (name, reply)


def test_user_tools_run_with_a_schema_from_the_signature_and_are_killed_at_the_limit():
    add = user_tool("env_tools:add")
    assert add.schema == {"name": "add", "description": "Add two integers.",
                          "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                                          "b": {"type": "integer"}},
                                         "required": ["a", "b"]}}
    box = Toolbox([add, user_tool("env_tools:sleepy")], timeout_s=0.5)
    assert box.call(ToolCall("add", {"a": 2, "b": 40})) == ("42", False)
    assert box.call(ToolCall("add", {"a": 2, "b": "x"}))[1]  # the schema's types are enforced
    t0 = time.perf_counter()
    reply, failed = box.call(ToolCall("sleepy", {"seconds": 30}))
    assert failed and "no reply within 0.5 s" in reply and time.perf_counter() - t0 < 5


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_a_user_tools_process_holds_no_other_calls_pipes(tmp_path):
    """Steps run on threads, so a tool's fork copies the pipe ends of calls in flight on other threads; the
    child closes every inherited pipe but its own reply pipe (held, another call's end would keep that call
    from seeing its child finish), and keeps other descriptors (a file the user's module opened)."""
    other_r, other_w = os.pipe()  # another call's pipe, open in the trainer while this one forks
    kept = open(tmp_path / "file", "w")
    kept_fd = kept.fileno()
    try:
        reply, failed = Toolbox([user_tool("env_tools:open_descriptors")]).call(ToolCall("open_descriptors", {}))
    finally:
        os.close(other_r), os.close(other_w)
        kept.close()
    assert not failed, reply
    pipes, others = (part.split(":")[1].split() for part in reply.split(";"))
    assert str(other_r) not in pipes and str(other_w) not in pipes and len(pipes) == 1  # its reply pipe
    assert str(kept_fd) in others


def test_tool_replies_are_cut_to_the_configured_length():
    box = Toolbox([calculator_tool()], output_chars=5)
    reply, failed = box.call(ToolCall("calculator", {"expression": "10 ** 20"}))
    assert not failed and reply.startswith("10000...") and "cut at 5" in reply


def test_python_tool_runs_in_the_sandbox():
    box = toolbox_for(_cfg(tools=["python"], tool_timeout_s=5))
    assert box.call(ToolCall("python", {"code": "print(sum(range(101)))"})) == ("5050", False)
    reply, failed = box.call(ToolCall("python", {"code": "import socket; socket.socket()"}))
    assert failed and "error" in reply
    reply, failed = box.call(ToolCall("python", {"code": "while True: pass"}))
    assert failed and "stopped" in reply


def test_toolbox_config_errors():
    with pytest.raises(ConfigError, match=r"env.tools.0: unknown tool 'calculater'"):
        toolbox_for(_cfg(tools=["calculater"]))
    with pytest.raises(ConfigError, match="cannot import tool"):
        toolbox_for(_cfg(tools=["env_tools:nothing"]))
    with pytest.raises(ConfigError, match="share a name"):
        toolbox_for(_cfg(tools=["calculator", "calculator"]))
    with pytest.raises(ConfigError, match="env.tool_timeout_s"):
        toolbox_for(_cfg(tools=["calculator"], tool_timeout_s=0))


def test_tool_arithmetic_turns():
    env = ToolArithmetic(Toolbox([calculator_tool()]))
    env.reset({"prompt": "What is 1234 * 5678?", "answer": 7006652}, seed=0)
    step = env.step("Let me compute. " + call("calculator", expression="1234 * 5678"))
    assert not step.done and step.messages == [{"role": "tool", "content": "7006652"}]
    assert step.info == {"tool_calls": 1, "tool_errors": 0} and step.reward is None
    step = env.step(call("calculator", expression="1234 *") + call("nope"))
    assert not step.done and step.info == {"tool_calls": 2, "tool_errors": 2}
    assert all(m["content"].startswith("error:") for m in step.messages)
    assert env.step("The answer is 7006652.").reward == 1.0
    env.reset({"prompt": "What is 2 * 3?", "answer": 6}, seed=0)
    step = env.step("It is 5")
    assert step.done and step.reward == 0.0
    bare = ToolArithmetic(None)  # no tools: the first turn is the answer, whatever it writes
    bare.reset({"prompt": "What is 2 * 3?", "answer": 6}, seed=0)
    assert bare.step(call("calculator", expression="2*3") + " 6").done


def test_guess_number_rules():
    secrets = []
    for seed in (3, 3, 4, 5, 6):
        g = GuessNumber(low=1, high=100)
        g.reset({"prompt": "guess"}, seed=seed)
        secrets.append(g.secret)
    assert secrets[0] == secrets[1] and len(set(secrets)) > 2  # the seed fixes the secret
    env = GuessNumber(low=1, high=100, penalty=0.25)
    env.reset({"prompt": "guess", "secret": 40}, seed=3)
    s = env.step("I guess 10")
    assert not s.done and "higher" in s.messages[0]["content"]
    s = env.step("no idea")
    assert not s.done and "one integer" in s.messages[0]["content"]
    s = env.step("50 then")
    assert "lower" in s.messages[0]["content"]
    s = env.step("40")
    assert s.done and s.reward == pytest.approx(1 - 0.25 * 3)
    with pytest.raises(ValueError):
        GuessNumber(low=5, high=5)


def test_calls_that_cannot_be_read_are_errors_the_model_sees():
    box = Toolbox([calculator_tool()])
    for text in ['<tool_call>' + "[" * 100_000 + '</tool_call>',
                 '<tool_call>{"name": "calculator", "arguments": {"expression": ' + "9" * 5000 + '}}</tool_call>']:
        (c,) = parse_tool_calls(text)
        reply, failed = box.call(c)
        assert failed and reply.startswith("error: the tool call")


def test_the_python_tool_needs_a_working_sandbox(monkeypatch):
    import rlmt.rewards.sandbox as sandbox
    from rlmt.rewards.sandbox import SandboxUnavailable

    def unavailable(*a, **k):
        raise SandboxUnavailable("user namespaces", "disabled")

    monkeypatch.setattr(sandbox, "run_sandboxed", unavailable)
    with pytest.raises(ConfigError, match="env.tools: the python tool needs the code sandbox"):
        toolbox_for(_cfg(tools=["python"]))
    box = Toolbox([__import__("rlmt.envs.tools", fromlist=["python_tool"]).python_tool()])
    with pytest.raises(SandboxUnavailable):  # at run time: the episode fails, not the model
        box.call(ToolCall("python", {"code": "print(1)"}))
