"""One batch through a model: the unit of work that the local runner and Dask both map.

Data on disk is sequence-major, ``(N, T, I)``: one sequence after another, so that a batch is
a contiguous slice of rows. :func:`apply_batch` takes such a slice (and its lengths) and returns
what ``--emit`` asks for, always batch-major and as NumPy, ready to be written at the same rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._arrays import device_of, dtype_name, kind_of, to_kind, to_numpy
from ..readout import readout_mismatch

EMITS = ("last", "sequence", "probs")


def output_shape(model, n: int, T: int, emit: str) -> tuple[int, ...]:
    """Shape of the output for ``n`` sequences padded to ``T`` steps.

    ``last``: the top layer's final hidden state, both directions side by side, ``(n, D*H_out)``.
    ``sequence``: every output, ``(n, T, D*H_out)``, zero after each sequence's length.
    ``probs``: the readout's class probabilities at every step, ``(n, T, C)``, zero after each
    sequence's length.
    """
    width = model.num_directions * model.output_size
    if emit == "last":
        return (n, width)
    if emit == "sequence":
        return (n, T, width)
    if emit == "probs":
        readout = _readout(model)
        return (n, T, readout.num_classes)
    raise ValueError(f"emit: expected one of {', '.join(EMITS)}, got {emit!r}")


def apply_batch(model, x: Any, lengths: Any = None, *, emit: str = "last",
                backend: str | None = None) -> np.ndarray:
    """Run ``model`` on ``x`` of shape ``(B, T, I)`` (whatever the model's ``batch_first``) and
    return the ``emit`` output as a NumPy array of :func:`output_shape` ``(B, T, emit)``."""
    if emit not in EMITS:
        raise ValueError(f"emit: expected one of {', '.join(EMITS)}, got {emit!r}")
    if getattr(x, "ndim", None) != 3:
        raise ValueError(f"x: expected a batch of shape (B, T, input_size), got shape "
                         f"{tuple(getattr(x, 'shape', ()))}")
    x = _in_bfloat16(model, x)
    xt = x if model.batch_first else _swap01(x)
    y, state = model(xt, lengths=lengths, backend=backend)
    if emit == "last":
        h = state[0] if isinstance(state, tuple) else state            # LSTM: (h, c)
        h = _host(h)[-model.num_directions:]                           # top layer: (D, B, P)
        return np.ascontiguousarray(np.concatenate(list(h), axis=-1))  # (B, D*P)
    y = _host(y)
    y = y if model.batch_first else y.swapaxes(0, 1)                   # (B, T, D*P)
    if emit == "sequence":
        return np.ascontiguousarray(y)
    probs = _readout(model)(y)
    if lengths is not None:
        steps = np.arange(probs.shape[1])[None, :]
        probs[steps >= np.asarray(to_numpy(lengths))[:, None]] = 0.0  # padding, not a guess
    return probs


def _host(a) -> np.ndarray:
    """A result as NumPy; bfloat16 as float32 (exact), which the runner writes."""
    if dtype_name(a) == "bfloat16":
        a = to_kind(a, "torch", device_of(a)).float()
    return to_numpy(a)


def _in_bfloat16(model, x):
    """A bfloat16 model's batch, which the runner reads and stages as float32 (NumPy has no
    bfloat16; each value is exactly a float32), cast where it now lies, through torch (which
    holds bfloat16 models). The layers refuse a dtype other than the model's."""
    if model.dtype != "bfloat16" or dtype_name(x) == "bfloat16":
        return x
    import torch

    kind, device = kind_of(x), device_of(x)
    cast = to_kind(x, "torch", device).to(torch.bfloat16)
    return to_kind(cast, "cupy", device) if kind == "cupy" else cast   # NumPy: torch stays


def _readout(model):
    readout = getattr(model, "readout", None)
    if readout is None:
        raise ValueError("emit: 'probs' needs a model saved with a Readout (model.readout), "
                         "and this model has none; emit 'last' or 'sequence' instead")
    mismatch = readout_mismatch(model, readout)
    if mismatch:
        raise ValueError(mismatch)
    return readout


def _swap01(x):
    return x.swapaxes(0, 1) if hasattr(x, "swapaxes") else x.transpose(0, 1)
