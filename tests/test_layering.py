"""The package's import graph: no circle, no import from a lower layer to a higher one, module- and function-level
imports alike (read with ``ast``, nothing imported)."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "saliency_jax"

#: Layers from the bottom up; a module may import its own layer or lower ones only. (A package's ``__init__`` is in
#: its package's layer.)
LAYERS = [
    {"registry", "config", "mesh", "compile_cache", "saliency"},
    {"models", "data"},
    {"training", "workdirs", "evaluation"},
    {"plan"},
    {"trainers"},
    {"train", "evaluators"},
    {"runs", "experiment", "configs"},  # configs: the shipped experiment configs (package data), built on everything
    {"cli", "__main__", "__init__"},
]

#: Function-level imports kept on purpose (not to dodge a circle): the CLI imports the heavy modules after parsing
#: its flags, ``saliency_jax.load`` is imported on first use so that ``import saliency_jax`` stays light.
LAZY = {("cli", "evaluators"), ("cli", "experiment"), ("cli", "train"), ("cli", "compile_cache"),
        ("cli", "config"), ("cli", "workdirs"), ("cli", "configs"), ("__init__", "runs")}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: pathlib.Path):
    """``(target module, function level)`` for every import of a project module in ``path``."""
    tree = ast.parse(path.read_text())
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    me = _module_name(path)
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative
                base = me.split(".")[: -node.level] if path.name != "__init__.py" else me.split(".")
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [f"saliency_jax.{mod}"]
            elif node.module:  # "from pkg import mod" names the module, "from pkg.mod import attr" its module
                names = [f"{node.module}.{a.name}" for a in node.names]
        names = [n for n in names if n == "saliency_jax" or n.startswith("saliency_jax.")]
        if not names:
            continue
        up, nested = node, False
        while up in parents:
            up = parents[up]
            if isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef)):
                nested = True
        for name in names:
            target = name[len("saliency_jax."):] if name != "saliency_jax" else "__init__"
            yield target, nested


def _graph():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        out = set()
        for target, nested in _imports(path):
            while target and target not in modules:  # "pkg.mod.attr" -> "pkg.mod"
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add((target, nested))
        edges[name] = out
    return modules, edges


def _layer(module: str) -> int:
    top = module.split(".")[0]
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"module {module} is in no layer of tests/test_layering.py: add it")


def test_no_import_circle():
    modules, edges = _graph()
    graph = {m: {t for t, _ in e} for m, e in edges.items()}
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                circles.append(sorted(comp))

    for m in graph:
        if m not in index:
            visit(m)
    # A package importing its own submodules and a submodule importing a sibling through the package are one
    # circle in the graph; there must be none at all.
    assert circles == [], f"import circles: {circles}"


def test_imports_point_down_and_no_function_level_dodges():
    _, edges = _graph()
    upward, nested = [], []
    for module, targets in edges.items():
        for target, is_nested in targets:
            top, ttop = module.split(".")[0], target.split(".")[0]
            if top == ttop:
                continue
            if _layer(target) > _layer(module):
                upward.append(f"{module} -> {target}")
            if is_nested and (top, ttop) not in LAZY:
                nested.append(f"{module} -> {target}")
    assert upward == [], f"imports from a lower layer to a higher one: {sorted(upward)}"
    assert nested == [], f"function-level imports of project modules: {sorted(nested)}"


def test_no_evaluator_imports_the_loop():
    _, edges = _graph()
    bad = [m for m, targets in edges.items() if m.startswith("evaluators")
           for t, _ in targets if t in ("train", "experiment", "trainers") or t.startswith("trainers.")]
    assert bad == [], bad
