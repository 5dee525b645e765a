"""The package layout as a checked property, read from the source with ``ast``: no import cycle among rlmt's
modules (imports inside functions count too), no private name imported across modules, each room imports
only the rooms beneath it, and no source file over 500 lines."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "rlmt"

# room -> the rlmt rooms it may import (besides itself). A room is a top-level module or package of rlmt.
ALLOWED = {
    "objectives": set(),
    "config": set(),
    "records": set(),
    "trackers": {"config"},
    "runtime": {"config"},
    "tasks": set(),
    "curriculum": set(),
    "checkpoint": {"parallel", "records"},
    "data": {"objectives"},
    "rollout": {"runtime"},
    "models": {"data", "rollout", "records", "config", "runtime"},
    "chat": {"models", "data", "rollout"},
    "rewards": {"models", "data", "chat", "objectives", "config", "grape", "judge"},
    "grape": {"chat", "data", "objectives", "rewards", "records", "models"},
    "judge": {"chat", "data", "models", "rollout", "rewards"},
    "evaluate": {"data", "records", "rewards", "rollout"},
    "report": {"records", "rewards"},
    "serve": {"models", "data", "rollout"},
    "envs": {"config", "data", "rollout", "records", "rewards", "chat", "judge"},
    "parallel": set(),
}


def _modules() -> dict[str, tuple[bool, str]]:
    """Dotted module name -> (is a package's __init__, source text)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = (path.name == "__init__.py", path.read_text())
    return out


def _resolve(modules: dict, name: str) -> str:
    while name not in modules:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(modules: dict[str, tuple[bool, str]]) -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the rlmt modules it imports; and 'module: from X import _name' for private names."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for mod, (is_package, text) in modules.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "rlmt"]
                edges[mod].update(_resolve(modules, t) for t in targets)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = mod.split(".") if is_package else mod.split(".")[:-1]
                    here = here[:len(here) - (node.level - 1)]
                    base = ".".join(here + ([node.module] if node.module else []))
                if base.split(".")[0] != "rlmt":
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    target = full if full in modules else _resolve(modules, base)
                    edges[mod].add(target)
                    if alias.name.startswith("_") and target != mod:
                        private.append(f"{mod}: from {base} import {alias.name}")
        edges[mod].discard(mod)
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycle_among_rlmt_modules():
    edges, _ = _imports(_modules())
    assert _cycles(edges) == []


def test_no_private_name_is_imported_across_modules():
    _, private = _imports(_modules())
    assert private == []


def test_each_room_imports_only_the_rooms_beneath_it():
    edges, _ = _imports(_modules())
    bad = []
    for mod, targets in edges.items():
        room = _room(mod)
        if room not in ALLOWED:
            continue
        for t in targets:
            other = _room(t)
            if other and other != room and other not in ALLOWED[room]:
                bad.append(f"{mod} -> {t}")
    assert bad == []


def test_the_checks_find_a_planted_cycle_and_private_import():
    """The walker on planted modules: a cycle through a function-level and a relative import, and a
    private name taken across modules, are found."""
    planted = {
        "rlmt": (True, ""),
        "rlmt.a": (False, "from rlmt.b import thing\n"),
        "rlmt.b": (False, "def f():\n    from . import a\n"),
        "rlmt.c": (False, "from rlmt.a import _hidden\n"),
    }
    edges, private = _imports(planted)
    assert _cycles(edges) == [["rlmt.a", "rlmt.b"]]
    assert private == ["rlmt.c: from rlmt.a import _hidden"]


def test_no_source_file_over_500_lines():
    long = {str(p.relative_to(SRC)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


def test_importing_the_math_does_not_import_the_training_stack():
    import subprocess
    import sys

    code = "import sys, rlmt.objectives; print(sorted(m for m in sys.modules if m.startswith('rlmt')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "rlmt.train" not in out and "rlmt.models" not in out


def test_the_rewards_tables_agree_with_the_methods():
    """rlmt.rewards' ONLINE_ALGORITHMS and METHOD_SOURCES (read where the loops cannot be imported: the pipeline's
    early checks, the report) say what rlmt.train.methods.METHODS says."""
    from rlmt.rewards import METHOD_SOURCES, ONLINE_ALGORITHMS
    from rlmt.train.methods import METHODS

    assert ONLINE_ALGORITHMS == set(METHODS)
    assert METHOD_SOURCES == {k: m.reward_source for k, m in METHODS.items() if m.reward_source}
