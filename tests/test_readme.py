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


def test_relative_links_and_design_references_resolve():
    """Every relative link in the README and docs/ names a file of the clone, and the code's
    "DESIGN §n" comments name a section that docs/design.md has."""
    root = README.parent
    pages = [README, *sorted((root / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
    design = (root / "docs" / "design.md").read_text()
    sections = set(re.findall(r"^## (\d+)\. ", design, flags=re.M))
    assert sections >= {"2", "3", "4", "5", "6", "7", "8"}, sorted(sections)
    sources = [p for folder in ("rnn_gpu", "backends", "kernels", "tests", "examples",
                                "asv_benchmarks/benchmarks")
               for p in (root / folder).rglob("*") if p.suffix in (".py", ".cu", ".cuh")]
    cited = {n for p in sources for n in re.findall(r"DESIGN §(\d+)", p.read_text())}
    assert cited and cited <= sections, f"DESIGN sections cited but absent: {cited - sections}"
