"""np.errstate (and np.seterrcall) hold in every tile the NumPy backend runs on its pool, on
NumPy 1.x as on 2.x; and the one-BLAS-thread limit reaches a BLAS loaded after the first call.
Kept free of torch, so that it runs on the minimum NumPy the project claims without the test
extra (and with no BLAS of torch's loaded before the test's own)."""

from __future__ import annotations

import contextvars
import os

import numpy as np
import pytest

import rnn_gpu as rg
import rnn_gpu.backends.numpy as nb


def _inf_pair_in(row: int) -> np.ndarray:
    x = np.zeros((3, 256, 8), np.float32)
    x[0, row, :2] = np.inf, -np.inf               # inf - inf in the input GEMM: invalid
    return x


@pytest.fixture
def model(monkeypatch):
    monkeypatch.setenv("RNN_GPU_NUM_THREADS", "2")  # row 0 in the caller's tile, 255 in the pool's
    return rg.RNN(8, 512, seed=0)


@pytest.fixture(params=["context", "thread"])
def errstate_kept_in(request, monkeypatch):
    """``thread``: NumPy 1.x, whose errstate lives in the thread, not in the context that the
    backend copies into its pool's tiles (emulated on NumPy 2 by handing the tiles an empty
    context)."""
    if request.param == "thread":
        monkeypatch.setattr(nb.contextvars, "copy_context", contextvars.Context)
    return request.param


def test_errstate_holds_in_every_tile(model, errstate_kept_in):
    """An inf pair in row 0 raised under errstate(all="raise"); in row 255, on NumPy 1.24, it
    came back as NaN with a warning."""
    for row in (0, 255):
        with np.errstate(all="raise"), pytest.raises(FloatingPointError):
            model(_inf_pair_in(row))


def test_errcall_hears_every_tile(model, errstate_kept_in):
    for row in (0, 255):
        heard: list[str] = []
        with np.errstate(all="call", call=lambda kind, flag, heard=heard: heard.append(kind)):
            model(_inf_pair_in(row))
        assert "invalid value" in heard


def test_pool_threads_keep_numpys_defaults_after_a_call(model):
    with np.errstate(all="raise"), pytest.raises(FloatingPointError):
        model(_inf_pair_in(255))
    y, _ = model(np.zeros((3, 256, 8), np.float32))   # the pool's tile ran under "raise" before
    assert np.isfinite(y).all()
    with np.errstate(invalid="ignore"):
        y, _ = model(_inf_pair_in(255))
    assert np.isnan(y[:, 255]).any()


_LATE_BLAS = r"""
import ctypes, json, os, shutil, sys, tempfile
import rnn_gpu.backends.numpy as nb
from threadpoolctl import threadpool_info

def blas():
    return sorted((i["filepath"], i["num_threads"]) for i in threadpool_info()
                  if i["user_api"] == "blas")

with nb._single_threaded_blas():            # the first call: the loaded libraries scanned
    pass
# a package imported afterwards that brings its own BLAS, as scipy and scikit-learn do: a
# copy of NumPy's, loaded by the package's import
folder = tempfile.mkdtemp()
shutil.copy(blas()[0][0], os.path.join(folder, "libscipy_openblas64_late.so"))
with open(os.path.join(folder, "late_blas_package.py"), "w") as f:
    f.write("import ctypes, os\nHERE = os.path.dirname(__file__)\n"
            "LIB = ctypes.CDLL(os.path.join(HERE, 'libscipy_openblas64_late.so'))\n")
sys.path.insert(0, folder)
import late_blas_package
outside = blas()
with nb._single_threaded_blas():
    inside = blas()
print(json.dumps([outside, inside, blas()]))
shutil.rmtree(folder)
"""


def test_a_blas_loaded_after_the_first_call_is_limited_too():
    """A BLAS loaded by an import after the first multi-tile call (scipy, imported later in a
    notebook) was not in the kept scan of the libraries: it ran its own threads beside our
    tiles."""
    import json
    import subprocess
    import sys

    pytest.importorskip("threadpoolctl")
    from threadpoolctl import threadpool_info

    if not any(i["user_api"] == "blas" and i["internal_api"] == "openblas"
               for i in threadpool_info()):
        pytest.skip("NumPy's BLAS is not an OpenBLAS threadpoolctl can see")
    done = subprocess.run([sys.executable, "-c", _LATE_BLAS], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OPENBLAS_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-2000:]
    outside, inside, after = json.loads(done.stdout)
    if len(outside) < 2:
        pytest.skip("the copied OpenBLAS did not load as a second library")
    assert [n for _, n in inside] == [1] * len(outside), inside
    assert after == outside
