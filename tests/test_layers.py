"""The code's structure, read from its imports: lower layers never import higher ones, and no module imports
itself round a circle (lazy imports inside functions count too)."""

import ast
from pathlib import Path

import rmc

SRC = Path(rmc.__file__).parent
# Bottom to top; a package may import its own layer and those below.
LAYERS = [{"errors", "checks", "io", "paths", "schema", "seeding", "cpu", "scaleout", "interface"},
          {"data", "models", "attacks"},
          {"training"}, {"defense"}, {"artifacts"}, {"evaluation"}, {"cli", "__main__"}]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def _imports() -> dict[str, set[str]]:
    """module -> the rmc modules it imports anywhere in its file."""
    graph = {}
    for f in SRC.rglob("*.py"):
        parts = f.relative_to(SRC).with_suffix("").parts
        name = ".".join(("rmc",) + (parts[:-1] if parts[-1] == "__init__" else parts))
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rmc"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)   # `from rmc.x import module`
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("rmc"))
        graph[name] = found
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_goes_up_a_layer():
    up = [(m, d) for m, deps in _imports().items() for d in deps
          if _package(m) in LEVEL and LEVEL.get(_package(d), 0) > LEVEL[_package(m)]]
    assert not up, up
    assert set(LEVEL) >= {_package(m) for m in _imports()} - {"__init__"}   # every package has a layer


def test_no_import_circle():
    graph, state, circles = _imports(), {}, []

    def visit(m, path):
        state[m] = "open"
        for d in graph[m]:
            if d.startswith(m + "."):        # a package's __init__ re-exporting its own modules is not a circle
                continue
            if state.get(d) == "open" and not m.startswith(d + "."):
                circles.append(path + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"
    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not circles, circles
