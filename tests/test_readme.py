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


# A repository path as documents write it: a top-level folder, then a file with an extension.
_REPO_PATH = re.compile(
    r"\b(?:kernels|siri|csrc|benchmarks|tests|docs|configs)/[\w./-]*\w\.(?:py|md|yaml|sh|cpp|cu|h|json)\b"
)


def test_documents_and_docstrings_cite_only_files_the_repository_has():
    sources = [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *ROOT.glob("benchmarks/*.md")]
    for folder in ("kernels", "siri", "benchmarks", "tests"):
        sources += (ROOT / folder).rglob("*.py")
    missing = sorted({
        f"{source.relative_to(ROOT)}: {path}"
        for source in sources
        for path in _REPO_PATH.findall(source.read_text())
        if not (ROOT / path).exists()
    })
    assert not missing, missing
