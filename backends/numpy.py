"""NumPy backend: the fused recurrence of every cell, forward and backward, on the CPU.

The fallback for everyone without a GPU, so it is written for speed within NumPy's means.
Numbers below: a 2-core AMD EPYC VM, float32, OpenBLAS 0.3.31; see docs/performance.md.

* It takes the layer's input, not xw (``forward_layer``, the fused path of DESIGN §4). Each
  thread projects its own rows, a few time steps at a time (one GEMM of ~1024 rows into a
  reused buffer, biases folded in); LSTM row blocks go further and do one GEMM per step on
  ``[x_t | h | 1]``. The layer's one big GEMM wrote a (T, B, gates*H) array that was read back
  once, and left OpenBLAS's worker threads spinning for ~0.1 s of CPU, which took a core from
  the recurrence (LSTM 128x256x128: ~200 ms through the layer's GEMM, ~160 ms with the spinning
  switched off by OPENBLAS_THREAD_TIMEOUT, ~110 ms now).
* Each step does its GEMM with ``np.matmul(..., out=)`` into a preallocated buffer and then
  in-place ufuncs over whole buffers; nothing in Python runs per element.
* The work is split into tiles, one per thread, like the GPU kernels' tiling (DESIGN §5): row
  blocks of the batch (no synchronisation), or, for small batches at inference, ranges of
  hidden units that meet at a barrier after every step (see ``_plan``). NumPy releases the GIL
  inside ufuncs and BLAS, and BLAS is pinned to one thread meanwhile so that the tiles do not
  fight over cores.
* The sigmoid gates go through one ``np.exp`` over the whole gate buffer: their weights and
  biases are stored negated so that the GEMMs yield -z directly, and sigma(z) = 1/(1+e^-z).
  One call over a contiguous buffer is ~2x faster than several over strided gate slices (LSTM
  step, 128 rows, H=128: 284 us against 477 us of elementwise work). tanh is np.tanh, taken
  from z itself: 2/(1+e^-2z) - 1 was as fast but lost all relative accuracy for small z.
* Without ``lengths``, the chunked paths write h_t straight into ``y[t]`` and read it back
  from there (``_Hidden``).
* The training tape keeps no copy of y: h_{t-1} (and RNN's and TwoStageRNN's h_t) are read
  back from y and h0 (``_Steps.h_before``, ``_outer_h_before``), and y is written where the
  layer asks (``out=``, rnn_gpu.backend_api), so the tape refers to the layer's own output.
  That is T*B*H per layer and direction less (RNN 1 layer, 64x512x128 float32: training peak
  97 -> 65 MiB); the layer refuses a backward whose y the caller changed in place.
* With ``lengths``, the layer calls it once per segment of steps over the sequences still
  running (``segment_costs``, ``rnn_gpu._segments``): ~0.6 of the full-length work for uniform
  lengths, instead of every row for every step with the ended ones masked.
* The backward pass runs the step in reverse time and leaves the weight gradients to one large
  GEMM each after the loop.

Equations: :mod:`rnn_gpu.backend_api`. Tape arrays are indexed by time ``t`` (not by processing
order), so the same code serves both directions.
"""

from __future__ import annotations

import contextvars
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from rnn_gpu._arrays import column_sums
from rnn_gpu._config import cpu_threads_cap
from rnn_gpu.backend_api import Backend, Problem, SegmentCosts, Tape

# ----------------------------------------------------------------------------- threads
# How a call is split over threads (measured on a 2-core EPYC VM, float32, forward):
# * row tiles need no synchronisation, so they win whenever each has enough rows (>= 64) or,
#   below that, enough work per step to pay for ~20 Python-level calls (RNN 256x32x512: row
#   tiles of 16 rows 102 ms, unit tiles 133 ms, one thread 112 ms);
# * unit tiles meet at a barrier after every step (~25 us), and only beat row tiles when each
#   tile's recurrent GEMM is large: their W_hh slices are half the size, and OpenBLAS repacks
#   W_hh on every call (LSTM 256x32x512: 365 ms against 404 for row tiles, 469 for one thread
#   with 2-thread BLAS);
# * below ~1M multiply-adds per tile and step, one thread with multi-threaded BLAS is best
#   (RNN 200x16x128: 10 ms against 20 for row tiles and 42 for unit tiles); so it is for
#   training below 64 rows per tile (LSTM 64x32x256 forward with tape + backward: 51 + 63 ms
#   on one thread, 70 + 74 ms in row tiles of 16). LSTM's forward with the tape in unit tiles,
#   each writing its units' columns of the tape, was tried and was slower than one thread
#   (Sapphire Rapids VM, medians of 9: 256x32x512 526 against 448 ms, 128x64x256 161
#   against 107).
_MIN_ROWS_PER_THREAD = 64            # row tiles at least this tall need no other reason
_MIN_SMALL_ROWS = 16                 # shorter row tiles need _MIN_TILE_MACS of work too
_MIN_TILE_MACS = 1 << 20             # recurrent multiply-adds per tile and step
_MIN_UNIT_TILE_MACS = 8 << 20
_MIN_UNITS_PER_THREAD = 64
_UNIT_SPLIT_CELLS = ("lstm", "gru", "rnn")
_RECURRENT_GATES = {"lstm": 4, "gru": 3, "rnn": 1, "twostage": 3}

# Variable lengths (NumpyBackend.segment_costs), in row-steps:
_SEGMENT_STEP_ROWS = 16
_SEGMENT_CALL_STEPS = 2

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()
_barrier_lock = threading.Lock()      # one barrier group at a time in the pool: no deadlock
_blas_controller = None
_blas_controller_modules = -1         # len(sys.modules) when _blas_controller scanned
_blas_limiter = None                  # the limit in force while _blas_users > 0
_blas_users = 0
_blas_lock = threading.Lock()


