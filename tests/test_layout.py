"""The house rules of the source tree, checked on every run: no import circle, ``precision/``
standalone (it imports nothing else of vlamp, so it can be taken alone into any loop), no file
over 500 lines and no function over 80."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        name = ".".join(f.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the vlamp modules it imports (at any level of the file), package re-exports
    (``__init__``) left out: they only gather names."""
    packages = {m for m, f in mods.items() if f.name == "__init__.py"}
    graph: dict[str, set[str]] = {}
    for m, f in mods.items():
        if m in packages:
            continue
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vlamp"):
                for a in node.names:
                    target = f"{node.module}.{a.name}"
                    found.add(target if target in mods else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in mods}
        graph[m] = found - packages
    return graph


def test_no_import_circle():
    graph = imports(modules())
    assert len(graph) > 60  # the walk found the tree
    state: dict[str, int] = {}
    circles = []

    def visit(m, path):
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                circles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, circles


def test_precision_imports_nothing_else_of_vlamp():
    graph = imports(modules())
    precision = {m: t for m, t in graph.items() if m.startswith("vlamp.precision")}
    assert len(precision) > 20
    outside = {m: sorted(x for x in t if not x.startswith("vlamp.precision")) for m, t in precision.items()}
    assert not {m: t for m, t in outside.items() if t}


def test_files_and_functions_stay_small():
    mods = modules()
    long_files = {str(f.relative_to(SRC)): n for f in mods.values()
                  if (n := f.read_text().count("\n")) > 500}
    long_functions = {}
    for f in mods.values():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long_functions[f"{f.relative_to(SRC)}:{node.name}"] = n
    assert not long_files and not long_functions, (long_files, long_functions)
