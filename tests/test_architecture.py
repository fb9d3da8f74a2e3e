"""The shape of the code: no import cycle between flashnb's modules (imports inside functions
included), no module over 450 lines, no function over 60 lines in the core, and the budget becomes
rows in exactly one function."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import flashnb

ROOT = Path(flashnb.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """flashnb modules that `name` imports anywhere in its file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flashnb"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in modules else node.module)
    return out - {name}


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(m, f, modules) for m, f in modules.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_modules_and_core_functions_stay_small():
    long_modules = {str(f.relative_to(ROOT)): n for f in ROOT.rglob("*.py")
                    if (n := len(f.read_text().splitlines())) > 450}
    assert not long_modules, f"modules over 450 lines: {long_modules}"
    long_functions = []
    for f in (ROOT / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long_functions.append(f"{f.name}:{node.name} ({n} lines)")
    assert not long_functions, f"core functions over 60 lines: {long_functions}"


def test_the_budget_becomes_rows_in_one_function():
    """Only flashnb.core.memory.rows_in_budget divides a budget's free bytes by the bytes of a row."""
    hits = []
    for f in ROOT.rglob("*.py"):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(r"//\s*\(?\s*[\w.]*row_bytes", line) or "+ 24" in line:
                hits.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert len(hits) == 1 and hits[0].startswith("core/memory.py"), hits
