"""The import graph of siri points one way: the CLI over the trainer and eval, over the rest."""

import ast
import os

import siri

ROOT = os.path.dirname(siri.__file__)


def _module(path: str) -> str:
    """The node of a file: a top-level module (`siri.trainer`) or a whole subpackage (`siri.rollout`)."""
    parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    return "siri." + (parts[0] if parts[0] != "__init__" else "")


def _imports(path: str) -> set[str]:
    """The siri nodes a file imports, lazy imports included, TYPE_CHECKING ones left out."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "siri" and len(parts) > 1 and _is_node(parts[1]):
                found.add(f"siri.{parts[1]}")
    return found


def _is_node(name: str) -> bool:
    """A module or subpackage in siri's own folder (siri.kernels lives beside it, a layer below)."""
    return os.path.isfile(os.path.join(ROOT, name + ".py")) or os.path.isdir(os.path.join(ROOT, name))


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                graph.setdefault(_module(path), set()).update(_imports(path))
    for node, targets in graph.items():
        targets.discard(node)
    return graph


def test_no_import_cycle_between_siris_modules():
    graph = import_graph()
    state: dict[str, int] = {}

    def visit(node, trail):
        if state.get(node) == 1:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(node):] + [node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            visit(target, trail + [node])
        state[node] = 2

    for node in sorted(graph):
        visit(node, [])


def test_the_cli_sits_on_top_and_takes_only_the_entry_points():
    graph = import_graph()
    assert not [node for node, targets in graph.items() if "siri.cli" in targets]
    # The trainer and eval are side by side: both load models through siri.models.
    assert "siri.evaluate" not in graph["siri.trainer"] and "siri.trainer" not in graph["siri.evaluate"]
    with open(os.path.join(ROOT, "cli.py"), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    from_trainer = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and node.module == "siri.trainer" for a in node.names}
    assert from_trainer == {"train"}
