"""One batch through a model: the unit of work that the local runner and Dask both map.

Data on disk is sequence-major, ``(N, T, I)``: one sequence after another, so that a batch is
a contiguous slice of rows. :func:`apply_batch` takes such a slice (and its lengths) and returns
what ``--emit`` asks for, always batch-major and as NumPy, ready to be written at the same rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._arrays import to_numpy
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
    xt = x if model.batch_first else _swap01(x)
    y, state = model(xt, lengths=lengths, backend=backend)
    if emit == "last":
        h = state[0] if isinstance(state, tuple) else state            # LSTM: (h, c)
        h = to_numpy(h)[-model.num_directions:]                        # top layer: (D, B, P)
        return np.ascontiguousarray(np.concatenate(list(h), axis=-1))  # (B, D*P)
    y = to_numpy(y)
    y = y if model.batch_first else y.swapaxes(0, 1)                   # (B, T, D*P)
    if emit == "sequence":
        return np.ascontiguousarray(y)
    probs = _readout(model)(y)
    if lengths is not None:
        steps = np.arange(probs.shape[1])[None, :]
        probs[steps >= np.asarray(to_numpy(lengths))[:, None]] = 0.0  # padding, not a guess
    return probs


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
