"""Run a README section's Python snippet as written, in a fresh interpreter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def python_block_after(heading: str) -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_snippet(heading: str, tmp_path, timeout: int = 300) -> subprocess.CompletedProcess:
    script = tmp_path / "snippet.py"
    script.write_text(python_block_after(heading))
    # Outside the repository, so the snippet imports the installed siri as a user's script does.
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "TMPDIR": str(tmp_path)})
