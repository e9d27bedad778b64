"""The README's runnable examples (the ```python blocks that start with an import) run as
written, each on its own: a user copies one block, not the page."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    runnable = [b for b in blocks if b.startswith(("import ", "from "))]
    assert len(runnable) >= 2, "the README lost its runnable examples"
    for block in runnable:
        exec(compile(block, str(README), "exec"), {})
