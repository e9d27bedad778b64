"""The floor of the NumPy backend's LSTM forward on this machine, next to torch.nn.LSTM.

``python -m rnn_gpu.bench.numpy_floor --shape 256x32x512`` times only what the backend cannot
avoid, laid out exactly as its tiles lay it out (:func:`rnn_gpu.backends.numpy._plan`), on the
same threads, in the same process as torch.nn.LSTM (interleaved, median):

* ``gemms``: every GEMM of the forward: the input projection in ~1024-row chunks and one
  recurrent GEMM per step (or, for row tiles of >= 64 rows, the one ``[x_t | h | 1]`` GEMM per
  step), each tile on its own thread with single-threaded BLAS;
* ``gemms+exp``: the same plus NumPy's ``exp`` over the gates and over c (five exps per unit and
  row: the least any LSTM formulation needs);
* ``numpy backend``: the real forward; ``torch.nn``: the peer.

When ``gemms+exp`` alone is not faster than torch.nn, no arrangement of NumPy calls reaches
torch's speed at that shape on this machine: the rest of a step (the other elementwise passes,
the barrier) only adds.
"""

from __future__ import annotations

import argparse

import numpy as np

from .threads import available_cores, same_threads
from .timing import CpuTimer, measure


def _tile_work(T: int, H: int, rows: int, units: int, with_exp: bool, rng):
    """One tile's GEMMs (and exps) for the whole sequence, as the backend does them."""
    from rnn_gpu.backends.numpy import _CHUNK_ROWS, _MIN_CONCAT_ROWS

    gates = 4 * units
    concat = units == H and rows >= _MIN_CONCAT_ROWS
    f32 = np.float32
    x = rng.standard_normal((T * rows, H), dtype=f32)
    g = np.empty((rows, gates), f32)
    z = rng.standard_normal((rows, gates + units), dtype=f32)   # the gates, then c
    e = np.empty_like(z)
    if concat:
        w_cat = rng.standard_normal((gates, 2 * H + 1), dtype=f32)
        xh = np.ones((rows, 2 * H + 1), f32)
    else:
        w_ih = rng.standard_normal((gates, H), dtype=f32)
        w_hh = rng.standard_normal((gates, H), dtype=f32)
        h = np.zeros((rows, H), f32)
        steps = max(1, min(T, -(-_CHUNK_ROWS // rows)))
        xin = np.empty((steps * rows, gates), f32)

    def run():
        for t in range(T):
            if concat:
                xh[:, :H] = x[t * rows:(t + 1) * rows]
                np.matmul(xh, w_cat.T, out=g)
            else:
                if t % steps == 0:
                    n = min(steps, T - t) * rows
                    np.matmul(x[t * rows:t * rows + n], w_ih.T, out=xin[:n])
                np.matmul(h, w_hh.T, out=g)
            if with_exp:
                np.exp(z, out=e)

    return run


def floor_table(T: int, B: int, H: int, threads: int,
                repeats: int) -> tuple[dict[str, float], list[tuple[int, int]]]:
    """Median milliseconds of the four runners (see the module docstring), and the tiles as
    (rows, units) pairs."""
    import torch

    import rnn_gpu as rg
    from rnn_gpu.backend_api import Problem
    from rnn_gpu.backends.numpy import _plan, _run_tiles

    rng = np.random.default_rng(0)
    with same_threads(threads):
        problem = Problem(cell="lstm", activations=(), dtype="float32", device="cpu",
                          input_kind="numpy", seq_len=T, batch=B, input_size=H, hidden_size=H)
        tiles = _plan(problem, B, keep_tape=False)
        shapes = [(t.rows.stop - t.rows.start, t.units.stop - t.units.start) for t in tiles]

        def primitives(with_exp):
            # the backend's own tile runner: its thread pool, single-threaded BLAS per tile
            work = {id(tile): _tile_work(T, H, b, u, with_exp, rng)
                    for tile, (b, u) in zip(tiles, shapes)}
            return lambda: _run_tiles(lambda tile: work[id(tile)](), tiles)

        layer = rg.LSTM(H, H, seed=0)
        peer = torch.nn.LSTM(H, H)
        peer.load_state_dict({k: torch.from_numpy(np.asarray(v))
                              for k, v in layer.state_dict().items()})
        x = rng.standard_normal((T, B, H)).astype(np.float32)
        xt = torch.from_numpy(x)

        def torch_call():
            with torch.no_grad():
                peer(xt)

        timings = measure({"gemms": primitives(False), "gemms+exp": primitives(True),
                           "numpy backend": lambda: layer(x, backend="numpy"),
                           "torch.nn": torch_call}, timer=CpuTimer(), repeats=repeats)
    return {name: t.median * 1e3 for name, t in timings.items()}, shapes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rnn_gpu.bench.numpy_floor",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", metavar="TxBxH",
                        help="LSTM shapes, I = H (default: 256x32x512 and 128x256x128)")
    parser.add_argument("--threads", type=int, default=available_cores())
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    shapes = args.shape or ["256x32x512", "128x256x128"]
    print(f"LSTM float32 forward, {args.threads} threads, median of {args.repeats} (ms)")
    for shape in shapes:
        T, B, H = (int(v) for v in shape.split("x"))
        ms, tiles = floor_table(T, B, H, args.threads, args.repeats)
        cells = "  ".join(f"{name} {value:7.1f}" for name, value in ms.items())
        tiled = ", ".join(f"{b} rows x {u} units" for b, u in tiles)
        print(f"{shape:>12}  {cells}   (tiles: {tiled})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
