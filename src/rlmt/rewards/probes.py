"""Assert-style tests whose verdict the parent computes: the sandboxed program only reports values.

A test string such as ``assert add(1, 2) == 3`` is split at compile time into

* a **child part**: every ``assert`` becomes ``__rlmt_probe__(k, (lambda: <leaf>, ...))``, where the leaves
  are the sub-expressions that must run in the program (calls, names, arithmetic: anything that is not a
  literal). The child evaluates each leaf, encodes its value as plain JSON with type tags (``None``, bool,
  int, float, complex, str, bytes, list, tuple, dict, set, frozenset; anything else, at any depth, is an
  error, so an always-equal ``__eq__`` or an ``int`` subclass cannot pass), and prints one report line;
* a **parent part**: the assert's structure (``==``, ``!=``, ``<``, ``in``, ``is``, ..., ``not``, ``and``,
  ``or``) and every **literal** (``3``, ``[1, 2]``, ``"abc"``, ``-1.5``) are kept here and never enter the
  child. The parent decodes the reported leaves and evaluates the assert itself, with Python's
  short-circuit rules (a leaf that raised counts only if the evaluation needs it).

The test passes when the program exits cleanly, every assert is reported at least once (an assert in a
branch that never runs, or in a function never called, fails the test), every report passes, and the
end-of-tests marker is printed. There is no token that the program could read and print to pass: a program
that tampers with the harness can only report values, and to pass ``assert f(x) == 3`` it has to report a
3 it never sees. (Where both sides of a comparison are computed in the child, e.g. ``f(x) == g(x)``, a
program that rewrites the harness could report equal values; literal expectations are immune.)
"""

from __future__ import annotations

import ast
import json
import operator
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable

MAX_DEPTH = 64  # nesting of a reported value (deeper is an error in the child and in the parent)

# Child side, placed after the program's code and before the rewritten tests. Types are taken through
# ``__class__`` (not the builtins a program may have replaced) and the report goes to fd 1 directly.
_HARNESS = r'''
def __rlmt_harness__(nonce):
    import posix
    write, NoneT, B, I, F, C, S, By = posix.write, None.__class__, True.__class__, (0).__class__, \
        (0.0).__class__, (0j).__class__, "".__class__, b"".__class__
    L, T, D, St, Fs = [].__class__, ().__class__, {}.__class__, {0}.__class__, frozenset().__class__
    hexf, fmt, enc, join = F.hex, I.__format__, S.encode, S.join

    def text(s):  # a str as a JSON string of its UTF-8 hex (nothing to escape)
        return '"' + enc(s, "utf-8", "surrogatepass").hex() + '"'

    def code(v, depth):
        if depth > %(depth)d:
            raise ValueError("value nested too deeply")
        t = v.__class__
        if t is NoneT:
            return '{"N":0}'
        if t is B:
            return '{"B":' + ("1" if v else "0") + '}'
        if t is I:
            return '{"i":"' + fmt(v, "x") + '"}'
        if t is F:
            return '{"f":"' + hexf(v) + '"}'
        if t is C:
            return '{"c":["' + hexf(v.real) + '","' + hexf(v.imag) + '"]}'
        if t is S:
            return '{"s":' + text(v) + '}'
        if t is By:
            return '{"b":"' + v.hex() + '"}'
        if t is L or t is T or t is St or t is Fs:
            tag = "l" if t is L else "t" if t is T else "S" if t is St else "F"
            return '{"' + tag + '":[' + join(",", [code(x, depth + 1) for x in v]) + ']}'
        if t is D:
            return '{"d":[' + join(",", ["[" + code(k, depth + 1) + "," + code(x, depth + 1) + "]"
                                        for k, x in D.items(v)]) + ']}'
        raise TypeError(f"a value of type {t.__name__!r} is not a plain value")

    def probe(k, leaves):
        parts = []
        for leaf in leaves:
            try:
                parts.append(code(leaf(), 0))
            except BaseException as e:  # the leaf raised, or its value is not plain
                parts.append('{"error":' + text(f"{e.__class__.__name__}: {e}"[:200]) + '}')
        write(1, enc("\n" + nonce + " " + fmt(k, "d") + " [" + join(",", parts) + "]\n"))

    def done():
        write(1, enc("\n" + nonce + " done\n"))

    return probe, done


__rlmt_probe__, __rlmt_done__ = __rlmt_harness__(%(nonce)r)
del __rlmt_harness__
'''

_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
}


class _NeedsError(Exception):
    """The evaluation needed a leaf that raised (or whose value could not be decoded) in the child."""


# The parent's tree of one assert: ("leaf", i) | ("literal", value) | ("not", node) | ("and"/"or", [nodes])
# | ("cmp", node, [(op, node), ...]).
Node = tuple


@dataclass
class ProbePlan:
    """One assert-style test, compiled: the program text to append to the code, and the parent's trees."""

    child_source: str  # harness + rewritten tests + end marker
    nonce: str
    trees: dict[int, Node] = field(default_factory=dict)  # assert id -> its tree
    leaf_counts: dict[int, int] = field(default_factory=dict)  # assert id -> how many leaves the child reports


