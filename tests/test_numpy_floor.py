"""The NumPy floor command runs the backend's tiles' GEMMs and exps next to torch.nn.LSTM."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from rnn_gpu.bench import numpy_floor  # noqa: E402


@pytest.mark.parametrize("shape, threads, tiles", [
    ((3, 4, 8), 1, [(4, 8)]),                       # one tile: a small call
    ((2, 32, 512), 2, [(32, 256), (32, 256)]),      # unit tiles: small batch, large H
    ((3, 32, 128), 2, [(16, 128), (16, 128)]),      # short row tiles: chunked input GEMMs
    ((2, 128, 64), 2, [(64, 64), (64, 64)]),        # row tiles of 64: one [x|h|1] GEMM
])
def test_floor_table_times_every_runner_on_the_backends_tiles(shape, threads, tiles,
                                                                monkeypatch):
    monkeypatch.setattr(numpy_floor, "_tile_work", counting(numpy_floor._tile_work))
    ms, got_tiles = numpy_floor.floor_table(*shape, threads=threads, repeats=2)
    assert set(ms) == {"gemms", "gemms+exp", "numpy backend", "torch.nn"}
    assert all(v > 0 for v in ms.values())
    assert got_tiles == tiles
    assert counting.calls == 2 * len(tiles)            # with and without the exps


def counting(fn):
    counting.calls = 0

    def wrapped(*args, **kwargs):
        counting.calls += 1
        return fn(*args, **kwargs)
    return wrapped


def test_command_prints_a_row_per_shape(capsys):
    assert numpy_floor.main(["--shape", "2x4x8", "--shape", "2x2x4", "--repeats", "1",
                             "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "2x4x8" in out and "2x2x4" in out and "torch.nn" in out
