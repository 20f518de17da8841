"""The import graph of siri points one way: the CLI over the trainer and eval, over the rest."""

import ast
import os

import siri
import siri.kernels

# The installed packages and their folders: siri.kernels lives beside siri, in kernels/.
PACKAGES = {"siri": os.path.dirname(siri.__file__), "siri.kernels": os.path.dirname(siri.kernels.__file__)}


def modules() -> dict[str, str]:
    """Every module of siri and siri.kernels (a package by its `__init__`) -> its file."""
    found = {}
    for package, root in PACKAGES.items():
        for folder, folders, files in os.walk(root):
            folders[:] = [name for name in folders if name != "__pycache__"]
            for name in files:
                if name.endswith(".py"):
                    parts = os.path.relpath(os.path.join(folder, name), root)[:-3].split(os.sep)
                    found[".".join([package] + [part for part in parts if part != "__init__"])] = \
                        os.path.join(folder, name)
    return found


def _imported_names(module: str, path: str):
    """The dotted names a file imports, lazy and relative imports included (relative ones made
    absolute), TYPE_CHECKING ones left out; `from a import b` gives a.b (module_graph reads it
    as a.b where that is a module, else as a)."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            yield from (f"{base}.{alias.name}" for alias in node.names)


def module_graph() -> dict[str, set[str]]:
    """module -> the modules of siri and siri.kernels it imports (a name inside a module, or
    a compiled extension, counts as its module or package)."""
    known = modules()

    def owner(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in known.items():
        targets = {owner(name) for name in _imported_names(module, path)}
        graph[module] = targets - {None, module}
    return graph


def _node(module: str) -> str:
    """The coarse node of a module: a top-level module (`siri.trainer`) or a whole subpackage
    (`siri.rollout`, `siri.kernels`)."""
    return ".".join(module.split(".")[:2])


def import_graph() -> dict[str, set[str]]:
    """module_graph with each subpackage folded into one node."""
    graph: dict[str, set[str]] = {}
    for module, targets in module_graph().items():
        graph.setdefault(_node(module), set()).update(_node(target) for target in targets)
    for node, targets in graph.items():
        targets.discard(node)
    return graph


def assert_no_cycle(graph: dict[str, set[str]]) -> None:
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


def test_no_import_cycle_between_siris_modules():
    assert_no_cycle(import_graph())


def test_no_import_cycle_between_any_two_modules():
    # Inside a subpackage too: siri.rollout's engines import its base, which imports neither.
    assert_no_cycle(module_graph())


def test_the_graph_sees_every_module_and_relative_imports():
    graph = module_graph()
    kernels = {name[:-3] for name in os.listdir(PACKAGES["siri.kernels"]) if name.endswith(".py")} - {"__init__"}
    assert {f"siri.kernels.{name}" for name in kernels} <= set(graph)
    assert {"siri.kernels.ops", "siri.kernels.config"} <= graph["siri.kernels.policy_loss"]  # from .x import
    assert "siri.rollout.base" in graph["siri.rollout.hf_engine"] and "siri.kernels" in graph["siri.model_forward"]


def test_the_cli_sits_on_top_and_takes_only_the_entry_points():
    graph = import_graph()
    assert not [node for node, targets in graph.items() if "siri.cli" in targets]
    # The trainer and eval are side by side: both load models through siri.models.
    assert "siri.evaluate" not in graph["siri.trainer"] and "siri.trainer" not in graph["siri.evaluate"]
    with open(modules()["siri.cli"], encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    from_trainer = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and node.module == "siri.trainer" for a in node.names}
    assert from_trainer == {"train"}
