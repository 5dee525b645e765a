"""Tools in the OpenAI function-calling convention, the calls a model writes, and running them safely.

A tool is a function with a JSON schema ``{"name", "description", "parameters": {"type": "object",
"properties": ..., "required": [...]}}``. A model calls one by writing

    <tool_call>{"name": "calculator", "arguments": {"expression": "17 * 23"}}</tool_call>

(the format Hermes/Qwen templates use; :func:`rlmt.envs.render.tool_instructions` teaches it where the chat
template has no tools of its own), and sees the result as a ``tool`` message. Everything the model writes is
untrusted: a malformed call, an unknown tool, arguments that do not match the schema, a tool that raises and
one that runs past ``env.tool_timeout_s`` each become an ``error: ...`` message the model sees and a count in
``env/tool_errors``, never an exception in the trainer.

Built in: ``calculator`` (:func:`calculate`, an arithmetic evaluator over the expression's syntax tree with
bounded sizes, in process) and ``python`` (the program runs in the code sandbox,
:func:`rlmt.rewards.sandbox.run_sandboxed`, with its time, memory, process and network limits; it prints its
result). A user tool is ``module:function``: a function taking keyword arguments, with a ``schema``
attribute or else a schema read from its typed signature and docstring; it runs in a forked child process
that is killed at the time limit.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import math
import multiprocessing
import operator
import os
import re
import stat
from dataclasses import dataclass
from typing import Any, Callable

from rlmt.config import ConfigError
from rlmt.rewards.sandbox import SandboxUnavailable

CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


@dataclass(frozen=True)
class Tool:
    """A callable tool: its schema and how to run it (``run(arguments, timeout_s) -> str``, raising
    :class:`ToolError` for an error the model should see)."""

    schema: dict
    run: Callable[[dict, float], str]

    @property
    def name(self) -> str:
        return self.schema["name"]


class ToolError(Exception):
    """A tool call that failed; its message is shown to the model."""


@dataclass(frozen=True)
class ToolCall:
    """A parsed call: the tool's name and arguments, or the problem with what the model wrote."""

    name: str
    arguments: dict
    error: str | None = None


def parse_tool_calls(text: str) -> list[ToolCall]:
    """The ``<tool_call>`` blocks of an assistant turn in order, each parsed or carrying its error; an opened
    block that is never closed counts as a malformed call."""
    calls = []
    for body in CALL.findall(text):
        try:
            obj = json.loads(body.strip())
        except json.JSONDecodeError as e:
            calls.append(ToolCall("", {}, f"the tool call is not valid JSON ({e.msg} at character {e.pos})"))
            continue
        except (ValueError, RecursionError) as e:  # a number past Python's digit limit, nesting past the stack
            calls.append(ToolCall("", {}, f"the tool call cannot be read ({type(e).__name__})"))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            calls.append(ToolCall("", {}, 'a tool call is {"name": "...", "arguments": {...}}'))
            continue
        args = obj.get("arguments", {})
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        if not isinstance(args, dict):
            calls.append(ToolCall(obj["name"], {}, "the tool call's arguments must be a JSON object"))
            continue
        calls.append(ToolCall(obj["name"], args))
    if text.count("<tool_call>") > len(CALL.findall(text)):
        calls.append(ToolCall("", {}, "a <tool_call> was opened but not closed with </tool_call>"))
    return calls


_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict,
               "array": list}


def check_arguments(schema: dict, arguments: dict) -> str | None:
    """None when ``arguments`` fit the schema's ``parameters`` (required keys present, no unknown keys, JSON
    types of the properties), else the problem in words."""
    params = schema.get("parameters", {})
    props, required = params.get("properties", {}), params.get("required", [])
    missing = [k for k in required if k not in arguments]
    if missing:
        return f"missing argument(s) {missing} (required: {required})"
    unknown = [k for k in arguments if k not in props]
    if unknown:
        return f"unknown argument(s) {unknown} (it takes: {sorted(props)})"
    for key, value in arguments.items():
        want = props[key].get("type")
        kind = _JSON_TYPES.get(want)
        if kind is not None and (not isinstance(value, kind) or (want in ("integer", "number")
                                                                  and isinstance(value, bool))):
            return f"argument {key!r} must be {want}, got {type(value).__name__}"
    return None


