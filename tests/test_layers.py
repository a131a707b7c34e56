"""The package's layers, read from its imports (an AST walk of src/lorasft): no import cycle
between modules; serve and export import nothing from eval, report nothing from train."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src" / "lorasft"
FORBIDDEN = {"serve": {"eval", "train"}, "export": {"eval", "train"}, "report": {"train"},
             "model": {"eval", "train", "serve", "export", "report"},
             "data": {"model", "eval", "train", "serve", "export", "report"}}  # fmt: skip


def imports() -> dict[str, set[str]]:
    """module -> the lorasft modules it imports (anywhere in it, function bodies included)."""
    out = {}
    for f in SRC.rglob("*.py"):
        parts = f.relative_to(SRC).with_suffix("").parts
        mod = ".".join(("lorasft", *parts)).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lorasft"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("lorasft")}
        out[mod] = found
    return out


def test_no_import_cycle():
    graph, state, cycles = imports(), {}, []

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = "open"
        for dep in sorted(graph.get(mod, ())):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep) :] + [dep])
            elif dep in graph and dep not in state:
                visit(dep, [*path, dep])
        state[mod] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert not cycles, cycles


def test_lower_layers_do_not_import_higher_ones():
    wrong = []
    for mod, deps in imports().items():
        layer = mod.split(".")[1] if "." in mod else ""
        for dep in deps:
            target = dep.split(".")[1] if "." in dep else ""
            if target in FORBIDDEN.get(layer, ()):
                wrong.append(f"{mod} imports {dep}")
    assert not wrong, wrong
