"""The layering of fnf/ and fnf_kernels/, read from the source (ast): no import cycle, and no import of a package
module inside a function, except the short allow-list below (the CLI's lazy command loading and the compiled
extension, which may be absent)."""
from __future__ import annotations

import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("fnf", "fnf_kernels")

# (importing module, imported module): imports that may stay inside a function, and why.
ALLOWED_IN_FUNCTION = {
    ("fnf.cli", "fnf.commands.*"): "the CLI loads a subcommand's module only when that subcommand runs",
    ("fnf_kernels._extension", "fnf_kernels._C"): "the compiled extension is optional",
}


def _modules() -> dict[str, str]:
    """module name -> file path, for every .py file of the packages."""
    out = {}
    for pkg in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, f)
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom | ast.Import, known: set[str]) -> list[str]:
    """The package modules one import statement loads (``from a import b`` loads a.b when that is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] in PACKAGES]
    if node.level:
        parts = module.split(".")
        base = parts if is_package else parts[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] not in PACKAGES:
        return []
    out = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in known else target)
    return out


def _graph():
    modules = _modules()
    known = set(modules)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    in_function: list[tuple[str, str, int]] = []
    for module, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        is_package = path.endswith("__init__.py")
        nested = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                nested.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _resolve(module, is_package, node, known):
                if target not in known:
                    target = next((m for m in known if target.startswith(m + ".")), target)
                if id(node) in nested:
                    in_function.append((module, target, node.lineno))
                elif target in known and target != module:
                    edges[module].add(target)
    return edges, in_function


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _allowed(module: str, target: str) -> bool:
    for (src, dst) in ALLOWED_IN_FUNCTION:
        if (module == src or module.startswith(src + ".")) and (
                dst in ("*", target) or (dst.endswith(".*") and target.startswith(dst[:-1]))):
            return True
    return False


def test_no_import_cycle():
    edges, _ = _graph()
    cycles = _cycles(edges)
    assert not cycles, "import cycles (each line: the modules of one cycle):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_no_package_import_inside_a_function():
    _, in_function = _graph()
    bad = [f"{m}:{line} imports {t}" for m, t, line in in_function if not _allowed(m, t)]
    assert not bad, "imports of package modules inside functions (move them to the top of the module):\n" + \
        "\n".join(bad)


def test_the_checker_finds_a_cycle_and_an_inner_import(tmp_path, monkeypatch):
    """The checks above can fail: a planted two-module cycle and an in-function import are reported."""
    pkg = tmp_path / "fnf"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("from .a import x\n\ndef f():\n    from . import c\n")
    (pkg / "c.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", ("fnf",))
    edges, inner = _graph()
    assert _cycles(edges) == [["fnf.a", "fnf.b"]]
    assert inner == [("fnf.b", "fnf.c", 4)]


@pytest.mark.parametrize("leaf", ["fnf.core"])
def test_leaf_modules_import_nothing_from_the_package(leaf):
    edges, _ = _graph()
    assert not edges[leaf], f"{leaf} must import nothing from fnf, imports {sorted(edges[leaf])}"
