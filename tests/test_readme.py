"""README's commands are the ones the project runs: the Install steps are `./run`'s set-up
steps, line for line, and CI calls README's test command. And what the documents, docstrings
and comments cite is there: every file they name, and every `siri.*` name."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _code_block_after(text, heading):
    section = text[text.index(heading):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def _set_up_steps():
    script = (ROOT / "run").read_text()
    body = re.search(r"^set_up\(\) \{\n(.*?)^\}", script, re.S | re.M).group(1)
    return [line.strip() for line in body.splitlines() if line.strip()]


def test_install_steps_are_the_run_scripts_set_up_steps():
    readme = (ROOT / "README.md").read_text()
    install = [line.strip() for line in _code_block_after(readme, "## Install").splitlines() if line.strip()]
    assert install == _set_up_steps()


def test_quick_start_gives_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    commands = [line.split("#")[0].strip() for line in _code_block_after(readme, "## Quick start").splitlines()]
    assert [c.split()[:2] for c in commands if c] == [["./run", "demo"], ["./run", "test"]]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "./run test" in ci_lines
    # The test verb runs the same pytest command the README shows for a hand-made setup.
    assert "test) exec python -m pytest tests -q" in (ROOT / "run").read_text()


_FOLDERS = ("kernels", "siri", "csrc", "benchmarks", "tests", "docs", "configs")
# A repository path as documents write it: a top-level folder, then a file with an extension.
_REPO_PATH = re.compile(
    rf"\b(?:{'|'.join(_FOLDERS)})/[\w./-]*\w\.(?:py|md|yaml|sh|cpp|cu|cuh|h|json)\b"
)
# A Markdown file named without its folder: some folder of the repository must hold one of that name.
_BARE_DOCUMENT = re.compile(r"(?<![\w./-])[\w-]+\.md\b")


def _cited_in_the_repository():
    """Every text the project writes: documents, Python, C++/CUDA, configs and scripts."""
    sources = [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *ROOT.glob("benchmarks/*.md"), *ROOT.glob("configs/*"),
               *ROOT.glob("benchmarks/*.sh"), ROOT / "run", ROOT / ".ci" / "run", ROOT / "setup.py"]
    for folder in _FOLDERS:
        sources += (ROOT / folder).rglob("*.py")
    sources += [path for path in (ROOT / "csrc").rglob("*") if path.suffix in (".h", ".cuh", ".cpp", ".cu")]
    return [(source, source.read_text()) for source in sources]


def _cited_but_missing(pattern, exists) -> list[str]:
    """"source: name" for each `pattern` match in the repository's texts that `exists` rejects."""
    return sorted({f"{source.relative_to(ROOT)}: {name}" for source, text in _cited_in_the_repository()
                   for name in pattern.findall(text) if not exists(name)})


def test_documents_and_docstrings_cite_only_files_the_repository_has():
    missing = _cited_but_missing(_REPO_PATH, lambda path: (ROOT / path).exists())
    assert not missing, missing


def test_documents_named_without_a_folder_are_in_the_repository():
    documents = {path.name for path in ROOT.glob("*.md")}
    documents.update(path.name for folder in _FOLDERS for path in (ROOT / folder).rglob("*.md"))
    missing = _cited_but_missing(_BARE_DOCUMENT, documents.__contains__)
    assert not missing, missing


# A dotted name of siri's API as documents write it ("siri.packing.pack"); torch.ops.siri.* are
# custom ops, not Python names, and test data is left out (tests write "siri.jsonl").
_API_NAME = re.compile(r"(?<![\w.:/])siri(?:\.[A-Za-z_]\w*)+")
_PACKAGE_FOLDERS = {"siri": ROOT / "siri", "siri.kernels": ROOT / "kernels"}


def _module_file(module: str) -> Path | None:
    package = "siri.kernels" if module.split(".")[:2] == ["siri", "kernels"] else "siri"
    path = _PACKAGE_FOLDERS[package].joinpath(*module.split(".")[len(package.split(".")):])
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _defined_names(body) -> dict[str, ast.AST]:
    """The names a module or class body defines (functions, classes, assignments, imports)."""
    names = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update((name.id, node) for name in ast.walk(target) if isinstance(name, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update(((alias.asname or alias.name).split(".")[0], node) for alias in node.names)
        elif isinstance(node, (ast.If, ast.Try)):  # optional imports and definitions
            names.update(_defined_names(node.body + getattr(node, "orelse", []) + getattr(node, "handlers", [])))
        elif isinstance(node, ast.ExceptHandler):
            names.update(_defined_names(node.body))
    return names


def _api_name_exists(name: str) -> bool:
    """A module of siri or siri.kernels, then a name it defines, then (for a class) an
    attribute the class body defines; the native extension counts as a module."""
    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        path = _module_file(".".join(parts[:split]))
        if path is not None:
            break
    rest = parts[split:]
    if not rest:
        return True
    if f'"{".".join(parts[:split + 1])}"' in (ROOT / "setup.py").read_text():  # siri._C, built from csrc/
        return True
    scope = _defined_names(ast.parse(path.read_text()).body)
    for part in rest:
        if part not in scope:
            return False
        node = scope[part]
        if not isinstance(node, ast.ClassDef):
            return True  # an attribute of a function, a value or an import: not followed further
        scope = _defined_names(node.body)
    return True


def test_documents_and_docstrings_name_only_what_siri_defines():
    sources = [(source, text) for source, text in _cited_in_the_repository() if "tests" not in source.parts]
    missing = sorted({f"{source.relative_to(ROOT)}: {name}" for source, text in sources
                      for name in _API_NAME.findall(text) if not _api_name_exists(name)})
    assert not missing, missing
