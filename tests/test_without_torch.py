"""Without torch (the core install: numpy, safetensors, threadpoolctl, tqdm) the test suite
collects cleanly: the modules that need torch are skipped with the reason, no module fails to
import, and the NumPy-only modules still run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

# torch (and what needs it) made unimportable, as on a machine without it
_COLLECT = """
import sys
for name in ("torch", "triton", "cupy"):
    sys.modules[name] = None
import pytest
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "-rs", sys.argv[1]]))
"""


def test_suite_collects_without_torch():
    done = subprocess.run([sys.executable, "-c", _COLLECT, str(TESTS)], cwd=TESTS.parent,
                          capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "ERROR" not in out and "error" not in out.splitlines()[-1], out[-4000:]
    assert "torch is not installed" in out
    assert "tests/test_io.py::" in out              # a NumPy-only module is still collected
