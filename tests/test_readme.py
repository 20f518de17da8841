"""README's commands are the ones the project runs: the Install steps are `./run`'s set-up
steps, line for line, and CI calls README's test command."""

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
