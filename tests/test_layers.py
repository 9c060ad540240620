"""The dependency rule (docs/ARCHITECTURE.md): each layer imports only from the layers below it, and no two
modules import each other, directly or around a loop. Every import counts, those inside functions too."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llmdistill"

# Lowest first. A module belongs to the entry naming it or its nearest package; a layer may import from its
# own layer only where that makes no cycle.
LAYERS = [
    ("contracts", ["llmdistill", "llmdistill.config", "llmdistill.signal"]),
    ("loading", ["llmdistill.data", "llmdistill.embedded", "llmdistill.models", "llmdistill.distributed"]),
    (
        "parts",
        [
            "llmdistill.losses",
            "llmdistill.teachers",
            "llmdistill.derive",
            "llmdistill.align",
            "llmdistill.session",
        ],
    ),
    (
        "jobs",
        [
            "llmdistill.train",
            "llmdistill.checkpoint",
            "llmdistill.export",
            "llmdistill.runlog",
            "llmdistill.trackers",
            "llmdistill.evaluate",
            "llmdistill.card",
            "llmdistill.hub",
            "llmdistill.report",
        ],
    ),
    ("entry points", ["llmdistill.cli", "llmdistill.tools"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The llmdistill modules `name` imports anywhere in its file (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # `from a import b` imports module a.b when there is one, else a name defined in a.
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def layer_of(name: str) -> int:
    best, best_len = None, -1
    for index, (_, owners) in enumerate(LAYERS):
        for owner in owners:
            if (name == owner or name.startswith(owner + ".")) and len(owner) > best_len:
                best, best_len = index, len(owner)
    assert best is not None, f"{name} is in no layer: add it to LAYERS in tests/test_layers.py"
    return best


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    for name in all_modules():
        layer_of(name)


def test_no_import_goes_up_the_layers():
    upward = [
        f"{source} ({LAYERS[layer_of(source)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for source, targets in import_graph().items()
        for target in sorted(targets)
        if layer_of(target) > layer_of(source)
    ]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_no_import_cycle():
    graph = import_graph()
    assert not cycles(graph), f"import cycles: {cycles(graph)}"


def test_the_checker_sees_imports_inside_functions_and_cycles(tmp_path):
    # The checker itself: a function-level import is an edge, and a loop through it is a cycle.
    source = "def f():\n    from llmdistill.b import x\n"
    path = tmp_path / "a.py"
    path.write_text(source)
    modules = {"llmdistill.a": path, "llmdistill.b": path}
    assert imports_of("llmdistill.a", path, modules) == {"llmdistill.b"}
    assert cycles({"llmdistill.a": {"llmdistill.b"}, "llmdistill.b": {"llmdistill.a"}}) == [
        ["llmdistill.a", "llmdistill.b"]
    ]