def num_threads() -> int:
    """Threads the backend uses: ``RNN_GPU_NUM_THREADS`` if set, else the usable cores, at
    most the caller's cap (``rnn_gpu._config.cpu_threads_scope``: torch's thread count for the
    torch drop-ins)."""
    env = os.environ.get("RNN_GPU_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:                      # not on Linux
        cores = os.cpu_count() or 1
    cap = cpu_threads_cap()
    return max(1, min(cores, cap)) if cap else cores


@dataclass
class _Tile:
    """One thread's share of a call: a block of batch rows times a range of hidden units."""

    rows: slice
    units: slice
    barrier: threading.Barrier | None = None   # shared by the tiles of one row block

    @property
    def whole_rows(self) -> bool:
        return self.barrier is None

    def sync(self) -> None:
        if self.barrier is not None:
            self.barrier.wait()


def _split(n: int, parts: int) -> list[slice]:
    bounds = [n * i // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _plan(problem: Problem, batch: int, keep_tape: bool) -> list[_Tile]:
    """Row tiles, unit tiles or one tile: see the measurements at the top of this section."""
    n = num_threads()
    H, P = problem.hidden_size, problem.output_size
    every_unit = slice(0, H)
    if n <= 1:
        return [_Tile(slice(0, batch), every_unit)]
    per_row = P * _RECURRENT_GATES[problem.cell] * H          # multiply-adds per row and step
    rows = batch // n
    row_tiles = [_Tile(r, every_unit) for r in _split(batch, n)]
    if rows >= _MIN_ROWS_PER_THREAD and rows * per_row >= _MIN_TILE_MACS:
        return row_tiles
    if (not keep_tape and problem.cell in _UNIT_SPLIT_CELLS and not problem.proj_size
            and H // n >= _MIN_UNITS_PER_THREAD and batch * per_row // n >= _MIN_UNIT_TILE_MACS):
        barrier = threading.Barrier(n)
        return [_Tile(slice(0, batch), units, barrier) for units in _split(H, n)]
    if rows >= _MIN_SMALL_ROWS and rows * per_row >= _MIN_TILE_MACS and not keep_tape:
        return row_tiles
    return [_Tile(slice(0, batch), every_unit)]


@contextmanager
def _single_threaded_blas():
    """BLAS on one thread while tiles run (they are the threads). The limit is process-wide,
    so calls from several threads (Dask workers sharing a layer) share one: the first sets
    it and the last restores it. Each holding its own, the calls' restores interleaved and
    could leave BLAS on one thread for the rest of the process."""
    global _blas_controller, _blas_controller_modules, _blas_limiter, _blas_users
    with _blas_lock:
        if _blas_users == 0:
            # Scanning the loaded libraries costs ~0.5 ms, so the scan is kept; but a package
            # imported since (scipy, scikit-learn: each brings its own OpenBLAS) loaded a BLAS
            # the old scan did not know, which then ran its own threads beside our tiles. A
            # BLAS comes with an import, so a change in sys.modules calls for a new scan.
            if _blas_controller is None or _blas_controller_modules != len(sys.modules):
                from threadpoolctl import ThreadpoolController

                _blas_controller = ThreadpoolController()
                _blas_controller_modules = len(sys.modules)     # after threadpoolctl's own
            with _any_thread_controls_blas():
                _blas_limiter = _blas_controller.limit(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                with _any_thread_controls_blas():
                    _blas_limiter.restore_original_limits()
                _blas_limiter = None


@contextmanager
def _any_thread_controls_blas():
    """threadpoolctl >= 3.8 lets only the first thread that set OpenBLAS's (process-wide) limit
    change it while that thread lives; from any other thread the call does nothing, silently.
    The first and the last of our users are often different threads, so a limit set by one
    stayed at 1 thread for the rest of the process when another restored it, and a limit from
    a worker thread was skipped (its tiles then oversubscribed the cores: 48 GRU calls from 6
    threads took 1.2 s instead of 0.4-0.6). Our changes are serialised by _blas_lock, so the
    control is handed back after each. Earlier threadpoolctl has no such rule (no-op)."""
    try:
        from threadpoolctl import OpenBLASController
    except ImportError:
        OpenBLASController = None
    clear = getattr(OpenBLASController, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)
    try:
        yield
    finally:
        if clear is not None:
            clear(force=True)


def _after_fork_in_child() -> None:
    """A forked child (DataLoader workers, multiprocessing's "fork") has none of the pool's
    threads, but the pool counted them as idle and started none: the child's first multi-tile
    call waited forever. A lock another parent thread held at the fork stays held in the
    child. Start over: no pool, fresh locks, no BLAS users (the parent's limit, if one was on,
    is given back)."""
    global _pool, _pool_size, _pool_lock, _barrier_lock, _blas_lock, _blas_limiter, _blas_users
    _pool, _pool_size = None, 0
    _pool_lock, _barrier_lock, _blas_lock = threading.Lock(), threading.Lock(), threading.Lock()
    limiter, _blas_limiter, _blas_users = _blas_limiter, None, 0
    if limiter is not None:
        try:
            with _any_thread_controls_blas():
                limiter.restore_original_limits()
        except Exception:          # the child still computes; BLAS may stay on one thread
            pass


if hasattr(os, "register_at_fork"):          # not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _run_tiles(fn, tiles: list[_Tile]) -> None:
    """Call ``fn(tile)`` for every tile, in parallel; the calling thread takes the first."""
    if len(tiles) == 1:
        fn(tiles[0])
        return
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < len(tiles) - 1:
            _pool_size = len(tiles) - 1
            _pool = ThreadPoolExecutor(max_workers=_pool_size, thread_name_prefix="rnn_gpu_numpy")
    barrier = tiles[0].barrier

    # NumPy < 2 keeps np.errstate per thread, outside the context copied below: a pool thread
    # ran its tiles with the defaults (errstate(all="raise") raised for row 0 of a batch and
    # let row 255 through as NaN, warned). Each tile takes the caller's settings explicitly.
    err, errcall = np.geterr(), np.geterrcall()

    def guarded(tile):
        try:
            with np.errstate(call=errcall, **err):
                fn(tile)
        except BaseException:
            if tile.barrier is not None:
                tile.barrier.abort()            # release the other tiles instead of hanging
            raise

    with _single_threaded_blas(), (_barrier_lock if barrier is not None else nullcontext()):
        # Each tile in a copy of the caller's context, so that rnn_gpu's context-variable
        # scopes (_config's) hold in the pool's tiles as in the caller's (errstate: above)
        futures = [_pool.submit(contextvars.copy_context().run, guarded, tile)
                   for tile in tiles[1:]]
        errors = []
        try:
            guarded(tiles[0])
        except BaseException as exc:
            errors.append(exc)
        for f in futures:
            exc = f.exception()
            if exc is not None:
                errors.append(exc)
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if errors:
        raise (real or errors)[0]


# ----------------------------------------------------------------------------- activations
# In place, any float dtype. exp(-x) overflows to inf for x < -88 (float32), and 1/(1+inf) = 0
# is the right limit: callers run under np.errstate(over="ignore").

def _sigmoid_(x: np.ndarray) -> np.ndarray:
    np.negative(x, out=x)
    np.exp(x, out=x)
    x += 1.0
    np.reciprocal(x, out=x)
    return x


def _sigmoid_of_negated_(x: np.ndarray) -> np.ndarray:
    """``x`` holds ``-z``; leaves sigma(z) = 1 / (1 + e^-z)."""
    np.exp(x, out=x)
    x += 1.0
    np.reciprocal(x, out=x)
    return x


def _tanh_(x: np.ndarray) -> np.ndarray:
    """np.tanh in place. Not 2/(1+e^-2x) - 1, which was one exp and four cheap passes but kept
    only an absolute error of 1's rounding: tanh(1e-8) came out 0 and an LSTM fed inputs of
    1e-6 was 24% off torch.nn (relative RMS). np.tanh is as fast here (numpy 2.4, Sapphire
    Rapids: float32 0.41 ns an element against exp's 0.51; float64 4.5 against 1.6 + passes)."""
    return np.tanh(x, out=x)


def _relu_(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0, out=x)


_ACT = {"sigmoid": _sigmoid_, "tanh": _tanh_, "relu": _relu_}


def _act_slope(y: np.ndarray, act: str, out: np.ndarray) -> np.ndarray:
    """``act'(pre)`` written through the activation's output ``y``, into ``out``."""
    if act == "tanh":
        np.multiply(y, y, out=out)
        np.subtract(1.0, out, out=out)
    elif act == "sigmoid":
        np.subtract(1.0, y, out=out)
        np.multiply(out, y, out=out)
    else:                                                   # relu: 1 where y > 0
        np.greater(y, 0, out=out, casting="unsafe")
    return out


def _act_grad_(dy: np.ndarray, y: np.ndarray, act: str) -> np.ndarray:
    """``dy *= act'(pre)`` written through the activation's output ``y``."""
    dy *= _act_slope(y, act, np.empty_like(y))
    return dy


# ----------------------------------------------------------------------------- helpers

class _Steps:
    """Time order and validity masks for one direction."""

    def __init__(self, T: int, lengths: np.ndarray | None, reverse: bool):
        self.order = range(T - 1, -1, -1) if reverse else range(T)
        self.reverse, self.lengths = reverse, lengths
        if lengths is None:
            self.valid = None
        else:
            self.valid = np.arange(T)[:, None] < lengths[None, :]            # (T, B)
            self.full = self.valid.all(axis=1)                              # (T,)

    def invalid_rows(self, t: int, rows: slice) -> np.ndarray | None:
        """(b, 1) bool mask of rows that are past their length at step t, or None if none."""
        if self.valid is None or self.full[t]:
            return None
        v = self.valid[t, rows]
        return None if v.all() else ~v[:, None]

    def first_step(self) -> np.ndarray:
        """Each row's first step (the one that starts from h0), as one index for every row
        or a (B,) array: 0 forward; in reverse T-1, or with lengths the row's last valid step
        (0 for an empty row, which no gradient reaches)."""
        if not self.reverse or self.lengths is None:
            return np.array([self.order[0]], np.intp)
        return np.maximum(self.lengths - 1, 0).astype(np.intp)

    def h_before(self, y: np.ndarray, h0: np.ndarray, t: int, rows: slice) -> np.ndarray:
        """h_{t-1} of ``rows`` for step t (in processing order): y one step earlier, or h0
        where t is the row's first step. Rows past their length get y's zeros there (or, past
        the end in reverse, h0): values that no gradient reaches, as the forward's kept h
        was."""
        if t == self.order[0]:
            return h0[rows]
        prev = y[t + 1 if self.reverse else t - 1, rows]
        if self.reverse and self.lengths is not None:
            first = (self.lengths[rows] - 1 == t)[:, None]
            if first.any():
                return np.where(first, h0[rows], prev)
        return prev


def _emit(y_t: np.ndarray, h: np.ndarray, invalid: np.ndarray | None) -> None:
    np.copyto(y_t, h)
    if invalid is not None:
        np.copyto(y_t, 0.0, where=invalid)


def _keep(new: np.ndarray, old: np.ndarray, invalid: np.ndarray | None) -> None:
    if invalid is not None:
        np.copyto(new, old, where=invalid)


def _gate_rows(gates: int, H: int, units: slice) -> slice | np.ndarray:
    """Rows of W_hh (or columns of xw) for ``units`` of every gate, gate by gate: a slice
    (a view, no copy) when the tile has all the units."""
    if units.start == 0 and units.stop == H:
        return slice(0, gates * H)
    return np.concatenate([np.arange(k * H + units.start, k * H + units.stop)
                           for k in range(gates)])


def _count(index: slice | np.ndarray) -> int:
    return index.stop - index.start if isinstance(index, slice) else len(index)


def _scaled_rows(w: np.ndarray, rows: slice | np.ndarray, scale) -> np.ndarray:
    """``w[rows] * scale`` per row, C-contiguous; ``w[rows]`` itself when there is nothing to
    scale. The GEMMs take it transposed (``.T``) so that no transposing copy is ever made:
    OpenBLAS reads a transposed operand at the same speed, and the copy cost ~2.6 ns per
    element (~3 ms per call for LSTM H=512)."""
    if np.isscalar(scale) and scale == 1.0:
        return np.ascontiguousarray(w[rows])
    scale = scale[:, None] if np.ndim(scale) else scale
    return np.multiply(w[rows], scale)


@dataclass
class _Run:
    """One forward call of one layer and direction, shared by its tiles.

    The input comes either as the layer input ``x`` with ``w_ih``/``b_ih`` (the fused path) or
    as ``xw = W_ih x + b_ih`` (the plain :meth:`NumpyBackend.forward`).
    """

    x: np.ndarray | None
    w_ih: np.ndarray | None
    b_ih: np.ndarray | None
    xw: np.ndarray | None
    w: dict[str, Any]
    state: tuple[np.ndarray, ...]
    steps: _Steps
    out: dict[str, np.ndarray]
    tape: bool

    @property
    def dtype(self) -> np.dtype:
        return (self.x if self.x is not None else self.xw).dtype


# A chunk of the input projection has about this many rows (steps x tile rows): enough for an
# efficient GEMM (M=1024: 67-71 GFLOP/s on one EPYC core against 54-60 at M=32..128) while the
# buffer stays small enough to be reused from cache.
_CHUNK_ROWS = 1024
_CHUNK_BYTES = 8 << 20


@dataclass
class _Block:
    """Columns of the input term one cell wants together, already transformed for its step:
    ``scale * (W_ih x + b_ih)[cols] + extra`` (extra: the recurrent biases that fold in)."""

    cols: slice | np.ndarray
    scale: np.ndarray | float = 1.0
    extra: np.ndarray | None = None


class _InputChunks:
    """A tile's share of the input term, computed a few time steps at a time.

    ``step(t)`` returns one (rows, len(cols)) array per block for time t. Chunks follow the
    processing order, so the reverse direction works the same way.
    """

    def __init__(self, run: _Run, tile: _Tile, blocks: list[_Block]):
        self.run, self.rows, self.blocks = run, tile.rows, blocks
        self.b = tile.rows.stop - tile.rows.start
        T = len(run.steps.order)
        width = sum(_count(blk.cols) for blk in blocks)
        by_rows = -(-_CHUNK_ROWS // max(self.b, 1))
        by_bytes = _CHUNK_BYTES // max(self.b * width * run.dtype.itemsize, 1)
        self.steps = max(1, min(T, by_rows, by_bytes))
        self.reverse = T > 1 and run.steps.order[0] > run.steps.order[-1]
        self.T = T
        self.lo = self.hi = 0
        self.bufs = [np.empty((self.steps * self.b, _count(blk.cols)), run.dtype)
                     for blk in blocks]
        self.stage = None
        if run.x is not None:
            self.weights = [_scaled_rows(run.w_ih, blk.cols, blk.scale) for blk in blocks]
            self.biases = [self._bias(blk) for blk in blocks]

    def _bias(self, blk: _Block) -> np.ndarray | None:
        b_ih = self.run.b_ih
        bias = None if b_ih is None else b_ih[blk.cols] * blk.scale
        if blk.extra is not None:
            bias = blk.extra if bias is None else bias + blk.extra
        return bias

    def step(self, t: int) -> list[np.ndarray]:
        if not self.lo <= t < self.hi:
            if self.reverse:
                self.lo, self.hi = max(0, t + 1 - self.steps), t + 1
            else:
                self.lo, self.hi = t, min(self.T, t + self.steps)
            self._fill()
        k = (t - self.lo) * self.b
        return [buf[k:k + self.b] for buf in self.bufs]

    def _fill(self) -> None:
        run, rows, n, b = self.run, self.rows, self.hi - self.lo, self.b
        if run.x is not None:
            x = run.x[self.lo:self.hi, rows]
            if not x.flags.c_contiguous:
                # A row block, or batch_first input: one copy, then one 2-D GEMM (67 GFLOP/s
                # against 57 for NumPy's stacked matmul over the steps, 128-row blocks).
                if self.stage is None:
                    self.stage = np.empty((self.steps, b, x.shape[2]), x.dtype)
                x = self.stage[:n]
                np.copyto(x, run.x[self.lo:self.hi, rows])
            x = x.reshape(n * b, x.shape[2])
            for buf, w, bias in zip(self.bufs, self.weights, self.biases):
                out = buf[:n * b]
                np.matmul(x, w.T, out=out)
                if bias is not None:
                    out += bias
            return
        xw = run.xw[self.lo:self.hi, rows]
        for buf, blk in zip(self.bufs, self.blocks):
            out = buf[:n * b].reshape(n, b, -1)
            np.copyto(out, xw[:, :, blk.cols])
            if not (np.isscalar(blk.scale) and blk.scale == 1.0):
                out *= blk.scale
            if blk.extra is not None:
                out += blk.extra


class _Hidden:
    """Where a tile reads h_{t-1} and writes h_t.

    Without lengths, h_t lives in ``y[t]`` itself (no copy). With lengths, rows past their end
    must keep h but output zeros, so h lives in a double buffer shared by the tiles and is
    copied, masked, into y.
    """

    def __init__(self, run: _Run, tile: _Tile):
        self.y, self.tile = run.out["y"], tile
        # The columns of h this tile writes: all of them (h may be proj_size wide) unless the
        # tile is one of several splitting the hidden units.
        self.cols = slice(None) if tile.whole_rows else tile.units
        rows, units = tile.rows, self.cols
        h0 = run.state[0]
        self.alias = run.steps.valid is None
        if self.alias:
            self.cur = h0[rows]
        else:
            self.buf = run.out["_hbuf"]
            self.buf[0][rows, units] = h0[rows, units]
            tile.sync()
            self.k = 0
            self.cur = self.buf[0][rows]

    def target(self, t: int) -> np.ndarray:
        rows, units = self.tile.rows, self.cols
        if self.alias:
            return self.y[t, rows, units]
        return self.buf[1 - self.k][rows, units]

    def advance(self, t: int, invalid: np.ndarray | None) -> None:
        """h_t is in ``target(t)``: mask it, emit it, wait for the other unit tiles."""
        rows, units = self.tile.rows, self.cols
        if self.alias:
            self.cur = self.y[t, rows]
        else:
            new = self.buf[1 - self.k][rows, units]
            _keep(new, self.cur[:, units], invalid)
            _emit(self.y[t, rows, units], new, invalid)
            self.k = 1 - self.k
            self.cur = self.buf[self.k][rows]
        self.tile.sync()

    def final(self) -> np.ndarray:
        return self.cur[:, self.cols]


# ----------------------------------------------------------------------------- cells
# Each cell: forward(run, tile) fills out["y"][:, rows, units], the final state and, when
# training (row tiles only), the tape arrays for its rows; backward(tape, dy, dstate, steps,
# rows, grads) fills grads for those rows. Weight gradients are left to one GEMM after the
# loops (_weight_grads).


# LSTM: row-major gates (b, 4Hu) from one GEMM, with the rows of the weights (and biases) for
# gates i, f, o scaled by -1, so that one exp over the whole buffer gives e^-z there. With
# D = 1 + e^-z: sigma(z) = 1/D, so c' = c/D_f + tanh(z_g)/D_i and h = tanh(c')/D_o. Dividing by
# D instead of forming sigma saves a pass over the gates (~5% of the step at 128 rows, H=128).
# The g gate is not scaled: np.tanh takes z_g itself, before the exp (tanh as 2/D_g - 1 from
# e^-2z lost all relative accuracy for small z_g, see _tanh_).
_LSTM_SCALE = (-1.0, -1.0, 1.0, -1.0)
# With fewer rows the per-step GEMM is bound by reading its weights, and [W_ih | W_hh] is
# twice W_hh: below this, the input is projected in chunks instead.
_MIN_CONCAT_ROWS = 64


def _lstm_scale(dtype, Hu: int) -> np.ndarray:
    return np.repeat(np.array(_LSTM_SCALE, dtype), Hu)


def _lstm_cell(g: np.ndarray, views, c: np.ndarray, c_new: np.ndarray, tc: np.ndarray,
               tg: np.ndarray):
    """From g = (-z_i, -z_f, z_g, -z_o): tanh(z_g) in tg, then D = 1 + e^-z in g (one exp over
    the contiguous buffer; its g columns are left unused), c' in c_new, tanh(c') in tc."""
    d_i, d_f, z_g, _ = views
    np.tanh(z_g, out=tg)                                  # before the exp overwrites z_g
    np.exp(g, out=g)
    g += 1.0
    np.divide(c, d_f, out=c_new)
    np.divide(tg, d_i, out=tc)
    c_new += tc                                           # c' = sigma_f c + sigma_i tanh(z_g)
    np.tanh(c_new, out=tc)


def _gate_views(g: np.ndarray, gates: int, Hu: int) -> tuple[np.ndarray, ...]:
    return tuple(g[:, k * Hu:(k + 1) * Hu] for k in range(gates))


def _lstm_forward(run: _Run, tile: _Tile):
    if (tile.whole_rows and run.x is not None and not run.tape and "weight_hr" not in run.w
            and tile.rows.stop - tile.rows.start >= _MIN_CONCAT_ROWS):
        return _lstm_forward_concat(run, tile)
    w, steps, out = run.w, run.steps, run.out
    H = w["weight_hh"].shape[0] // 4
    rows, units = tile.rows, tile.units
    Hu = units.stop - units.start
    cols = _gate_rows(4, H, units)
    scale = _lstm_scale(run.dtype, Hu)
    whh = _scaled_rows(w["weight_hh"], cols, scale).T                  # (P, 4Hu)
    extra = w["bias_hh"][cols] * scale if "bias_hh" in w else None
    inputs = _InputChunks(run, tile, [_Block(cols, scale, extra)])
    whr_t = w.get("_weight_hr_t")
    hid = _Hidden(run, tile)
    c = run.state[1][rows, units].copy()
    b = c.shape[0]
    c_new, tc, tg = np.empty_like(c), np.empty_like(c), np.empty_like(c)
    m = np.empty_like(c) if whr_t is not None else None
    gates = np.empty((b, 4 * Hu), run.dtype)
    views = _gate_views(gates, 4, Hu)
    for t in steps.order:
        invalid = steps.invalid_rows(t, rows)
        (xin,) = inputs.step(t)
        if run.tape:
            gates = out["gates"][t, rows]
            views = _gate_views(gates, 4, Hu)
        np.matmul(hid.cur, whh, out=gates)
        gates += xin                                      # -z (z for the g gate)
        _lstm_cell(gates, views, c, c_new, tc, tg)
        if run.tape:
            out["cprev"][t, rows] = c
            out["tanh_c"][t, rows] = tc
        h_new = hid.target(t)
        if whr_t is None:
            np.divide(tc, views[3], out=h_new)
        else:
            np.divide(tc, views[3], out=m)
            np.matmul(m, whr_t, out=h_new)
        if run.tape:                                      # the tape keeps the activations
            np.reciprocal(gates, out=gates)               # sigma(z) = 1/D for i, f and o
            views[2][...] = tg
        _keep(c_new, c, invalid)
        hid.advance(t, invalid)
        c, c_new = c_new, c
    out["h"][rows, hid.cols] = hid.final()
    out["c"][rows, units] = c


def _lstm_forward_concat(run: _Run, tile: _Tile):
    """Row tiles at inference: one GEMM per step, ``[x_t | h | 1] @ [W_ih | W_hh | b]^T``.

    No input chunks, no separate bias pass, no second GEMM: 6-9% less CPU than the chunked
    path (LSTM 128x256x128 and 64x1024x256). h lives in the GEMM's input buffer; without
    lengths it is copied to y once per step.
    """
    w, steps, out = run.w, run.steps, run.out
    H = w["weight_hh"].shape[0] // 4
    rows = tile.rows
    I, b = run.x.shape[2], rows.stop - rows.start
    scale = _lstm_scale(run.dtype, H)
    bias = np.zeros(4 * H, run.dtype)
    for part in (run.b_ih, w.get("bias_hh")):
        if part is not None:
            bias += part
    w_cat = np.concatenate([run.w_ih, w["weight_hh"], bias[:, None]], axis=1)
    w_cat_t = (w_cat * scale[:, None]).T                                # (I + H + 1, 4H)
    xh = np.empty((b, I + H + 1), run.dtype)
    xh[:, I + H] = 1.0
    h = xh[:, I:I + H]
    h[...] = run.state[0][rows]
    c = run.state[1][rows].copy()
    c_new, tc, tg, h_new = (np.empty_like(c) for _ in range(4))
    gates = np.empty((b, 4 * H), run.dtype)
    views = _gate_views(gates, 4, H)
    for t in steps.order:
        invalid = steps.invalid_rows(t, rows)
        xh[:, :I] = run.x[t, rows]
        np.matmul(xh, w_cat_t, out=gates)
        _lstm_cell(gates, views, c, c_new, tc, tg)
        if invalid is None:
            np.divide(tc, views[3], out=h)
            out["y"][t, rows] = h
        else:
            np.divide(tc, views[3], out=h_new)
            _keep(h_new, h, invalid)
            _keep(c_new, c, invalid)
            h[...] = h_new
            _emit(out["y"][t, rows], h_new, invalid)
        c, c_new = c_new, c
    out["h"][rows] = h
    out["c"][rows] = c


def _lstm_backward(tape: dict, dy, dstate, steps: _Steps, rows: slice, grads: dict):
    """The reverse-time LSTM step into preallocated buffers: 17 NumPy calls a step and no
    temporaries, where writing each product out took ~30 calls and ~14 allocations. Backward
    of LSTM 128x256x128: median 143 against 166 ms (fastest 118 against 129); 256x32x512:
    fastest 376-378 against 389-390 ms, medians within the VM's noise (15-21 interleaved
    calls, Sapphire Rapids VM)."""
    w = tape["w"]
    H = w["weight_hh"].shape[0] // 4
    whh, whr = w["weight_hh"], w.get("weight_hr")
    dh, dc = dstate[0][rows].copy(), dstate[1][rows].copy()
    dxw = grads["dxw"]
    dh_t, dh_prev = np.empty_like(dh), np.empty_like(dh)
    dc_t, dc_prev, tmp = np.empty_like(dc), np.empty_like(dc), np.empty_like(dc)
    slope = np.empty((dc.shape[0], 4 * H), dc.dtype)       # each gate's activation slope
    i_, f_, g_, o_ = (slice(k * H, (k + 1) * H) for k in range(4))
    for t in reversed(steps.order):
        invalid = steps.invalid_rows(t, rows)
        g = tape["gates"][t, rows]                          # activations: i, f, g, o
        tc = tape["tanh_c"][t, rows]
        if invalid is None:
            np.add(dh, dy[t, rows], out=dh_t)
        else:
            np.add(dh, np.where(invalid, 0.0, dy[t, rows]), out=dh_t)
        if whr is not None:
            grads["dh_out"][t, rows] = dh_t if invalid is None else np.where(invalid, 0.0, dh_t)
            dm = dh_t @ whr
        else:
            dm = dh_t
        _act_slope(g, "sigmoid", slope)                     # i, f, o; then g's own:
        _act_slope(g[:, g_], "tanh", slope[:, g_])
        np.multiply(tc, tc, out=tmp)                        # dc_t = dc + dm o (1 - tanh(c)^2)
        np.subtract(1.0, tmp, out=tmp)
        tmp *= g[:, o_]
        tmp *= dm
        np.add(dc, tmp, out=dc_t)
        d = dxw[t, rows]
        np.multiply(dc_t, g[:, g_], out=d[:, i_])
        np.multiply(dc_t, tape["cprev"][t, rows], out=d[:, f_])
        np.multiply(dc_t, g[:, i_], out=d[:, g_])
        np.multiply(dm, tc, out=d[:, o_])
        d *= slope
        np.multiply(dc_t, g[:, f_], out=dc_prev)
        np.matmul(d, whh, out=dh_prev)
        if invalid is not None:
            np.copyto(d, 0.0, where=invalid)
            np.copyto(dh_prev, dh_t, where=invalid)
            np.copyto(dc_prev, dc, where=invalid)
        dh, dh_prev = dh_prev, dh
        dc, dc_prev = dc_prev, dc
    grads["dh0"][rows] = dh
    grads["dc0"][rows] = dc


def _gru_forward(run: _Run, tile: _Tile):
    # Gate-major buffers (r, z and n each contiguous): GRU's gates need different treatment
    # (n is built from r), and ufuncs over strided gate slices cost 2.5-4x more. r and z are
    # negated (weights and biases) so that one exp gives e^-z for both.
    w, steps, out = run.w, run.steps, run.out
    whh = w["weight_hh"]
    H = whh.shape[0] // 3
    rows, units = tile.rows, tile.units
    u0, u1 = units.start, units.stop
    gate_cols = [slice(k * H + u0, k * H + u1) for k in range(3)]
    w_r, w_z = (np.negative(whh[c]).T for c in gate_cols[:2])          # (H, Hu) each
    w_n = whh[gate_cols[2]].T
    b_hh = w.get("bias_hh")
    b_n = b_hh[gate_cols[2]] if b_hh is not None else None
    inputs = _InputChunks(run, tile, [
        _Block(gate_cols[0], -1.0, None if b_hh is None else -b_hh[gate_cols[0]]),
        _Block(gate_cols[1], -1.0, None if b_hh is None else -b_hh[gate_cols[1]]),
        _Block(gate_cols[2])])                     # b_hn sits inside r * (W_hn h + b_hn)
    hid = _Hidden(run, tile)
    b, Hu = rows.stop - rows.start, u1 - u0
    rz_buf, n_buf, hn_buf = (np.empty((2, b, Hu), run.dtype), np.empty((b, Hu), run.dtype),
                             np.empty((b, Hu), run.dtype))
    for t in steps.order:
        invalid = steps.invalid_rows(t, rows)
        x_r, x_z, x_n = inputs.step(t)
        if run.tape:
            rz, n, hh_n = out["gates"][t, :2, rows], out["gates"][t, 2, rows], out["hh_n"][t, rows]
        else:
            rz, n, hh_n = rz_buf, n_buf, hn_buf
        h = hid.cur
        np.matmul(h, w_r, out=rz[0])
        np.matmul(h, w_z, out=rz[1])
        np.matmul(h, w_n, out=hh_n)
        rz[0] += x_r
        rz[1] += x_z
        _sigmoid_of_negated_(rz)
        if b_n is not None:
            hh_n += b_n
        np.multiply(rz[0], hh_n, out=n)
        n += x_n
        _tanh_(n)
        # h' = (1 - z) n + z h = n + z (h - n)
        h_new = hid.target(t)
        np.subtract(h[:, units], n, out=h_new)
        h_new *= rz[1]
        h_new += n
        hid.advance(t, invalid)
    out["h"][rows, hid.cols] = hid.final()


def _gru_backward(tape: dict, dy, dstate, steps: _Steps, rows: slice, grads: dict):
    w = tape["w"]
    H = w["weight_hh"].shape[0] // 3
    whh = w["weight_hh"]
    dh = dstate[0][rows].copy()
    dxw, drec = grads["dxw"], grads["drec"]
    for t in reversed(steps.order):
        invalid = steps.invalid_rows(t, rows)
        r, z, n = tape["gates"][t, :, rows]                 # gate-major: (3, B, H)
        hprev = steps.h_before(tape["y"], tape["h0"], t, rows)
        dh_t = dh + dy[t, rows] if invalid is None else dh + np.where(invalid, 0.0, dy[t, rows])
        d, dr_ = dxw[t, rows], drec[t, rows]
        np.multiply(dh_t, 1.0 - z, out=d[:, 2 * H:])
        _act_grad_(d[:, 2 * H:], n, "tanh")                       # dn_pre
        np.multiply(d[:, 2 * H:], tape["hh_n"][t, rows], out=d[:, :H])
        _act_grad_(d[:, :H], r, "sigmoid")                         # dr_pre
        np.multiply(dh_t, hprev - n, out=d[:, H: 2 * H])
        _act_grad_(d[:, H: 2 * H], z, "sigmoid")                   # dz_pre
        dr_[:, : 2 * H] = d[:, : 2 * H]
        np.multiply(d[:, 2 * H:], r, out=dr_[:, 2 * H:])            # d(W_hn h + b_hn)
        dh_prev = dh_t * z
        dh_prev += dr_ @ whh
        if invalid is not None:
            np.copyto(d, 0.0, where=invalid)
            np.copyto(dr_, 0.0, where=invalid)
            np.copyto(dh_prev, dh_t, where=invalid)
        dh = dh_prev
    grads["dh0"][rows] = dh


def _rnn_forward(run: _Run, tile: _Tile):
    w, steps, out = run.w, run.steps, run.out
    act = _ACT[w["_activations"][0]]
    rows, units = tile.rows, tile.units
    w_t = w["weight_hh"][units].T                                        # (H, Hu)
    cols = units
    inputs = _InputChunks(run, tile, [_Block(cols, 1.0, w["bias_hh"][cols]
                                             if "bias_hh" in w else None)])
    hid = _Hidden(run, tile)
    for t in steps.order:
        invalid = steps.invalid_rows(t, rows)
        (xin,) = inputs.step(t)
        h_new = hid.target(t)
        np.matmul(hid.cur, w_t, out=h_new)
        h_new += xin
        act(h_new)
        hid.advance(t, invalid)
    out["h"][rows, hid.cols] = hid.final()


def _rnn_backward(tape: dict, dy, dstate, steps: _Steps, rows: slice, grads: dict):
    """The reverse-time RNN step into preallocated buffers, as :func:`_lstm_backward`
    (backward of RNN 128x256x128 and 256x32x512: medians 48 and 116 against 51 and 123 ms, 15
    interleaved calls). The GRU step, written the same way, was no faster (its in-place
    passes run over strided gate slices), and stays as it was."""
    w = tape["w"]
    act = w["_activations"][0]
    whh = w["weight_hh"]
    dh = dstate[0][rows].copy()
    dxw = grads["dxw"]
    dh_t, dh_prev, slope = np.empty_like(dh), np.empty_like(dh), np.empty_like(dh)
    for t in reversed(steps.order):
        invalid = steps.invalid_rows(t, rows)
        if invalid is None:
            np.add(dh, dy[t, rows], out=dh_t)
        else:
            np.add(dh, np.where(invalid, 0.0, dy[t, rows]), out=dh_t)
        d = dxw[t, rows]
        # h_t is y[t] (rows past their length have zeros there: their gradient is zeroed)
        np.multiply(dh_t, _act_slope(tape["y"][t, rows], act, slope), out=d)
        np.matmul(d, whh, out=dh_prev)
        if invalid is not None:
            np.copyto(d, 0.0, where=invalid)
            np.copyto(dh_prev, dh_t, where=invalid)
        dh, dh_prev = dh_prev, dh
    grads["dh0"][rows] = dh


def _twostage_forward(run: _Run, tile: _Tile):
    w, steps, out = run.w, run.steps, run.out
    f_name, g_name = w["_activations"]
    f_act, g_act = _ACT[f_name], _ACT[g_name]
    H = w["weight_hh"].shape[0]
    rows = tile.rows
    waa_t, whh_t, wha_t = w["weight_aa"].T, w["weight_hh"].T, w["weight_ha"].T
    b_h = w.get("bias_h")
    inputs = _InputChunks(run, tile, [_Block(slice(0, H))])
    hid = _Hidden(run, tile)
    b = rows.stop - rows.start
    a_buf, rec_h = np.empty((b, H), run.dtype), np.empty((b, H), run.dtype)
    for t in steps.order:
        invalid = steps.invalid_rows(t, rows)
        (xin,) = inputs.step(t)
        h = hid.cur
        a = out["a"][t, rows] if run.tape else a_buf
        np.matmul(h, waa_t, out=a)
        a += xin
        f_act(a)
        h_new = hid.target(t)
        np.matmul(a, wha_t, out=h_new)
        np.matmul(h, whh_t, out=rec_h)
        h_new += rec_h
        if b_h is not None:
            h_new += b_h
        g_act(h_new)
        hid.advance(t, invalid)
    out["h"][rows] = hid.final()


def _twostage_backward(tape: dict, dy, dstate, steps: _Steps, rows: slice, grads: dict):
    w = tape["w"]
    f_name, g_name = w["_activations"]
    H = w["weight_hh"].shape[0]
    w_rec, wha = w["_weight_rec"], w["weight_ha"]
    dh = dstate[0][rows].copy()
    dxw, dhp_all = grads["dxw"], grads["dh_pre"]
    both = np.empty((dh.shape[0], 2 * H), dh.dtype)
    for t in reversed(steps.order):
        invalid = steps.invalid_rows(t, rows)
        dh_t = dh + dy[t, rows] if invalid is None else dh + np.where(invalid, 0.0, dy[t, rows])
        dhp = dhp_all[t, rows]
        np.copyto(dhp, dh_t)
        _act_grad_(dhp, tape["y"][t, rows], g_name)                # h_t is y[t]
        dap = dxw[t, rows]
        np.matmul(dhp, wha, out=dap)
        _act_grad_(dap, tape["a"][t, rows], f_name)
        both[:, :H], both[:, H:] = dap, dhp
        dh_prev = both @ w_rec
        if invalid is not None:
            np.copyto(dap, 0.0, where=invalid)
            np.copyto(dhp, 0.0, where=invalid)
            np.copyto(dh_prev, dh_t, where=invalid)
        dh = dh_prev
    grads["dh0"][rows] = dh


# ----------------------------------------------------------------------------- the backend

def _prepare_weights(problem: Problem, weights: dict[str, Any]) -> dict:
    """The layer's weights as NumPy arrays, plus what backward needs precomputed."""
    w = {k: np.asarray(v) for k, v in weights.items()}
    w["_activations"] = problem.activations
    if problem.cell == "twostage":
        w["_weight_rec"] = np.concatenate([w["weight_aa"], w["weight_hh"]], axis=0)   # (2H, H)
    if "weight_hr" in w:
        w["_weight_hr_t"] = w["weight_hr"].T
    return w


_FORWARD = {"lstm": _lstm_forward, "gru": _gru_forward, "rnn": _rnn_forward,
            "twostage": _twostage_forward}
_BACKWARD = {"lstm": _lstm_backward, "gru": _gru_backward, "rnn": _rnn_backward,
             "twostage": _twostage_backward}


def _tape_shapes(problem: Problem, T: int, B: int) -> dict[str, tuple[int, ...]]:
    H = problem.hidden_size
    return {
        "lstm": {"gates": (T, B, 4 * H), "cprev": (T, B, H), "tanh_c": (T, B, H)},
        # GRU's gates are stored gate-major, (T, 3, B, H): see _gru_forward.
        "gru": {"gates": (T, 3, B, H), "hh_n": (T, B, H)},
        "rnn": {},
        "twostage": {"a": (T, B, H)},
    }[problem.cell]


class NumpyBackend(Backend):
    """Fused recurrence in NumPy: CPU, float32 and float64, every cell and option."""

    name = "numpy"
    priority = 0
    array_kind = "numpy"
    # forward/forward_layer take out= (rnn_gpu.backend_api): y is written there, and the tape
    # refers to it instead of copying h_{t-1} (and RNN's and TwoStageRNN's h_t).
    accepts_out = True

    def unavailable_reason(self) -> str | None:
        return None

    def not_supported_reasons(self, problem: Problem) -> list[str]:
        reasons = []
        if problem.device != "cpu":
            reasons.append(f"the numpy backend runs on the CPU, but the input is on "
                           f"{problem.device} (move it to the CPU or choose a GPU backend)")
        if problem.dtype not in ("float32", "float64"):
            reasons.append(f"the numpy backend computes in float32 and float64, not "
                           f"{problem.dtype}")
        if problem.cell not in _FORWARD:
            reasons.append(f"the numpy backend has no cell {problem.cell!r}")
        return reasons

    def segment_costs(self, problem: Problem) -> SegmentCosts:
        """Variable lengths run in segments over the live rows (rnn_gpu._segments): a step
        costs ~16 rows beyond its rows (its ~20 NumPy calls), and a call about two steps of the
        whole batch (weights scaled and copied, buffers, threads): 1.2-1.6 steps measured at
        T=1 (GRU 256x128 to LSTM 1024x256, this VM), and more segments did not help."""
        return SegmentCosts(_SEGMENT_STEP_ROWS,
                            _SEGMENT_CALL_STEPS * (problem.batch + _SEGMENT_STEP_ROWS))

    def describe_run(self, problem: Problem) -> str:
        tiling = self._describe_tiles(problem)
        # With lengths the layer may call in segments (whether it did depends on the lengths).
        return (f"with lengths, in segments over the live rows where they pay (the whole "
                f"batch: {tiling})" if problem.has_lengths else tiling)

    @staticmethod
    def _describe_tiles(problem: Problem) -> str:
        tiles = _plan(problem, problem.batch, problem.training)
        if len(tiles) == 1:
            return "1 thread, multi-threaded BLAS"
        rows, units = (tiles[0].rows.stop - tiles[0].rows.start,
                       tiles[0].units.stop - tiles[0].units.start)
        if tiles[0].whole_rows:
            return f"{len(tiles)} row tiles of ~{rows} rows, no barrier"
        return f"{len(tiles)} unit tiles of ~{units} units, a barrier per step"

    def forward(self, problem, xw, weights, state, lengths, *, reverse, keep_tape, out=None):
        xw = np.asarray(xw)
        return self._forward(problem, None, None, None, xw, weights, state, lengths,
                             reverse=reverse, keep_tape=keep_tape, y=out)

    def forward_layer(self, problem, x, w_ih, b_ih, weights, state, lengths, *, reverse,
                      keep_tape, out=None):
        """The fused path (DESIGN §4): the tiles project their own rows of x."""
        return self._forward(problem, np.asarray(x), np.asarray(w_ih),
                             None if b_ih is None else np.asarray(b_ih), None, weights, state,
                             lengths, reverse=reverse, keep_tape=keep_tape, y=out)

    def _forward(self, problem, x, w_ih, b_ih, xw, weights, state, lengths, *, reverse,
                 keep_tape, y=None):
        source = x if x is not None else xw
        T, B = source.shape[:2]
        dt = source.dtype
        w = _prepare_weights(problem, weights)
        steps = _Steps(T, lengths, reverse)
        P = problem.output_size
        if y is None:
            y = np.empty((T, B, P), dt)
        elif y.shape != (T, B, P) or y.dtype != dt:
            raise ValueError(f"out: expected a ({T}, {B}, {P}) {dt} array for y, got "
                             f"{y.shape} {y.dtype}")
        out: dict[str, np.ndarray] = {"y": y, "h": np.empty((B, P), dt)}
        if problem.cell == "lstm":
            out["c"] = np.empty((B, problem.hidden_size), dt)
        if lengths is not None:
            out["_hbuf"] = np.empty((2, B, P), dt)
        if keep_tape:
            out.update({k: np.empty(s, dt) for k, s in _tape_shapes(problem, T, B).items()})
        state = tuple(np.asarray(s, dtype=dt) for s in state)
        run = _Run(x, w_ih, b_ih, xw, w, state, steps, out, keep_tape)
        cell_forward = _FORWARD[problem.cell]

        def tile_forward(tile: _Tile) -> None:
            with np.errstate(over="ignore"):        # exp(-z) -> inf is the intended limit
                cell_forward(run, tile)

        _run_tiles(tile_forward, _plan(problem, B, keep_tape))
        final = (out["h"], out["c"]) if problem.cell == "lstm" else (out["h"],)
        tape = None
        if keep_tape:
            data = {k: v for k, v in out.items() if k not in ("h", "c", "_hbuf")}
            # y and h0 by reference, not copied: h_{t-1} is y one step earlier, or h0 at a
            # row's first step (T*B*H per layer and direction less; the layer guards y, x and
            # the initial state against in-place changes until backward)
            data.update(w=w, steps=steps, h0=state[0])
            tape = Tape(self.name, problem, reverse, data)
        return out["y"], final, tape

    def backward(self, tape, dy, dstate):
        problem, data = tape.problem, tape.data
        w, steps = data["w"], data["steps"]
        dy = np.asarray(dy)
        T, B = dy.shape[:2]
        H, P = problem.hidden_size, problem.output_size
        dt = data["y"].dtype
        gates = {"lstm": 4, "gru": 3, "rnn": 1, "twostage": 1}[problem.cell]
        grads: dict[str, np.ndarray] = {"dxw": np.empty((T, B, gates * H), dt),
                                        "dh0": np.empty((B, P), dt)}
        if problem.cell == "lstm":
            grads["dc0"] = np.empty((B, H), dt)
            if "weight_hr" in w:
                grads["dh_out"] = np.empty((T, B, P), dt)
        if problem.cell == "gru":
            grads["drec"] = np.empty((T, B, 3 * H), dt)
        if problem.cell == "twostage":
            grads["dh_pre"] = np.empty((T, B, H), dt)
        dstate = tuple(np.asarray(s, dtype=dt) for s in dstate)
        cell_backward = _BACKWARD[problem.cell]
        _run_tiles(lambda tile: cell_backward(data, dy, dstate, steps, tile.rows, grads),
                   _plan(problem, B, keep_tape=True))
        return grads["dxw"], self._dstate0(problem, grads), self._weight_grads(problem, data,
                                                                                grads)

    @staticmethod
    def _dstate0(problem: Problem, grads: dict) -> tuple:
        return (grads["dh0"], grads["dc0"]) if problem.cell == "lstm" else (grads["dh0"],)

    @staticmethod
    def _weight_grads(problem: Problem, data: dict, grads: dict) -> dict[str, np.ndarray]:
        """The weight gradients: one large GEMM each over all T*B rows."""
        w = data["w"]

        def total(d):
            return column_sums(d.reshape(-1, d.shape[-1]))

        cell, dxw = problem.cell, grads["dxw"]

        def outer_prev(d):
            return _outer_h_before(d, data["y"], data["h0"], data["steps"])

        out: dict[str, np.ndarray] = {}
        if cell == "twostage":
            dhp = grads["dh_pre"]
            out["weight_aa"] = outer_prev(dxw)
            out["weight_ha"] = _outer(dhp, data["a"])
            out["weight_hh"] = outer_prev(dhp)
            if "bias_h" in w:
                out["bias_h"] = total(dhp)
            return out
        drec = grads["drec"] if cell == "gru" else dxw
        out["weight_hh"] = outer_prev(drec)
        if "bias_hh" in w:
            out["bias_hh"] = total(drec)
        if "weight_hr" in w:
            gates = data["gates"]
            H = problem.hidden_size
            m = gates[..., 3 * H:] * data["tanh_c"]          # sigma(o) * tanh(c), before W_hr
            out["weight_hr"] = _outer(grads["dh_out"], m)
        return out


def _outer(d: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``sum_t d[t]^T x[t]`` over every leading index: one GEMM over all T*B rows."""
    return d.reshape(-1, d.shape[-1]).T @ x.reshape(-1, x.shape[-1])


def _outer_h_before(d: np.ndarray, y: np.ndarray, h0: np.ndarray, steps: _Steps) -> np.ndarray:
    """``sum_t d[t]^T h_{t-1}`` without an array of the h_{t-1}: one GEMM over y shifted by a
    step, and one over each row's first step against h0.

    The shifted GEMM pairs each row's first step with y one step earlier: nothing in forward
    order (no step before 0); in reverse, y[T-1 + 1] does not exist and with lengths it is
    y[length], a zero of the padding. So the h0 term only adds."""
    T, B = d.shape[:2]
    if T == 1:
        total = np.zeros((d.shape[-1], y.shape[-1]), d.dtype)
    elif steps.reverse:
        total = _outer(d[:-1], y[1:])
    else:
        total = _outer(d[1:], y[:-1])
    first = steps.first_step()
    d_first = d[int(first[0])] if len(first) == 1 else d[first, np.arange(B)]
    total += d_first.T @ h0
    return total
