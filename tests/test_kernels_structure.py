"""fnf_kernels' shape: an import graph without cycles (read from the source with ast), no package import inside a
function, Triton modules that never import an op module, one module of references; the ops under
torch.compile(fullgraph=True)."""
import ast
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fnf_kernels  # noqa: E402
from fnf_kernels import references  # noqa: E402

PACKAGE = Path(fnf_kernels.__file__).resolve().parent
# Imports allowed inside functions: optional or heavy third-party modules and the compiled extension.
LAZY_ALLOWED = ("fnf_kernels._C", "xformers", "triton")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path):
    """(imported module, inside a function) for every import statement of the file, resolved to full names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((alias.name, inner) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module
                for alias in child.names:  # `from . import x` may import the submodule x
                    candidate = f"{mod}.{alias.name}"
                    out.append((candidate if _is_module(candidate) else mod, inner))
            visit(child, inner)

    visit(tree, False)
    return out


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    root = PACKAGE.parent
    return (root / rel).with_suffix(".py").exists() or (root / rel / "__init__.py").exists()


def _graph():
    graph, lazy = {}, []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        edges = set()
        for target, in_function in _imports(path):
            if not target.startswith("fnf_kernels"):
                continue
            if in_function and not target.startswith(LAZY_ALLOWED):
                lazy.append((name, target))
            if target != name and _is_module(target):
                edges.add(target)
        graph[name] = edges
    return graph, lazy


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
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

    for v in graph:
        if v not in index:
            strong(v)
    return out


def _without_packages(graph):
    """Drop edges into package __init__ modules (importing fnf_kernels.x runs fnf_kernels/__init__ first, which is
    not a dependency of x's code)."""
    packages = {n for n in graph if (PACKAGE.parent / Path(*n.split(".")) / "__init__.py").exists()}
    return {n: {t for t in e if t not in packages} for n, e in graph.items()}


def test_no_import_cycle_in_fnf_kernels():
    graph, _ = _graph()
    assert _cycles(_without_packages(graph)) == []


def test_no_package_import_inside_a_function():
    _, lazy = _graph()
    assert lazy == [], f"imports of fnf_kernels modules inside functions: {lazy}"


def test_triton_modules_never_import_op_modules():
    graph, _ = _graph()
    allowed = {"fnf_kernels._library", "fnf_kernels.references"}
    for name, edges in graph.items():
        if name.startswith("fnf_kernels.triton_kernels."):
            bad = {e for e in edges if not e.startswith("fnf_kernels.triton_kernels") and e not in allowed}
            assert not bad, f"{name} imports {bad}"


def test_leaves_import_nothing_from_the_package_but_leaves():
    graph, _ = _graph()
    assert graph["fnf_kernels.references"] == set()
    assert graph["fnf_kernels._library"] <= {"fnf_kernels.references"}


def test_every_op_has_its_reference_in_references():
    for name in ("penalty_norms", "masked_frobenius_penalty", "threshold_dilate", "separate_reference",
                 "enhance_reference", "smooth_reference", "lora_linear_reference"):
        assert callable(getattr(references, name))
    assert fnf_kernels.reference.penalty_norms is references.penalty_norms  # the old name still works
    assert fnf_kernels.lora.lora_linear_reference is references.lora_linear_reference
    assert fnf_kernels.attention_losses.enhance_reference is references.enhance_reference


def test_every_op_compiles_fullgraph_and_matches_eager():
    """torch.compile(fullgraph=True) over the four ops with backend="auto", values and gradients vs eager."""
    gen = torch.Generator().manual_seed(7)
    image = torch.rand(2, 3, 6, 7, generator=gen)
    ref_img = torch.rand(2, 3, 6, 7, generator=gen)
    heat = torch.rand(2, 6, 7, generator=gen)
    x = torch.randn(2, 5, 8, generator=gen)
    w, b = torch.randn(6, 8, generator=gen), torch.randn(6, generator=gen)
    a, bb = torch.randn(4, 8, generator=gen), torch.randn(6, 4, generator=gen)
    maps = torch.rand(2, 2, 2, 4, 5, generator=gen)

    def step(image, x, maps):
        mask = fnf_kernels.threshold_dilate(heat, 0.7, 1)
        pen = fnf_kernels.masked_frobenius_penalty(image, ref_img, mask)
        y = fnf_kernels.lora_linear(x, w, b, a, bb, torch.tensor([0.5, 1.0]))
        sep, en = fnf_kernels.separate_enhance_losses(maps)
        return pen + y.square().mean() + sep.sum() + en.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves_c = [t.clone().requires_grad_() for t in (image, x, maps)]
    leaves_e = [t.clone().requires_grad_() for t in (image, x, maps)]
    out_c, out_e = compiled(*leaves_c), step(*leaves_e)
    torch.testing.assert_close(out_c, out_e)
    out_c.backward()
    out_e.backward()
    for c, e in zip(leaves_c, leaves_e):
        torch.testing.assert_close(c.grad, e.grad)
