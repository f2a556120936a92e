"""The package's shape, read from its imports: layers from the bottom up, no circles, model code free of ranks.

The README's Layout section draws the same map. A module imports only from its own layer or below; a lower
layer that needs to call up takes a function as an argument instead of importing the higher module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Bottom first. Packages of one layer may import each other (without a circle).
LAYERS = [
    ["distrib.errors", "distrib.faults", "distrib.fs", "distrib.utils", "distrib.lock", "distrib.launch"],
    ["distrib.config"],
    ["distrib.data", "distrib.model"],
    ["distrib.parallel"],
    ["distrib.checkpoint"],
    ["distrib.train"],
    ["distrib.stages"],
    ["distrib.commands", "distrib.__main__", "distrib"],
]
MAX_LOCAL_IMPORTS = 15


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in (("distrib", ROOT / "distrib"), ("distrib.launch", ROOT / "launch")):
        for p in folder.rglob("*.py"):
            parts = list(p.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = p
    return out


MODULES = _modules()


def _layer(mod: str) -> int:
    best = None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if mod == prefix or mod.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (i, prefix)
    assert best is not None, f"{mod} is in no layer of tests/unit/test_layers.py: add it to LAYERS"
    return best[0]


def _imports(mod: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported package module, line, inside a function) for every import of one of our modules."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != mod:
                out.append((name, node.lineno, id(node) in local))
                break
    return out


GRAPH = {mod: _imports(mod, path) for mod, path in MODULES.items()}


def test_no_module_imports_from_a_higher_layer():
    upward = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {target} (layer {_layer(target)} > {_layer(m)})"
              for m, edges in GRAPH.items() for target, line, _ in edges if _layer(target) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_there_is_no_import_circle():
    index, low, stack, on, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w, _, _ in GRAPH[v]:
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
                circles.append(" <-> ".join(sorted(comp)))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not circles, "\n".join(circles)


def test_few_imports_of_our_own_modules_hide_inside_functions():
    local = [f"{MODULES[m].relative_to(ROOT)}:{line}" for m, edges in GRAPH.items() for _, line, inner in edges
             if inner]
    assert len(local) <= MAX_LOCAL_IMPORTS, f"{len(local)} function-local imports:\n" + "\n".join(local)


@pytest.mark.parametrize("package", ["distrib.model", "distrib.data", "distrib.config"])
def test_plain_packages_know_nothing_of_ranks_or_deepspeed(package):
    """Model, data and config code is plain: process groups and DeepSpeed live in distrib.parallel."""
    found = []
    for mod, path in MODULES.items():
        if mod == package or mod.startswith(package + "."):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] == "deepspeed" or n.startswith("torch.distributed")]
    assert not found, "\n".join(found)


def test_no_source_file_is_over_800_lines():
    big = [f"{p.relative_to(ROOT)}: {n}" for p in MODULES.values() if (n := len(p.read_text().splitlines())) > 800]
    assert not big, "\n".join(big)