class _Split(ast.NodeTransformer):
    def __init__(self) -> None:
        self.trees: dict[int, Node] = {}
        self.leaf_counts: dict[int, int] = {}

    def visit_Assert(self, node: ast.Assert) -> ast.AST:
        k = len(self.trees)
        leaves: list[ast.expr] = []
        self.trees[k] = _tree(node.test, leaves)
        self.leaf_counts[k] = len(leaves)
        lambdas = [ast.Lambda(ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[]),
                              leaf) for leaf in leaves]
        call = ast.Call(ast.Name("__rlmt_probe__", ast.Load()), [ast.Constant(k), ast.Tuple(lambdas, ast.Load())], [])
        return ast.copy_location(ast.Expr(call), node)


def _tree(node: ast.expr, leaves: list[ast.expr]) -> Node:
    """The parent's tree for an assert's test; non-literal leaves are appended to ``leaves``."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return ("not", _tree(node.operand, leaves))
    if isinstance(node, ast.BoolOp):
        return ("and" if isinstance(node.op, ast.And) else "or", [_tree(v, leaves) for v in node.values])
    if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
        return ("cmp", _tree(node.left, leaves), [(type(op), _tree(c, leaves)) for op, c in
                                                 zip(node.ops, node.comparators)])
    try:
        return ("literal", ast.literal_eval(node))
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        leaves.append(node)
        return ("leaf", len(leaves) - 1)


def compile_probes(tests: str) -> ProbePlan | None:
    """Split ``tests`` (Python source with asserts) into the child program and the parent's trees; None if
    it does not parse (the test then runs unchanged and fails in the sandbox)."""
    split = _Split()
    try:
        body = ast.unparse(ast.fix_missing_locations(split.visit(ast.parse(tests))))
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    nonce = f"rlmt-probe-{secrets.token_hex(12)}"
    source = (_HARNESS % {"depth": MAX_DEPTH, "nonce": nonce}) + "\n" + body + "\n__rlmt_done__()\n"
    return ProbePlan(source, nonce, split.trees, split.leaf_counts)


def verdict(plan: ProbePlan, stdout: str) -> tuple[bool, str]:
    """Whether the reports in ``stdout`` pass every assert of ``plan``, and why not (empty when passed)."""
    reports: dict[int, list[list]] = {}
    done = False
    for line in stdout.splitlines():
        if not line.startswith(plan.nonce + " "):
            continue
        rest = line[len(plan.nonce) + 1:]
        if rest == "done":
            done = True
            continue
        k_text, _, payload = rest.partition(" ")
        try:
            k, leaves = int(k_text), json.loads(payload)
        except (ValueError, RecursionError):
            return False, "malformed report"
        if k not in plan.trees or not isinstance(leaves, list) or len(leaves) != plan.leaf_counts[k]:
            return False, f"malformed report for assert {k}"
        reports.setdefault(k, []).append(leaves)
    missing = [k for k in plan.trees if k not in reports]
    if missing:
        return False, f"assert {missing[0]} never ran"
    for k, runs in reports.items():
        for leaves in runs:
            try:
                if not bool(_evaluate(plan.trees[k], leaves)):
                    return False, f"assert {k} failed"
            except _NeedsError as e:
                return False, f"assert {k}: {e}"
            except Exception as e:  # noqa: BLE001 - a comparison of decoded values that raises fails the assert
                return False, f"assert {k}: {type(e).__name__}"
    if not done:
        return False, "the tests did not run to the end"
    return True, ""


def _evaluate(node: Node, leaves: list) -> Any:
    kind = node[0]
    if kind == "literal":
        return node[1]
    if kind == "leaf":
        return decode(leaves[node[1]])
    if kind == "not":
        return not _evaluate(node[1], leaves)
    if kind in ("and", "or"):
        value: Any = kind == "and"
        for child in node[1]:
            value = _evaluate(child, leaves)
            if bool(value) != (kind == "and"):
                return value
        return value
    left = _evaluate(node[1], leaves)
    for op, child in node[2]:
        right = _evaluate(child, leaves)
        if not _COMPARE[op](left, right):
            return False
        left = right
    return True


def decode(value: Any, depth: int = 0) -> Any:
    """A reported value -> the plain Python value; :class:`_NeedsError` for an error or a bad encoding."""
    if depth > MAX_DEPTH or not isinstance(value, dict) or len(value) != 1:
        raise _NeedsError("bad encoding")
    (tag, v), = value.items()
    try:
        if tag == "error":
            raise _NeedsError(bytes.fromhex(v).decode("utf-8", "replace"))
        if tag == "N":
            return None
        if tag == "B":
            return bool(v)
        if tag == "i":
            return int(v, 16)
        if tag == "f":
            return float.fromhex(v)
        if tag == "c":
            return complex(float.fromhex(v[0]), float.fromhex(v[1]))
        if tag == "s":
            return bytes.fromhex(v).decode("utf-8", "surrogatepass")
        if tag == "b":
            return bytes.fromhex(v)
        if tag in ("l", "t", "S", "F"):
            items = [decode(x, depth + 1) for x in v]
            return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)
        if tag == "d":
            return {decode(k, depth + 1): decode(x, depth + 1) for k, x in v}
    except _NeedsError:
        raise
    except (TypeError, ValueError, AttributeError) as e:
        raise _NeedsError(f"bad encoding ({type(e).__name__})") from None
    raise _NeedsError(f"bad encoding (tag {tag!r})")
