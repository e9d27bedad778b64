"""The README's runnable examples (the ```python blocks that start with an import) run as
written, each on its own: a user copies one block, not the page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _runnable_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return [b for b in blocks if b.startswith(("import ", "from "))]


def test_readme_keeps_its_runnable_examples():
    assert len(_runnable_blocks()) >= 2, "the README lost its runnable examples"


@pytest.mark.parametrize("block", _runnable_blocks(),
                         ids=lambda b: b.split("\n", 1)[0][:40])
def test_readme_python_examples_run(block):
    # a block that imports an extra (torch, dask) is skipped where it is not installed, as on
    # the core install of the README's first command
    for name in re.findall(r"^(?:import|from) ([A-Za-z_]\w*)", block, flags=re.M):
        if name != "rnn_gpu":
            pytest.importorskip(name)
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
