"""Peak host memory of the layers' inference on the NumPy backend, against bounds from the shape.

tracemalloc traces NumPy's allocations, so a (T, B, ·) buffer too many shows up as its bytes.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import rnn_gpu as rg

T, B, I, H = 256, 128, 32, 32         # long sequences: the per-step buffers stay small


def traced_peak(fn) -> int:
    """Bytes allocated at the peak of ``fn()`` beyond what was held before it."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN", "TwoStageRNN"])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_bidirectional_inference_keeps_one_direction_beside_the_output(cell, with_lengths):
    """Both directions' outputs were kept whole and then concatenated: twice y at the peak.
    Each now goes into its half of y as soon as it is back (with segments, directly), so the
    peak is y plus at most one direction's output, plus the backend's small buffers."""
    m = getattr(rg, cell)(I, H, bidirectional=True, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, I)).astype("float32")
    lengths = rng.integers(1, T + 1, B) if with_lengths else None
    m(x[:2], lengths=None if lengths is None else np.minimum(lengths, 2), backend="numpy")
    peak = traced_peak(lambda: m(x, lengths=lengths, backend="numpy"))
    y_bytes = T * B * 2 * H * 4                       # the output itself
    print(f"{cell} lengths={with_lengths}: peak {peak / y_bytes:.2f} y")
    assert peak <= 1.75 * y_bytes, (peak, y_bytes)   # y + one direction's y (0.5 y) + buffers


def test_bidirectional_stack_keeps_no_concatenation():
    """Two bidirectional layers: the layer below's output, this layer's, one direction's."""
    m = rg.GRU(I, H, num_layers=2, bidirectional=True, seed=0)
    x = np.random.default_rng(1).standard_normal((T, B, I)).astype("float32")
    m(x[:2], backend="numpy")
    peak = traced_peak(lambda: m(x, backend="numpy"))
    y_bytes = T * B * 2 * H * 4
    print(f"2 layers: peak {peak / y_bytes:.2f} y")
    assert peak <= 2.75 * y_bytes, (peak, y_bytes)