class Toolbox:
    """The run's tools by name; :meth:`call` runs one call and always returns the text the model sees."""

    def __init__(self, tools: list[Tool], timeout_s: float = 5.0, output_chars: int = 2000):
        self.tools = {t.name: t for t in tools}
        self.timeout_s, self.output_chars = timeout_s, output_chars

    @property
    def schemas(self) -> list[dict]:
        return [t.schema for t in self.tools.values()]

    def call(self, call: ToolCall) -> tuple[str, bool]:
        """(the reply the model sees, whether the call failed)."""
        if call.error is not None:
            return f"error: {call.error}", True
        tool = self.tools.get(call.name)
        if tool is None:
            return f"error: unknown tool {call.name!r} (tools: {sorted(self.tools)})", True
        problem = check_arguments(tool.schema, call.arguments)
        if problem is not None:
            return f"error: {call.name}: {problem}", True
        try:
            out, failed = str(tool.run(call.arguments, self.timeout_s)), False
        except ToolError as e:
            out, failed = f"error: {call.name}: {e}", True
        except SandboxUnavailable:  # the machine's fault, not the model's: the episode fails, counted and shown
            raise
        except Exception as e:  # noqa: BLE001 - a tool's failure is the model's to see, not the trainer's
            out, failed = f"error: {call.name} raised {type(e).__name__}: {e}", True
        if len(out) > self.output_chars:
            out = out[:self.output_chars] + f"... [cut at {self.output_chars} characters]"
        return out, failed


# ------------------------------------------------------------------------------------------------ calculator

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPRESSION_CHARS, MAX_DIGITS, MAX_EXPONENT = 200, 100, 64


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression: numbers, + - * / // % ** and parentheses, nothing else.

    Bounded so no input can hang or exhaust memory: at most ``MAX_EXPRESSION_CHARS`` characters, exponents of at
    most ``MAX_EXPONENT``, and every intermediate integer below 10**``MAX_DIGITS``. Raises :class:`ToolError`."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from None

    def ev(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return _bounded(node.value)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
                raise ToolError(f"exponent {right} is larger than {MAX_EXPONENT}")
            try:
                return _bounded(_BINARY[type(node.op)](left, right))
            except ZeroDivisionError:
                raise ToolError("division by zero") from None
            except OverflowError:
                raise ToolError("result too large") from None
        raise ToolError(f"only numbers and + - * / // % ** ( ) are allowed, not {type(node).__name__}")

    value = ev(tree)
    if isinstance(value, complex):
        raise ToolError("complex result")
    return value


def _bounded(x: Any) -> int | float:
    if isinstance(x, int) and abs(x) >= 10 ** MAX_DIGITS:
        raise ToolError(f"a number with more than {MAX_DIGITS} digits")
    if isinstance(x, float) and not math.isfinite(x):
        raise ToolError("result is not finite")
    return x


def _format_number(x: int | float) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(x)


def calculator_tool() -> Tool:
    schema = {"name": "calculator", "description": "Evaluate an arithmetic expression (+ - * / // % ** and "
                                                   "parentheses) and return its value.",
              "parameters": {"type": "object", "properties": {"expression": {"type": "string",
                                                                            "description": "e.g. 1234 * 56"}},
                             "required": ["expression"]}}
    return Tool(schema, lambda args, _timeout: _format_number(calculate(args["expression"])))


# ------------------------------------------------------------------------------------------------ python

def python_tool(memory_mb: int = 256, isolation: str = "strict") -> Tool:
    """Run a Python program in the code sandbox; the reply is what it printed (stdout, then stderr)."""
    schema = {"name": "python", "description": "Run a Python program and return what it prints.",
              "parameters": {"type": "object", "properties": {"code": {"type": "string",
                                                                      "description": "the program; print the result"}},
                             "required": ["code"]}}

    def run(args: dict, timeout_s: float) -> str:
        from rlmt.rewards.sandbox import SandboxLimits, run_sandboxed

        limits = SandboxLimits(wall_seconds=timeout_s, cpu_seconds=timeout_s, memory_mb=memory_mb)
        res = run_sandboxed(args["code"], limits=limits, isolation=isolation)
        if res.killed_reason is not None:
            raise ToolError(f"the program was stopped ({res.killed_reason})")
        out = res.stdout + (res.stderr if res.returncode else "")
        if res.returncode:
            raise ToolError(f"exit status {res.returncode}: {out.strip()[-500:]}")
        return out.strip() or "(no output; print the result)"

    return Tool(schema, run)


# ------------------------------------------------------------------------------------------------ user tools

_PY_TO_JSON = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}


