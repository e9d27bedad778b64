"""Imported from a source checkout (its root first on sys.path), rnn_gpu takes that checkout's
backends/ and kernels/: not none (a regular install elsewhere: an ImportError) and not those of
another checkout installed editable (tests run in one clone against another's backends)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_WHERE = """
import json, rnn_gpu, rnn_gpu.backends.numpy as nb, rnn_gpu.kernels.cuda.sources as cs
import importlib.resources as r
cu = r.files("rnn_gpu.kernels").joinpath("cuda", "recurrent.cu")
print(json.dumps([rnn_gpu.__file__, nb.__file__, cs.__file__, str(cu), cu.is_file(),
                  rnn_gpu.backends.names()]))
"""


def test_a_checkout_imports_its_own_backends_and_kernels(tmp_path):
    clone = tmp_path / "other clone"
    for part in ("rnn_gpu", "backends", "kernels"):
        shutil.copytree(ROOT / part, clone / part,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", clone)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", _WHERE], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    *files, cu_found, names = json.loads(done.stdout)
    for f in files:
        assert Path(f).resolve().is_relative_to(clone.resolve()), (f, files)
    assert cu_found and "numpy" in names
