"""np.errstate (and np.seterrcall) hold in every tile the NumPy backend runs on its pool, on
NumPy 1.x as on 2.x. Kept free of torch, so that it runs on the minimum NumPy the project
claims without the test extra."""

from __future__ import annotations

import contextvars

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