def function_schema(fn: Callable) -> dict:
    """``fn.schema`` when it has one, else a schema from its typed keyword parameters and docstring."""
    if isinstance(getattr(fn, "schema", None), dict):
        return fn.schema
    props, required = {}, []
    for name, p in inspect.signature(fn).parameters.items():
        ann = p.annotation if p.annotation is not inspect.Parameter.empty else str
        if isinstance(ann, str):  # postponed annotations
            ann = {"str": str, "int": int, "float": float, "bool": bool, "dict": dict, "list": list}.get(ann, str)
        props[name] = {"type": _PY_TO_JSON.get(ann, "string")}
        if p.default is inspect.Parameter.empty:
            required.append(name)
    return {"name": fn.__name__, "description": inspect.getdoc(fn) or fn.__name__,
            "parameters": {"type": "object", "properties": props, "required": required}}


def _close_inherited_pipes(keep: int) -> None:
    """In a forked tool child: close the pipes it inherited besides its own (``keep``). Steps run on several
    threads (``env.step_workers``), so a fork copies the pipe ends of other calls in flight; held here, they
    would keep those calls from seeing their own child finish until this one does."""
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: nothing to close by name
        return
    for fd in fds:
        if fd > 2 and fd != keep:
            try:
                if stat.S_ISFIFO(os.fstat(fd).st_mode):
                    os.close(fd)
            except OSError:  # the directory's own descriptor, gone by now
                pass


def _child(fn: Callable, args: dict, conn, cap: int) -> None:
    _close_inherited_pipes(conn.fileno())
    try:
        conn.send((True, str(fn(**args))[:cap]))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send((False, f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def user_tool(spec: str, output_chars: int = 100_000) -> Tool:
    """The function ``module:function`` as a tool; each call runs in a forked child killed at the limit, its
    reply cut to ``output_chars`` there. The function runs with the trainer's privileges (no sandbox): it is
    the user's own code, called with arguments the model wrote."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"env.tools: cannot import tool {spec!r}: {e}") from e
    if not callable(fn):
        raise ConfigError(f"env.tools: {spec!r} is not a function")
    schema = function_schema(fn)

    def run(args: dict, timeout_s: float) -> str:
        ctx = multiprocessing.get_context("fork")
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(fn, args, send, output_chars + 1), daemon=True)
        proc.start()
        send.close()
        try:
            if not recv.poll(timeout_s):
                raise ToolError(f"no reply within {timeout_s:g} s (the call was stopped)")
            ok, out = recv.recv()
        except EOFError:
            raise ToolError("the tool's process ended without a reply") from None
        finally:
            if proc.is_alive():
                proc.kill()
            proc.join()
            recv.close()
        if not ok:
            raise ToolError(out)
        return out

    return Tool(schema, run)


BUILTIN = {"calculator": calculator_tool, "python": python_tool}


def toolbox_for(cfg) -> Toolbox:
    """The tools named in ``env.tools``; an unknown name is a ConfigError naming the key."""
    tools = []
    for i, spec in enumerate(cfg.env.tools):
        if not isinstance(spec, str):
            raise ConfigError(f"env.tools.{i}: a tool name ('calculator', 'python' or 'module:function'), got {spec!r}")
        if spec in BUILTIN:
            tools.append(BUILTIN[spec]())
        elif ":" in spec:
            tools.append(user_tool(spec, cfg.env.tool_output_chars))
        else:
            raise ConfigError(f"env.tools.{i}: unknown tool {spec!r} (built in: {sorted(BUILTIN)}, or "
                              f"'module:function')")
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise ConfigError(f"env.tools: two tools share a name: {names}")
    if cfg.env.tool_timeout_s <= 0:
        raise ConfigError(f"env.tool_timeout_s: must be > 0, got {cfg.env.tool_timeout_s}")
    if "python" in names:  # the sandbox must be buildable here, or the tool would only ever fail
        from rlmt.rewards.sandbox import run_sandboxed

        try:
            run_sandboxed("print(1)")
        except SandboxUnavailable as e:
            raise ConfigError(f"env.tools: the python tool needs the code sandbox: {e}") from e
    return Toolbox(tools, cfg.env.tool_timeout_s, cfg.env.tool_output_chars)
