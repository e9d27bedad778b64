"""What the built distributions hold: the wheel the kernel sources, the backends and the entry
points (and no top-level ``kernels``/``backends``); the sdist everything its tests import.
Built with setuptools' PEP 517 hooks in a fresh interpreter, from a copy of the tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

setuptools = pytest.importorskip("setuptools")
if int(setuptools.__version__.split(".")[0]) < 64:
    pytest.skip("the build backend needs setuptools >= 64", allow_module_level=True)


def _has_bdist_wheel() -> bool:
    """setuptools >= 70.1 builds wheels by itself; before, it needs the ``wheel`` package."""
    try:
        import setuptools.command.bdist_wheel  # noqa: F401
    except ImportError:
        try:
            import wheel.bdist_wheel  # noqa: F401
        except ImportError:
            return False
    return True


def _build(kind: str, src: Path, out: Path) -> Path:
    out.mkdir()
    subprocess.run([sys.executable, "-c",
                    f"from setuptools import build_meta as b; b.build_{kind}({str(out)!r})"],
                   cwd=src, check=True, capture_output=True, timeout=300)
    (built,) = out.iterdir()
    return built


def _tracked(*folders: str) -> list[str]:
    """The files under ``folders`` that git tracks (a checkout's leftovers, such as asv's
    results, are no part of a release); without git (an unpacked sdist), every file but
    caches and hidden folders."""
    try:
        listed = subprocess.run(["git", "ls-files", "--", *folders], cwd=ROOT, check=True,
                                capture_output=True, text=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError):
        listed = None
    if listed:
        return listed
    return [p.relative_to(ROOT).as_posix() for folder in folders
            for p in (ROOT / folder).rglob("*")
            if p.is_file() and not p.name.endswith(".pyc")
            and not any(part == "__pycache__" or part.startswith(".")
                        for part in p.relative_to(ROOT).parts)]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """The project's files without build leftovers (egg-info, build/, caches)."""
    dst = tmp_path_factory.mktemp("src") / "rnn-gpu"
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(
        ".git", "*.egg-info", "build", "dist", "__pycache__", ".*_cache", ".hypothesis",
        ".venv", ".asv", "example_job"))
    return dst


@pytest.mark.skipif(not _has_bdist_wheel(), reason="setuptools < 70.1 without wheel")
def test_wheel_holds_kernels_backends_and_entry_points(tree, tmp_path):
    names = set(zipfile.ZipFile(_build("wheel", tree, tmp_path / "dist")).namelist())
    for src in sorted((ROOT / "kernels" / "cuda").glob("*.cu*")):
        assert f"rnn_gpu/kernels/cuda/{src.name}" in names
    for name in ("numpy", "triton", "cupy"):
        assert f"rnn_gpu/backends/{name}.py" in names
    assert {n.split("/")[0] for n in names if not n.startswith("rnn_gpu-")} == {"rnn_gpu"}
    (ep,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    (whl,) = (tmp_path / "dist").iterdir()
    text = zipfile.ZipFile(whl).read(ep).decode()
    assert "rnn-gpu = rnn_gpu.cli:main" in text
    assert "numpy = rnn_gpu.backends.numpy:NumpyBackend" in text
    # BSD-3-Clause asks that binary redistributions carry the licence text
    assert any(n.endswith("LICENSE") and ".dist-info/" in n for n in names), sorted(names)


def test_sdist_holds_what_its_tests_need(tree, tmp_path):
    with tarfile.open(_build("sdist", tree, tmp_path / "dist")) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    tracked = _tracked("tests", "examples", "asv_benchmarks")
    missing = sorted(set(tracked) - names)
    assert not missing, f"not in the sdist: {missing}"
    assert {"README.md", "LICENSE", "pyproject.toml", "docs/design.md"} <= names
