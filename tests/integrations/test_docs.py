"""The snippets of docs/integrations.md run as written (each in its own process, in a
scratch directory) and reach the steady phase with bytes moved."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"
SECTIONS = {"Hugging Face Trainer": "transformers", "Lightning": "lightning"}


def snippet(section: str) -> str:
    """The first python block under ``## section``."""
    text = DOC.read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", body, re.S)
    assert match, f"no python block under ## {section}"
    return match.group(1)


@pytest.mark.slow
@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_doc_snippet_runs(section, tmp_path):
    pytest.importorskip(SECTIONS[section])
    script = tmp_path / "snippet.py"
    script.write_text(snippet(section))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    phase, moved = proc.stdout.split()[-2:]
    assert phase == "steady" and int(moved) > 0, proc.stdout
