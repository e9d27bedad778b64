"""CuPy backend: the fused recurrence as CUDA C++ kernels (``kernels/cuda/*.cu``) loaded with
``cupy.RawModule``, for RNN (tanh, relu), LSTM, GRU and TwoStageRNN in float32, float16 and
bfloat16, with fp32 accumulation and fp32 state; results come back in the input dtype. An LSTM
with ``proj_size`` runs as the LSTM over m with ``W_hh W_hr`` folded, on any path
(``kernels/cuda/projected.py``).

Two paths (DESIGN §5), the same tape layout for both:

``"graph"`` (every cell, forward and backward; large batch)
    Per time step, the recurrent GEMM ``h_{t-1} W_hhᵀ`` through cuBLAS ``gemmEx`` (A and B in the
    compute dtype, C in float32, compute type ``CUBLAS_COMPUTE_32F``, or ``..._FAST_TF32`` for
    float32 when TF32 is allowed; fp16/bf16 use the tensor cores that way), then ONE fused
    pointwise kernel (``recurrent.cu``): gate math, state update, lengths mask, y and tape.
    Backward: the reverse-time pointwise kernel, then ``dh += dgates_t W_hh`` (cuBLAS, beta 1)
    per step; the weight gradients are large GEMMs after the loop (``dW_hh = dgatesᵀ h_prev``
    over all T*B rows, ``db_hh = 1ᵀ dgates``).

    The time loop is captured as a CUDA graph and replayed (``USE_GRAPH``, on by default;
    ``RNN_GPU_CUPY_GRAPH=0`` runs it as plain launches, two per step: one GEMM, one kernel).
    On an H100 (run 5, LSTM fp16) replays beat plain launches on every timed case: 11.9 against
    15.8 ms forward and 36.2 against 55.2 ms training at 512x64x1024, 14.4 against 15.2 ms
    forward at 256x4096x256, where the GEMMs dominate. CuPy's own cuBLAS wrappers
    refuse to run while a stream captures (CuPy >= 11 raises ``NotImplementedError: calling
    cuBLAS API during stream capture is currently unsupported`` from ``cublas.setStream``), so
    with capture on the graph path's GEMMs go through cuBLAS handles of our own, called through
    ctypes on the libcublas CuPy loaded (``kernels/cuda/cublas.py``; cuBLAS itself supports
    stream capture). The time loop is a list of operations; a list seen a second time is
    captured as a CUDA graph and replayed from then on (``kernels/cuda/graphs.py``).

    A replay must serve a new call, whose arrays live elsewhere: the step kernels therefore read
    the call's own arrays (xw, y, the tape, dy, dxw, lengths, bias) through a CALL TABLE in
    device memory, rewritten before each call, and everything the GEMMs touch (state, products,
    a copy of the recurrent weights) lives in a WORKSPACE kept per shape and stream. Every call
    of one shape on one stream then issues the very same operations with the very same
    arguments, and is replayed. (Before the tables, on an H100, each call's fresh buffers made
    every loop new: a call recorded its graph and never replayed it, 36.5 ms against 17.2 ms
    plainly, LSTM fp16 512x64x1024.) The cache key still holds every address and scalar the
    operations use. A capture that fails turns capture off for the process, with one warning,
    and the call runs as plain launches; never a wrong result. ``clear_graphs()`` forgets the
    graphs and workspaces.

``"persistent"`` (forward of every cell; small batch)
    One cooperative kernel (``persistent.cu``) for the whole sequence, ``grid.sync()`` once per
    step (twice for TwoStageRNN), hidden units split across blocks, each block's slice of the
    recurrent weights in shared memory when it fits. No tensor cores: it wins only where the
    per-step product is too small for a GEMM launch to pay off. Training forwards take it too
    (it writes the same tape); the backward takes the graph path unless forced (below).

``"persistent-mma"`` (forward of RNN, LSTM and GRU in float16 and bfloat16; small batch)
    The same cooperative design with the recurrent product on the tensor cores
    (``gated_fwd_persistent_mma``, mma.sync m16n8k16 16x16 tiles, fp32 accumulation; the float32
    instantiation computes the same tiles on the CUDA cores and is only run when forced), the
    block's weight rows always in shared memory, the state also kept in the compute dtype for
    the product. On an H100 (run 5) it was the fastest of the three paths from 8192 rows x
    units up to 2**25 multiply-adds a step (B=8 H=1024, B=16 H=512, B=64 H=256: 2.6-3.8 ms,
    1.1-1.6x cuDNN in bf16, 0.2-0.6x in fp16) and took 20.2 ms at 512x64x1024, with 8-way
    shared-memory bank conflicts on every fragment load. With the rows padded
    (``MMA_SMEM_PAD``) and the copy of h asynchronous, run 6 (H200) timed 9.3 ms there in fp16
    (cuDNN 4.7, the graph path 19.8) and 9.4 in bf16 (cuDNN 11.8: 1.26x), so it now serves up
    to 2**28. TwoStageRNN takes the plain persistent kernel; a block slice that does not fit in
    shared memory falls back to it with a warning.

Backward ``"persistent-mma"`` (RNN, LSTM, GRU in float16 and bfloat16; small batch)
    The reverse-time loop as one cooperative kernel (``gated_bwd_persistent_mma``): each
    block's columns of W_hh in shared memory for all steps, per step the block's part of the
    gate math's backward, one ``grid.sync()``, then ``dh += d_rec W_hh`` for its units on the
    tensor cores, the recurrent gradients streamed through shared memory in ``cp.async``
    chunks, instead of the graph path's GEMM and pointwise launch per step. Run 6 (H200): a
    training step 1.2-1.7x faster than with the graph backward at B=8 H=1024, B=16 H=512 and
    B=64 H=256, but slower at B=64 H=1024 (~28 against ~22 ms of backward), so
    ``choose_backward_path`` takes it within the tensor-core forward's bounds up to
    ``BWD_MMA_MAX_STEP_MACS`` (2**25) multiply-adds a step. Where the block's columns do not
    fit in shared memory it falls back to the graph path with a warning.

Heuristic (``choose_path``): persistent-mma for float16 and bfloat16 RNN, LSTM and GRU when
``B * H >= MMA_MIN_BATCH_UNITS`` (8192), ``B <= MMA_MAX_BATCH`` (64) and the per-step
multiply-adds ``B * n_mat * H * H <= MMA_MAX_STEP_MACS`` (2**28); else persistent when
``B <= PERSISTENT_MAX_BATCH`` (16) and ``B * n_mat * H * H <= PERSISTENT_MAX_STEP_MACS``
(2**24, e.g. LSTM H=512 B=16; n_mat = gates, 3 for TwoStageRNN); else graph. The bounds come
from runs 5 and 6's timings (see the constants). Why: DESIGN §5 measured one
``grid.sync()`` over 132 blocks at ~1.2 µs, while a step of the graph path costs a GEMM launch
plus a pointwise launch (~5-10 µs of fixed cost even inside a graph); the persistent kernel's
CUDA-core dot products (~10-30 TFLOP/s at best) fall behind cuBLAS's tensor cores once a step
is more than ~20 M multiply-adds. Set
``FORCE_PATH = "graph" | "persistent" | "persistent-mma"`` to override. When the persistent
grid cannot be co-resident (occupancy × SMs), it falls back to the graph path with a warning.
``MMA_ROW_GROUPS`` (1 until a card times more) splits the batch's rows of both tensor-core
kernels into groups, each served by its own blocks, and ``MMA_WARP_TILES`` (off until timed)
has the tensor-core forward's warps compute 32 x 32 outputs (see the constants).

Everything runs on the caller's current CuPy stream, on the input's device; the kernels are
compiled lazily by NVRTC, once per device, dtype and source file (and cached on disk by CuPy).
The backend never asks CuPy to compute on bfloat16 arrays (CuPy needs ml_dtypes for that type
at all): conversions are kernels of ``recurrent.cu`` and GEMMs are direct ``gemmEx`` calls.

The algorithms below talk to the GPU only through ``CupyDevice`` (``kernels/cuda/device.py``:
allocate, launch, GEMM, copy), so that tests/test_cupy_emulated.py can run them on the CPU
against an emulation that executes the real kernel source compiled as C++ and interprets the
cuBLAS calls with NumPy. The rest of the machinery lives beside the sources in
``kernels/cuda/``: compiling them (``sources.py``), cuBLAS through ctypes (``cublas.py``), the
operations (``ops.py``) and graph capture with its workspaces (``graphs.py``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from rnn_gpu import _segments, _warnings
from rnn_gpu.backend_api import Backend, Problem, SegmentCosts, Tape
from rnn_gpu.kernels.cuda import projected
from rnn_gpu.kernels.cuda.blocks import (
    bias_grad,
    contiguous,
    copied,
    copy_into,
    filled,
    from_f32,
    gemm,
    i64,
    outer_grad,
    pointwise,
    stacked,
    time_of,
    to_f32,
)
from rnn_gpu.kernels.cuda.cublas import CUBLAS_MAX_DIM
from rnn_gpu.kernels.cuda.device import (
    MMA_TILE,
    PERSISTENT_THREADS,
    CupyDevice,
    check_chunk_bytes,
    check_row_groups,
    round_up,
)
from rnn_gpu.kernels.cuda.graphs import clear_graphs, workspace
from rnn_gpu.kernels.cuda.ops import Launch
from rnn_gpu.kernels.cuda.sources import ACT_IDS, CELL_IDS

__all__ = ["BACKWARD_PATHS", "BWD_MMA_MAX_STEP_MACS", "FORCE_BACKWARD_PATH", "FORCE_PATH",
           "MMA_BWD_CHUNK_BYTES", "MMA_MAX_BATCH", "MMA_MAX_STEP_MACS", "MMA_MIN_BATCH_UNITS",
           "MMA_ROW_GROUPS", "MMA_WARP_TILES", "PERSISTENT_MAX_BATCH", "PERSISTENT_MAX_STEP_MACS",
           "USE_GRAPH", "VARIANTS", "CupyBackend", "choose_backward_path", "choose_path",
           "clear_graphs", "run_backward", "run_forward"]

# ---------------------------------------------------------------------- switches (see above)

FORCE_PATH: str | None = None          # one of PATHS, or None (the heuristic)
# Capture repeated time loops as CUDA graphs (see above); RNN_GPU_CUPY_GRAPH=0 turns it off.
USE_GRAPH = os.environ.get("RNN_GPU_CUPY_GRAPH", "1").strip() not in ("", "0")
# choose_path's bounds, from run 5's sweep (H100, LSTM forward, persistent against replayed
# graph): persistent won at B=1 (H 256, 1024: 1.4 / 2.0 ms against 5.9 / 7.0), B=8 H=256 (1.8
# against 5.6) and B=16 H=512 (5.0 against 8.8; 2**24 multiply-adds a step), tied at B=8
# H=1024 (2**25) and lost at B=32 H=512 and B=64 H=256 (10.4 / 8.7 against 6.3 / 5.7).
PERSISTENT_MAX_BATCH = 16
PERSISTENT_MAX_STEP_MACS = 1 << 24
# The tensor-core persistent kernel (fp16, bf16), run 5 (H100, LSTM forward, fp16 / bf16): it
# beat both other paths at B=8 H=1024 (3.6 / 3.8 ms against the graph's 5.8 / 6.2), B=16 H=512
# (2.6 / 2.6 against the plain persistent kernel's 4.8) and B=64 H=256 (3.2 / 3.1 against the
# graph's 5.7 / 5.5), and lost at B=64 H=1024 (20.2 against 12.2; 2**28 multiply-adds a step).
# Its tiles have 16 rows and 16 units, so below 8192 rows x units most of each is padding: the
# plain kernel keeps B=1 and B=8 H=256 (1.4-2.0 ms there), where the mma one was not timed.
# Run 6 (H200, after the padded shared memory and the cp.async copy of h) moved the top bound:
# at B=64 H=1024 (2**28 multiply-adds a step) the kernel took 9.3 / 9.4 ms (fp16 / bf16)
# against the graph path's 19.8 / 19.5 and cuDNN's 4.7 / 11.8.
MMA_MIN_BATCH_UNITS = 8192
MMA_MAX_BATCH = 64
MMA_MAX_STEP_MACS = 1 << 28
# The tensor-core persistent backward, run 6 (H200, LSTM training with the tensor-core forward
# on both sides, fp16 / bf16): the persistent backward made the step 10.6 / 10.8 ms against the
# graph backward's 12.3 / 12.1 at B=8 H=1024, 6.8 / 6.9 against 11.5 / 11.5 at B=16 H=512 and
# 7.6 / 7.6 against 12.4 / 12.2 at B=64 H=256 (2**24 multiply-adds a step), but at B=64 H=1024
# (2**28) it took ~28 ms against the graph backward's ~22 (train less forward). So it is chosen
# up to 2**25, inside the forward's own bounds.
BWD_MMA_MAX_STEP_MACS = 1 << 25
# Row groups of the tensor-core kernels, forward and backward (``BlockSlice`` in
# persistent_mma.cu): the batch's rows split into this many groups of whole 16-row tiles, each
# served by its own group of blocks, so that a block reads only its group's rows of h (and of
# d_rec) from L2 each step. By count at LSTM fp16 512x64x1024 two groups halve those reads (run
# 7, H200: 2.9 of the forward's 12.9 us step issued the copies of h, 28 of the backward's 50
# us waited for d_rec), and fill the backward's 16-wide tiles with 16 units a block instead of
# 8. One group is the kernels as timed in run 7: kept until a card times two (the bench
# variants "persistent-mma-rows2" and "persistent-mma-train-rows2", .ci/phase_clocks.py
# --variant=rows=2). Where the groups cannot run (shared memory, SMs), fewer are planned.
MMA_ROW_GROUPS = 1
# Warp tiles in the tensor-core forward (``warp_tile_add`` in persistent_mma.cu): each warp
# computes 2 x 2 of the 16 x 16 tiles over a slice of K, so that each fragment it reads from
# shared memory serves two products: half the shared-memory reads of the per-tile loop (512
# KiB a block and step at 512x64x1024 fp16, ~2.1 us at 128 bytes a cycle). Off until a card
# times it (the "-wt" bench variants, .ci/phase_clocks.py --variant=tiles=warp).
MMA_WARP_TILES = False
# The tensor-core backward's chunk of d_rec, bytes a row (a multiple of 512): each chunk is one
# round trip to L2 and two barriers, 16 a step at H = 1024 fp16 with 512 (run 7: 27.8 of the
# 50.5 us step waited for them). With two row groups 1024 fits the shared memory (~201 KiB):
# 8 round trips. 512 as timed, until a card times more (the "-wide" bench variant,
# .ci/phase_clocks.py --variant=chunk=1024); wider chunks that do not fit are planned at 512.
MMA_BWD_CHUNK_BYTES = 512

PATHS = ("graph", "persistent", "persistent-mma")
# The backward's path (choose_backward_path, bounds above), or forced: "graph" |
# "persistent-mma" (`rnn-gpu bench --backend cupy:persistent-mma-train` forces both kernels).
FORCE_BACKWARD_PATH: str | None = None
BACKWARD_PATHS = ("graph", "persistent-mma")
# What `rnn-gpu bench --backend cupy:NAME` runs: NAME -> the settings above it sets (the
# others stay as they are).
_MMA_TRAIN = {"FORCE_PATH": "persistent-mma", "FORCE_BACKWARD_PATH": "persistent-mma"}
# Variable lengths as segments over the live rows (rnn_gpu._segments), each call taking the
# path and plan its live rows call for: the bench variant "segments", off by default until a
# card times it (.ci/gpu owed-lengths), as on the Triton backend. Rows come in at most 8 sizes
# per batch (captured graphs and persistent plans are keyed on the batch).
SEGMENTS = False
SEGMENT_CALL_STEPS = 2                 # a call ~2 steps of the batch: a guess, as on triton
SEGMENT_MIN_ROWS = 64

VARIANTS = {"graph": {"FORCE_PATH": "graph", "USE_GRAPH": False},
            "graph-captured": {"FORCE_PATH": "graph", "USE_GRAPH": True},
            "persistent": {"FORCE_PATH": "persistent"},
            "persistent-mma": {"FORCE_PATH": "persistent-mma"},
            "persistent-mma-train": _MMA_TRAIN,
            "persistent-mma-rows2": {"FORCE_PATH": "persistent-mma", "MMA_ROW_GROUPS": 2},
            "persistent-mma-train-rows2": {**_MMA_TRAIN, "MMA_ROW_GROUPS": 2},
            "persistent-mma-wt": {"FORCE_PATH": "persistent-mma", "MMA_WARP_TILES": True},
            "persistent-mma-train-rows2-wt": {**_MMA_TRAIN, "MMA_ROW_GROUPS": 2,
                                              "MMA_WARP_TILES": True},
            "persistent-mma-train-rows2-wt-wide": {**_MMA_TRAIN, "MMA_ROW_GROUPS": 2,
                                                   "MMA_WARP_TILES": True,
                                                   "MMA_BWD_CHUNK_BYTES": 1024},
            "segments": {"SEGMENTS": True}}
DTYPES = ("float32", "float16", "bfloat16")
CELLS = ("rnn", "lstm", "gru", "twostage")
PRIORITY = 90                          # below triton (100), above numpy (0)
INSTALL_HINT = "pip install 'rnn-gpu[cupy-cuda13]'"

GATES = {"rnn": 1, "lstm": 4, "gru": 3}
TAPE_GATES = {"rnn": 1, "lstm": 4, "gru": 4}


# ---------------------------------------------------------------------- the backend

class CupyBackend(Backend):
    """Fused recurrence in CUDA C++ through CuPy (see the module docstring)."""

    name = "cupy"
    priority = PRIORITY
    array_kind = "cupy"

    def unavailable_reason(self) -> str | None:
        return _unavailable_reason()

    def segment_costs(self, problem: Problem) -> SegmentCosts | None:
        """Segments only inside the ``segments`` variant (see :data:`SEGMENTS`)."""
        if not SEGMENTS:
            return None
        quantum = _segments.few_row_counts(problem.batch, minimum=SEGMENT_MIN_ROWS)
        return SegmentCosts(0, SEGMENT_CALL_STEPS * problem.batch, quantum)

    def describe_run(self, problem: Problem) -> str:
        """What ran for ``problem``, last in this process under the current settings: each
        direction's path and its persistent kernel's plan (blocks, units, row groups, warp
        tiles, chunk width), and where it fell back, from what. Before any run, what the
        settings ask for."""
        costs = self.segment_costs(problem) if problem.has_lengths else None
        if costs is not None:
            return (f"segments over the live rows (rows in multiples of {costs.row_quantum}), "
                    f"each on the path its rows call for")
        return _ran_for(problem) or self._asked(problem)

    def _asked(self, problem: Problem) -> str:
        path = choose_path(problem.cell, problem.batch, problem.hidden_size, problem.dtype)
        if path == "persistent-mma" and problem.cell != "twostage":
            kind = "persistent on tensor cores"
            if MMA_ROW_GROUPS != 1:
                kind += f" in {MMA_ROW_GROUPS} row groups (fewer where they do not fit)"
            if MMA_WARP_TILES:
                kind += " with 32 x 32 warp tiles"
            fallback = "plain persistent, then graph, where it cannot run"
        elif path.startswith("persistent"):
            kind, fallback = "persistent", "graph path where the grid does not fit"
        else:
            captured = ", captured as a CUDA graph and replayed" if USE_GRAPH else ""
            return f"graph path: a cuBLAS GEMM and a fused pointwise kernel per step{captured}"
        if problem.training:
            backward = choose_backward_path(problem.cell, problem.batch, problem.hidden_size,
                                            problem.dtype)
            wide = (f" in {MMA_BWD_CHUNK_BYTES}-byte chunks" if MMA_BWD_CHUNK_BYTES != 512
                    else "")
            backward = (f"persistent backward on tensor cores{wide} (graph where it cannot run)"
                        if backward == "persistent-mma" else "graph backward")
            return f"{kind} forward ({fallback}), {backward}"
        return f"{kind} ({fallback})"

    def variants(self) -> tuple[str, ...]:
        """The paths, for benchmarks to compare side by side (``rnn-gpu bench --backend
        cupy:persistent``): see :data:`VARIANTS`."""
        return tuple(VARIANTS)

    @contextlib.contextmanager
    def variant(self, name: str) -> Iterator[None]:
        """Calls inside run with the named variant's settings (:data:`VARIANTS`: the path, and
        where the variant says the backward's path, capture, the tensor-core kernels' row
        groups and warp tiles); every setting is restored on exit. Process-wide while
        entered."""
        if name not in VARIANTS:
            raise ValueError(f"variant: expected one of {tuple(VARIANTS)}, got {name!r}")
        module = globals()
        saved = {key: module[key] for key in VARIANTS[name]}
        module.update(VARIANTS[name])
        try:
            yield
        finally:
            module.update(saved)

    def not_supported_reasons(self, problem: Problem) -> list[str]:
        reasons = []
        if not problem.device.startswith("cuda"):
            reasons.append(f"the cupy backend runs on CUDA, but the input is on "
                           f"{problem.device} (move it with .to('cuda') or cupy.asarray)")
        if problem.dtype not in DTYPES:
            reasons.append(f"the cupy backend computes in {', '.join(DTYPES)}, not "
                           f"{problem.dtype} (use the numpy backend for float64)")
        elif problem.dtype == "bfloat16":
            reasons.extend(_bfloat16_reasons(problem.device))
        if problem.cell not in CELLS:
            reasons.append(f"the cupy backend has no cell {problem.cell!r}")
        else:
            allowed = {"rnn": ("tanh", "relu"), "twostage": tuple(ACT_IDS)}.get(problem.cell, ())
            bad = [a for a in problem.activations if a not in allowed]
            if bad:
                reasons.append(f"the cupy backend has no activation {bad[0]!r} for "
                               f"{problem.cell}")
        reasons.extend(_cublas_dimension_reasons(problem))
        return reasons

    def forward(self, problem: Problem, xw, weights, state, lengths, *, reverse: bool,
                keep_tape: bool):
        import cupy

        with cupy.cuda.Device(xw.device.id):
            dev = CupyDevice(xw.device.id, xw.dtype, capture=USE_GRAPH)
            y, final, ktape = run_forward(dev, problem, xw, weights, state, lengths,
                                          reverse=reverse, keep_tape=keep_tape)
        tape = None
        if keep_tape:     # "path": which forward path ran (kept after backward, for tests)
            tape = Tape(self.name, problem, reverse, {"kernel_tape": ktape, "path": ktape.path})
        return y, final, tape

    def backward(self, tape: Tape, dy, dstate):
        import cupy

        ktape = tape.data.pop("kernel_tape", None)
        if ktape is None:
            raise RuntimeError("tape: this cupy tape was already used by backward()")
        with cupy.cuda.Device(dy.device.id):
            dev = CupyDevice(dy.device.id, dy.dtype, capture=USE_GRAPH)
            return run_backward(dev, ktape, dy, dstate)


# ---------------------------------------------------------------------- availability

def _once(fn):
    """``fn()`` computed on the first call only, under a lock (a probe that initialises CUDA or
    loads a library must not run twice when threads ask at once)."""
    lock = threading.Lock()
    result: list[Any] = []

    def cached():
        with lock:
            if not result:
                result.append(fn())
            return result[0]

    return cached


@_once
def _unavailable_reason() -> str | None:
    """Computed once per process: whether CuPy imports, sees a device and loads cuBLAS."""
    return _probe()


def _probe() -> str | None:
    if importlib.util.find_spec("cupy") is None:
        return f"cupy is not installed ({INSTALL_HINT})"
    try:
        import cupy
    except Exception as exc:               # a broken install must not break the registry
        return f"cupy failed to import ({type(exc).__name__}: {exc}); reinstall it ({INSTALL_HINT})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:               # CUDARuntimeError: no driver, driver too old, ...
        return f"no CUDA device ({type(exc).__name__}: {exc})"
    if count < 1:
        return "no CUDA device"
    try:
        from cupy_backends.cuda.libs import cublas

        cublas.gemmEx                      # noqa: B018 (loads libcublas, lazily loaded by CuPy)
    except Exception as exc:
        return (f"CuPy cannot load cuBLAS ({type(exc).__name__}: {exc}); install the CUDA "
                f"libraries for CuPy ({INSTALL_HINT})")
    return None


def _cublas_dimension_reasons(problem: Problem) -> list[str]:
    """Why the problem's cuBLAS GEMMs would need a dimension past gemmEx's 32-bit ints
    (:data:`CUBLAS_MAX_DIM`), or nothing. Of their dimensions and leading dimensions only
    these grow with the problem: B (every per-step GEMM's rows), T*B (the weight and bias
    gradients sum over all steps and rows: k, and the bias GEMM's ones vector is its ldb;
    with proj_size also the rows of ``m W_hrᵀ`` and ``dy W_hr``, forward and backward), and
    gates*H, H, P (past 2**31 only with weights of 2**60 elements, listed for completeness).
    The kernels' own arguments are 64-bit (``i64``), and their grids stay far below 2**31
    blocks for any array that fits on a card."""
    T, B, H, P = problem.seq_len, problem.batch, problem.hidden_size, problem.proj_size
    n_mat = {"twostage": 2}.get(problem.cell, GATES.get(problem.cell, 1))
    extents = [(B, f"batch {B} (the rows of every step's GEMM); split the batch into "
                   f"several calls")]
    if problem.training or P:
        what = ("the weight gradients' GEMMs sum over all of them" if problem.training
                else "the projection m W_hrᵀ runs over all of them")
        extents.append((T * B, f"{T} steps x batch {B} = {T * B} rows ({what}); split the "
                               f"batch or the sequence into several calls"))
    extents.append((n_mat * H, f"{n_mat} x hidden size {H} gate columns"))
    return [f"cuBLAS takes 32-bit dimensions (at most {CUBLAS_MAX_DIM}), and this needs "
            f"{what}" for n, what in extents if n > CUBLAS_MAX_DIM]


def _bfloat16_reasons(device: str) -> list[str]:
    reasons = []
    if importlib.util.find_spec("ml_dtypes") is None:
        reasons.append("bfloat16 arrays need ml_dtypes with CuPy (CuPy >= 14 represents "
                       "bfloat16 through it): pip install ml_dtypes")
    try:
        import cupy

        major = int(cupy.__version__.split(".")[0])
    except Exception:                      # not installed: unavailable_reason says so
        return reasons
    if major < 14:
        reasons.append(f"bfloat16 needs CuPy >= 14, this is CuPy {cupy.__version__}")
    if device.startswith("cuda"):
        try:
            cc = int(cupy.cuda.Device(int(device.split(":")[1])).compute_capability)
        except Exception as exc:
            reasons.append(f"could not read the compute capability of {device} "
                           f"({type(exc).__name__}: {exc})")
        else:
            if cc < 80:
                reasons.append(f"bfloat16 needs compute capability 8.0, {device} has "
                               f"{cc // 10}.{cc % 10} (use float16 or float32)")
    return reasons


def choose_backward_path(cell: str, batch: int, hidden: int, dtype: str = "float32") -> str:
    """``"persistent-mma"`` (the tensor-core persistent backward) for float16 and bfloat16 RNN,
    LSTM and GRU where the tensor-core forward's bounds hold and a step is at most
    ``BWD_MMA_MAX_STEP_MACS`` multiply-adds (run 6's timings, above), else ``"graph"``;
    TwoStageRNN's backward is always the graph path. ``FORCE_BACKWARD_PATH`` overrides."""
    if FORCE_BACKWARD_PATH is not None:
        if FORCE_BACKWARD_PATH not in BACKWARD_PATHS:
            raise ValueError(f"rnn_gpu.backends.cupy.FORCE_BACKWARD_PATH: expected one of "
                             f"{BACKWARD_PATHS} or None, got {FORCE_BACKWARD_PATH!r}")
        return "graph" if cell == "twostage" else FORCE_BACKWARD_PATH
    if _tensor_core_shape(cell, batch, hidden, dtype, BWD_MMA_MAX_STEP_MACS):
        return "persistent-mma"
    return "graph"


def _tensor_core_shape(cell: str, batch: int, hidden: int, dtype: str, max_step_macs: int) -> bool:
    """Whether the tensor-core persistent kernels serve this call: float16 or bfloat16 RNN,
    LSTM or GRU, ``B * H >= MMA_MIN_BATCH_UNITS``, ``B <= MMA_MAX_BATCH`` and at most
    ``max_step_macs`` recurrent multiply-adds a step."""
    return (dtype in ("float16", "bfloat16") and cell != "twostage"
            and batch * hidden >= MMA_MIN_BATCH_UNITS and batch <= MMA_MAX_BATCH
            and batch * GATES[cell] * hidden * hidden <= max_step_macs)


def choose_path(cell: str, batch: int, hidden: int, dtype: str = "float32") -> str:
    """``"persistent-mma"``, ``"persistent"`` or ``"graph"`` for one call (see the module
    docstring)."""
    if FORCE_PATH is not None:
        if FORCE_PATH not in PATHS:
            raise ValueError(f"rnn_gpu.backends.cupy.FORCE_PATH: expected one of {PATHS} or "
                             f"None, got {FORCE_PATH!r}")
        return FORCE_PATH
    if _tensor_core_shape(cell, batch, hidden, dtype, MMA_MAX_STEP_MACS):
        return "persistent-mma"
    n_mat = 3 if cell == "twostage" else GATES[cell]
    step_macs = batch * n_mat * hidden * hidden
    if batch <= PERSISTENT_MAX_BATCH and step_macs <= PERSISTENT_MAX_STEP_MACS:
        return "persistent"
    return "graph"


# ---------------------------------------------------------------------- what ran

# The last run of each problem in this process, under each combination of the settings above:
# the path it took and its persistent kernel's plan. describe_run (the bench's "config"
# column) reports these, so that a row names what ran (fewer row groups, no warp tiles,
# 512-byte chunks, another path) and not the settings it asked for: a variant that falls back
# is timed as the fallback, and its row should say so.
_ran: dict[tuple, str] = {}
_ran_lock = threading.Lock()
_PATH_WORDS = {"graph": "graph path", "persistent": "persistent",
               "persistent-mma": "persistent on tensor cores"}


def _settings() -> tuple:
    return (FORCE_PATH, FORCE_BACKWARD_PATH, USE_GRAPH, MMA_ROW_GROUPS, MMA_WARP_TILES,
            MMA_BWD_CHUNK_BYTES)


def _note_run(dev, direction: str, cell: str, batch: int, hidden: int, projected: bool,
              asked: str, path: str) -> None:
    """Records what one forward or backward ran: ``path`` (and ``asked``, the path it was
    given, where it fell back), and for a persistent path the plan of the kernel it launched
    last (the one that ran: an earlier plan that fell back launched nothing)."""
    words = _PATH_WORDS[path]
    if path != "graph":
        words += f" ({dev.plans[-1].describe(dev.itemsize)})"
    if path != asked:
        words += f" ({_PATH_WORDS[asked]} could not run here)"
    with _ran_lock:
        _ran[direction, cell, batch, hidden, dev.dtype_name, projected, _settings()] = words


def _ran_for(problem: Problem) -> str | None:
    """What :func:`_note_run` recorded for ``problem`` under the current settings (forward,
    and with ``problem.training`` backward), or None where it has not run."""
    key = (problem.cell, problem.batch, problem.hidden_size, problem.dtype,
           bool(problem.proj_size), _settings())
    with _ran_lock:
        forward, backward = _ran.get(("forward", *key)), _ran.get(("backward", *key))
    if not problem.training:
        return forward
    return None if forward is None or backward is None else (f"forward {forward}; "
                                                             f"backward {backward}")


# ---------------------------------------------------------------------- tapes

@dataclass
class GatedTape:
    """What backward reads (the Triton backend's layout): ``gates`` (T, B, TG*H) fp32, the
    activated gates (LSTM i, f, g, o; GRU r, z, n, W_hn h + b_hn; RNN h_t); ``ctape`` (T, B, H)
    fp32 the LSTM cell state after each step; ``hprev`` (T, B, H) h_{t-1} in the compute dtype;
    ``c0`` the LSTM's initial cell state in fp32."""

    cell: str
    act: int
    reverse: bool
    w_hh: Any
    has_bias: bool
    lengths: Any
    c0: Any
    gates: Any
    ctape: Any
    hprev: Any
    path: str
    projection: projected.ProjectionTape | None = None   # LSTM with proj_size (w_hh: W_hh W_hr)


@dataclass
class TwoStageTape:
    """``atape`` a_t and ``htape`` h_t (before the mask), both (T, B, H) fp32; ``hprev``
    h_{t-1} in the compute dtype."""

    acts: tuple[int, int]
    reverse: bool
    w_aa: Any
    w_ha: Any
    w_hh: Any
    has_bias: bool
    lengths: Any
    atape: Any
    htape: Any
    hprev: Any
    path: str


# ---------------------------------------------------------------------- forward

def run_forward(dev, problem: Problem, xw, weights, state, lengths, *, reverse: bool,
                keep_tape: bool):
    """One layer and direction (rnn_gpu.backend_api's contract); returns y, final state and
    the kernel tape (None without keep_tape)."""
    xw = contiguous(dev, xw)
    w = {k: contiguous(dev, v) for k, v in weights.items()}
    state = tuple(contiguous(dev, s) for s in state)
    lens = dev.lengths(lengths)
    T, B, _ = xw.shape
    H = problem.hidden_size
    path = choose_path(problem.cell, B, H, problem.dtype)
    if problem.cell == "twostage":
        return _twostage_forward(dev, problem, xw, w, state[0], lens, path, reverse, keep_tape)
    if problem.proj_size:
        return _projected_forward(dev, problem, xw, w, state, lens, path, reverse, keep_tape)
    return _gated_forward(dev, problem, xw, w, state, lens, path, reverse, keep_tape)


def _projected_forward(dev, problem, xw, w, state, lens, path, reverse, keep_tape):
    """LSTM with proj_size: the LSTM over m with W_hh W_hr folded, on the same paths as any
    LSTM (kernels/cuda/projected.py)."""
    B, H = xw.shape[1], problem.hidden_size
    h0, c0 = state
    xw, folded = projected.fold_initial_state(dev, xw, h0, w["weight_hh"], lens, reverse)
    inner = {k: v for k, v in w.items() if k != "weight_hr"}
    inner["weight_hh"] = projected.folded_weight(dev, w["weight_hh"], w["weight_hr"])
    m0 = filled(dev, B * H, 0.0, "m_0 = 0").reshape(B, H)
    m, (m_final, c_final), tape = _gated_forward(dev, problem, xw, inner, (m0, c0), lens, path,
                                                 reverse, keep_tape)
    y, h_final = projected.project_outputs(dev, m, m_final, h0, w["weight_hr"], lens)
    if tape is not None:
        tape.projection = projected.ProjectionTape(w["weight_hh"], w["weight_hr"], h0, m,
                                                   m_final, lens, reverse, folded)
    return y, (h_final, c_final), tape


def _gated_forward(dev, problem, xw, w, state, lens, path, reverse, keep_tape):
    cell = problem.cell
    T, B, _ = xw.shape
    H = problem.hidden_size
    lstm = cell == "lstm"
    act = ACT_IDS[problem.activations[0]] if cell == "rnn" else 0
    y = dev.empty((T, B, H), dev.dtype, "the output y")
    gates = ctape = hprev = None
    if keep_tape:
        gates = dev.empty((T, B, TAPE_GATES[cell] * H), np.float32, "the gates tape")
        ctape = dev.empty((T, B, H), np.float32, "the cell-state tape") if lstm else None
        hprev = dev.empty((T, B, H), dev.dtype, "the h_{t-1} tape")
    c0 = to_f32(dev, state[1], "the fp32 cell state c0") if lstm else None
    outs = (y, gates, ctape, hprev)
    final, asked = None, path
    if path == "persistent-mma":
        final = _gated_persistent(dev, cell, act, xw, w, state[0], c0, lens, outs, reverse,
                                  mma=True)
        path = "persistent-mma" if final is not None else "persistent"
    if path == "persistent":
        final = _gated_persistent(dev, cell, act, xw, w, state[0], c0, lens, outs, reverse)
    if final is None:
        path = "graph"
        final = _gated_graph(dev, cell, act, xw, w, state[0], c0, lens, outs, reverse)
    _note_run(dev, "forward", problem.cell, B, H, bool(problem.proj_size), asked, path)
    tape = None
    if keep_tape:
        tape = GatedTape(cell, act, reverse, w["weight_hh"], "bias_hh" in w, lens, c0, gates,
                         ctape, hprev, path)
    return y, final, tape


GRADIENTS_OF_STATE0 = ("the gradient of h0", "the gradient of c0")


def _final_state(dev, h32, c32=None, what=("the final h", "the final c")) -> tuple:
    """The final state (or its gradient) in the compute dtype: ``(h,)`` or ``(h, c)``."""
    final = (from_f32(dev, h32, what[0]),)
    return final if c32 is None else final + (from_f32(dev, c32, what[1]),)


def _gated_graph(dev, cell, act, xw, w, h0, c0, lens, outs, reverse):
    """Path (a): per step one GEMM into ``hh`` and one pointwise kernel; returns the final
    state. The operations touch only the workspace and scalars (the call's arrays go through
    the call table), so a captured loop is replayed for every call of its shape."""
    T, B, GH = xw.shape
    H = GH // GATES[cell]
    y, gates, ctape, hprev = outs
    buffers = {"h": ((B, H), np.float32, "the fp32 state h"),
               "hc": ((B, H), dev.dtype, "the state h in the compute dtype"),
               "hh": ((B, GH), np.float32, "the recurrent product h W_hh^T"),
               "w_hh": ((GH, H), dev.dtype, "the graph path's copy of W_hh")}
    if c0 is not None:
        buffers["c"] = ((B, H), np.float32, "the fp32 cell state c")
    signature = ("gated_fwd", cell, act, T, B, H, reverse)
    with workspace(dev, signature, "GatedFwdCall", buffers) as ws:
        to_f32(dev, h0, "the fp32 state h", out=ws["h"])
        copy_into(dev, ws["hc"], h0)
        copy_into(dev, ws["w_hh"], w["weight_hh"])
        if c0 is not None:
            copy_into(dev, ws["c"], c0)
        ws.bind(dev, xw=xw, bias=w.get("bias_hh"), lengths=lens, y=y, gates=gates,
                ctape=ctape, hprev=hprev)
        c = ws.buffers.get("c")
        product = gemm(dev, B, GH, H, dev.ptr(ws["hc"]), dev.ptr(ws["w_hh"]),
                        dev.ptr(ws["hh"]), trans_b=True)
        ops = []
        for s in range(T):
            ops.append(product)
            ops.append(pointwise(dev, "gated_fwd_step", CELL_IDS[cell], act, n=B * H,
                                  args=(ws.table, ws["hh"], ws["h"], c, ws["hc"],
                                        i64(time_of(s, T, reverse)), i64(B), i64(H))))
        dev.run(ops, graph=True, workspace=ws)
        return _final_state(dev, ws["h"], c)


def _persistent_launch(dev, base: str, template_args: tuple, n_mat: int, H: int, args_of,
                       batch: int | None = None, backward: bool = False):
    """Plans and launches a persistent kernel; returns False (after a warning) when it
    cannot run, so that the caller takes the next path. ``args_of(plan)`` gives the args;
    ``batch`` plans the tensor-core kernel (:meth:`CupyDevice.persistent_mma_plan`, or with
    ``backward`` :meth:`CupyDevice.persistent_mma_bwd_plan`)."""
    name, fn = dev.kernel("persistent" if batch is None else "persistent_mma", base,
                          *template_args)
    if batch is not None:       # the settings checked here, so that the error names them
        check_row_groups(MMA_ROW_GROUPS, "rnn_gpu.backends.cupy.MMA_ROW_GROUPS")
        if not isinstance(MMA_WARP_TILES, bool):
            raise ValueError(f"rnn_gpu.backends.cupy.MMA_WARP_TILES: expected True or False, "
                             f"got {MMA_WARP_TILES!r}")
    if backward:
        check_chunk_bytes(MMA_BWD_CHUNK_BYTES, "rnn_gpu.backends.cupy.MMA_BWD_CHUNK_BYTES")
    try:
        if batch is None:
            plan = dev.persistent_plan(fn, n_mat, H)
        elif backward:
            plan = dev.persistent_mma_bwd_plan(fn, n_mat, H, batch, MMA_ROW_GROUPS,
                                               MMA_BWD_CHUNK_BYTES)
        else:
            plan = dev.persistent_mma_plan(fn, n_mat, H, batch, MMA_ROW_GROUPS,
                                           MMA_WARP_TILES)
    except Exception as exc:      # the occupancy query or the shared-memory opt-in failed
        raise RuntimeError(f"rnn_gpu cupy backend: planning the persistent kernel {name} "
                           f"(H={H}) failed: {type(exc).__name__}: {exc}") from exc
    if isinstance(plan, str):
        then = ("the CUDA-core persistent kernel" if batch is not None and not backward
                else "the graph path")
        _warnings.warn(f"rnn_gpu cupy backend: the persistent kernel {name} cannot run here "
                       f"({plan}); taking {then}", RuntimeWarning)
        return False
    dev.run([Launch(name, fn, plan.blocks, PERSISTENT_THREADS, args_of(plan),
                     shared_mem=plan.shared_mem, cooperative=True)])
    dev.plans.append(plan)
    return True


def _gated_persistent(dev, cell, act, xw, w, h0, c0, lens, outs, reverse, *, mma=False):
    """Path (b), or with ``mma`` path "persistent-mma"; returns the final state, or None when
    the kernel cannot run here."""
    T, B, GH = xw.shape
    H = GH // GATES[cell]
    c = None if c0 is None else copied(dev, c0, "the fp32 cell state c")
    hbuf = dev.empty((2, B, H), np.float32, "the fp32 state buffers")
    to_f32(dev, h0, "the fp32 state h", out=hbuf)          # slot 0 = h0
    head = (xw, w["weight_hh"], w.get("bias_hh"), lens, hbuf)
    shape = (i64(T), i64(B), i64(H))
    if mma:
        Hp = round_up(H, MMA_TILE)

        def args_of(plan):
            # h in the compute dtype for the products, zero-padded to whole tiles and to the
            # plan's row groups (both slots)
            Bp = plan.row_groups * plan.rows
            hmat = filled(dev, 2 * Bp * Hp, 0.0, "the padded state in the compute dtype")
            dev.copy_2d(dev.ptr(hmat), Hp * dev.itemsize, dev.ptr(h0), H * dev.itemsize,
                        H * dev.itemsize, B)
            return (*head, hmat, c, *outs, *shape, i64(plan.units), i64(int(reverse)),
                    i64(Bp), i64(Hp), i64(round_up(GATES[cell] * plan.units, MMA_TILE)),
                    i64(plan.rows), i64(plan.warp_split))
    else:
        def args_of(plan):
            return (*head, c, *outs, *shape, i64(plan.units), i64(int(reverse)),
                    i64(int(plan.use_smem)))

    base = "gated_fwd_persistent_mma" if mma else "gated_fwd_persistent"
    if not _persistent_launch(dev, base, (CELL_IDS[cell], act), GATES[cell], H, args_of,
                              batch=B if mma else None):
        return None
    return _final_state(dev, hbuf[T % 2], c)


def _twostage_forward(dev, problem, xw, w, h0, lens, path, reverse, keep_tape):
    T, B, H = xw.shape
    acts = (ACT_IDS[problem.activations[0]], ACT_IDS[problem.activations[1]])
    y = dev.empty((T, B, H), dev.dtype, "the output y")
    atape = htape = hprev = None
    if keep_tape:
        atape = dev.empty((T, B, H), np.float32, "the a_t tape")
        htape = dev.empty((T, B, H), np.float32, "the h_t tape")
        hprev = dev.empty((T, B, H), dev.dtype, "the h_{t-1} tape")
    outs = (y, atape, htape, hprev)
    final = None
    if path.startswith("persistent"):         # no tensor-core kernel for the two stages
        path = "persistent"
    asked = path
    if path == "persistent":
        final = _twostage_persistent(dev, acts, xw, w, h0, lens, outs, reverse)
    if final is None:
        path = "graph"
        final = _twostage_graph(dev, acts, xw, w, h0, lens, outs, reverse)
    _note_run(dev, "forward", problem.cell, B, H, bool(problem.proj_size), asked, path)
    tape = None
    if keep_tape:
        tape = TwoStageTape(acts, reverse, w["weight_aa"], w["weight_ha"], w["weight_hh"],
                            "bias_h" in w, lens, atape, htape, hprev, path)
    return y, final, tape


def _twostage_graph(dev, acts, xw, w, h0, lens, outs, reverse):
    """Per step: pa = h [W_aa; W_hh]ᵀ, a = f(xw + pa[:, :H]), pb = a W_haᵀ, h = g(pb + pa[:, H:]
    + b_h): two GEMMs and two pointwise kernels; workspace and call table as
    :func:`_gated_graph`."""
    T, B, H = xw.shape
    y, atape, htape, hprev = outs
    buffers = {"h": ((B, H), np.float32, "the fp32 state h"),
               "hc": ((B, H), dev.dtype, "the state h in the compute dtype"),
               "a_c": ((B, H), dev.dtype, "a_t in the compute dtype"),
               "pa": ((B, 2 * H), np.float32, "h [W_aa; W_hh]^T"),
               "pb": ((B, H), np.float32, "a W_ha^T"),
               "w_cat": ((2 * H, H), dev.dtype, "[W_aa; W_hh]"),
               "w_ha": ((H, H), dev.dtype, "the graph path's copy of W_ha")}
    signature = ("twostage_fwd", *acts, T, B, H, reverse)
    with workspace(dev, signature, "TwoStageFwdCall", buffers) as ws:
        to_f32(dev, h0, "the fp32 state h", out=ws["h"])
        copy_into(dev, ws["hc"], h0)
        stacked(dev, [w["weight_aa"], w["weight_hh"]], "[W_aa; W_hh]", out=ws["w_cat"])
        copy_into(dev, ws["w_ha"], w["weight_ha"])
        ws.bind(dev, xw=xw, bias=w.get("bias_h"), lengths=lens, y=y, atape=atape,
                htape=htape, hprev=hprev)
        first = gemm(dev, B, 2 * H, H, dev.ptr(ws["hc"]), dev.ptr(ws["w_cat"]),
                      dev.ptr(ws["pa"]), trans_b=True)
        second = gemm(dev, B, H, H, dev.ptr(ws["a_c"]), dev.ptr(ws["w_ha"]),
                       dev.ptr(ws["pb"]), trans_b=True)
        ops = []
        for s in range(T):
            t = i64(time_of(s, T, reverse))
            ops.append(first)
            ops.append(pointwise(dev, "twostage_fwd_a", acts[0], n=B * H,
                                  args=(ws.table, ws["pa"], ws["a_c"], t, i64(B), i64(H))))
            ops.append(second)
            ops.append(pointwise(dev, "twostage_fwd_b", acts[1], n=B * H,
                                  args=(ws.table, ws["pa"], ws["pb"], ws["h"], ws["hc"], t,
                                        i64(B), i64(H))))
        dev.run(ops, graph=True, workspace=ws)
        return _final_state(dev, ws["h"])


def _twostage_persistent(dev, acts, xw, w, h0, lens, outs, reverse):
    T, B, H = xw.shape
    y, atape, htape, hprev = outs
    w_all = stacked(dev, [w["weight_aa"], w["weight_ha"], w["weight_hh"]],
                     "[W_aa; W_ha; W_hh]")
    hbuf = dev.empty((2, B, H), np.float32, "the fp32 state buffers")
    to_f32(dev, h0, "the fp32 state h", out=hbuf)
    abuf = dev.empty((B, H), np.float32, "the fp32 a_t buffer")

    def args_of(plan):
        return (xw, w_all, w.get("bias_h"), lens, hbuf, abuf, y, atape, htape, hprev, i64(T),
                i64(B), i64(H), i64(plan.units), i64(int(reverse)),
                i64(int(plan.use_smem)))

    if not _persistent_launch(dev, "twostage_fwd_persistent", acts, 3, H, args_of):
        return None
    return _final_state(dev, hbuf[T % 2])


# ---------------------------------------------------------------------- backward

def run_backward(dev, ktape, dy, dstate):
    """Returns ``(dxw, dstate0, dweights)`` (rnn_gpu.backend_api's contract)."""
    dy = contiguous(dev, dy)
    dstate = tuple(contiguous(dev, d) for d in dstate)
    if isinstance(ktape, TwoStageTape):       # the graph path only
        T, B, H = dy.shape
        _note_run(dev, "backward", "twostage", B, H, False, "graph", "graph")
        return _twostage_backward(dev, ktape, dy, dstate[0])
    if ktape.projection is not None:
        return _projected_backward(dev, ktape, dy, dstate)
    return _gated_backward(dev, ktape, dy, dstate)


def _projected_backward(dev, tape: GatedTape, dy, dstate):
    """The LSTM over m's backward between the projection's maps (kernels/cuda/projected.py);
    the gradient the LSTM gives its m_0 is dropped: m_0 is the constant 0."""
    p = tape.projection
    dm, dm_final = projected.gradients_in(dev, p, dy, dstate[0])
    dxw, (_, dc0), grads = _gated_backward(dev, tape, dm, (dm_final, dstate[1]))
    dh0, dw_hh, dw_hr = projected.gradients_out(dev, p, dy, dstate[0], dxw, grads["weight_hh"])
    grads.update(weight_hh=dw_hh, weight_hr=dw_hr)
    return dxw, (dh0, dc0), grads


def _gated_backward(dev, tape: GatedTape, dy, dstate):
    T, B, H = dy.shape
    cell = tape.cell
    GH = GATES[cell] * H
    dxw = dev.empty((T, B, GH), dev.dtype, "the gradient of xw")
    dhh = dev.empty((T, B, GH), dev.dtype, "the gradient of h W_hh^T") if cell == "gru" else dxw
    d0, path = None, "graph"
    asked = choose_backward_path(cell, B, H, dev.dtype_name)
    if asked == "persistent-mma":
        d0 = _gated_backward_persistent(dev, tape, dy, dstate, dxw, dhh)
        path = "persistent-mma" if d0 is not None else path
    if d0 is None:
        d0 = _gated_backward_graph(dev, tape, dy, dstate, dxw, dhh)
    _note_run(dev, "backward", cell, B, H, tape.projection is not None, asked, path)
    grads = {"weight_hh": outer_grad(dev, dhh, tape.hprev, "the gradient of W_hh")}
    if tape.has_bias:
        ones = filled(dev, T * B, 1.0, "a ones vector")
        grads["bias_hh"] = bias_grad(dev, dhh, ones, "the gradient of b_hh")
    return dxw, d0, grads


def _gated_backward_persistent(dev, tape: GatedTape, dy, dstate, dxw, dhh):
    """Backward path "persistent-mma" (``gated_bwd_persistent_mma``): the whole reverse-time
    loop in one cooperative launch; returns the gradients of the initial state, or None when
    the kernel cannot run here (after a warning; the graph path runs instead)."""
    T, B, H = dy.shape
    cell = tape.cell
    GHp = round_up(GATES[cell] * H, MMA_TILE)
    dh = to_f32(dev, dstate[0], "the fp32 gradient dh")
    dc = to_f32(dev, dstate[1], "the fp32 gradient dc") if cell == "lstm" else None

    def args_of(plan):
        # the recurrent gradients in the compute dtype, zero-padded to whole tiles and to the
        # plan's row groups (both slots)
        Bp, Np = plan.row_groups * plan.rows, round_up(plan.units, MMA_TILE)
        drec = filled(dev, 2 * Bp * GHp, 0.0, "the padded recurrent gradients")
        return (dy, tape.w_hh, tape.lengths, tape.gates, tape.ctape, tape.c0, tape.hprev, dh,
                dc, drec, dxw, dhh if cell == "gru" else None, i64(T), i64(B), i64(H),
                i64(plan.units), i64(int(tape.reverse)), i64(Bp), i64(GHp), i64(Np),
                i64(plan.k_split), i64(plan.rows), i64(plan.chunk))

    if not _persistent_launch(dev, "gated_bwd_persistent_mma", (CELL_IDS[cell], tape.act),
                              GATES[cell], H, args_of, batch=B, backward=True):
        return None
    return _final_state(dev, dh, dc, GRADIENTS_OF_STATE0)


def _gated_backward_graph(dev, tape: GatedTape, dy, dstate, dxw, dhh):
    """Backward path "graph": per step the pointwise kernel, then ``dh += d_rec W_hh``
    (cuBLAS); returns the gradients of the initial state."""
    T, B, H = dy.shape
    cell, lstm = tape.cell, tape.cell == "lstm"
    GH = GATES[cell] * H
    buffers = {"dh": ((B, H), np.float32, "the fp32 gradient dh"),
               "drec": ((B, GH), dev.dtype, "a step's gradient of h W_hh^T"),
               "w_hh": ((GH, H), dev.dtype, "the graph path's copy of W_hh")}
    if lstm:
        buffers["dc"] = ((B, H), np.float32, "the fp32 gradient dc")
    signature = ("gated_bwd", cell, tape.act, T, B, H, tape.reverse)
    with workspace(dev, signature, "GatedBwdCall", buffers) as ws:
        to_f32(dev, dstate[0], "the fp32 gradient dh", out=ws["dh"])
        if lstm:
            to_f32(dev, dstate[1], "the fp32 gradient dc", out=ws["dc"])
        copy_into(dev, ws["w_hh"], tape.w_hh)
        ws.bind(dev, dy=dy, gates=tape.gates, ctape=tape.ctape, c0=tape.c0, hprev=tape.hprev,
                lengths=tape.lengths, dxw=dxw, dhh=dhh)
        dc = ws.buffers.get("dc")
        recurrent = gemm(dev, B, H, GH, dev.ptr(ws["drec"]), dev.ptr(ws["w_hh"]),
                          dev.ptr(ws["dh"]), beta=1)
        ops = []
        for s in reversed(range(T)):
            t = time_of(s, T, tape.reverse)
            t_prev = time_of(s - 1, T, tape.reverse) if s > 0 else -1
            ops.append(pointwise(dev, "gated_bwd_step", CELL_IDS[cell], tape.act, n=B * H,
                                  args=(ws.table, ws["dh"], dc, ws["drec"], i64(t),
                                        i64(t_prev), i64(B), i64(H))))
            ops.append(recurrent)
        dev.run(ops, graph=True, workspace=ws)
        return _final_state(dev, ws["dh"], dc, GRADIENTS_OF_STATE0)


def _twostage_backward(dev, tape: TwoStageTape, dy, dh_T):
    T, B, H = dy.shape
    f, g = tape.acts
    dxw = dev.empty((T, B, H), dev.dtype, "the gradient of xw")
    dph = dev.empty((T, B, H), dev.dtype, "the gradient of the second stage")
    buffers = {"dh": ((B, H), np.float32, "the fp32 gradient dh"),
               "da": ((B, H), np.float32, "dph W_ha"),
               "dph_t": ((B, H), dev.dtype, "a step's gradient of the second stage"),
               "dx_t": ((B, H), dev.dtype, "a step's gradient of xw"),
               "w": ((3 * H, H), dev.dtype, "the graph path's copy of [W_ha; W_aa; W_hh]")}
    signature = ("twostage_bwd", f, g, T, B, H, tape.reverse)
    with workspace(dev, signature, "TwoStageBwdCall", buffers) as ws:
        to_f32(dev, dh_T, "the fp32 gradient dh", out=ws["dh"])
        stacked(dev, [tape.w_ha, tape.w_aa, tape.w_hh], "[W_ha; W_aa; W_hh]", out=ws["w"])
        ws.bind(dev, dy=dy, atape=tape.atape, htape=tape.htape, lengths=tape.lengths, dph=dph,
                dxw=dxw)
        w_ha, w_aa, w_hh = (dev.ptr(ws["w"]) + i * H * H * dev.itemsize for i in range(3))
        dh, da, dph_t, dx_t = (dev.ptr(ws[k]) for k in ("dh", "da", "dph_t", "dx_t"))
        gemms = (gemm(dev, B, H, H, dph_t, w_ha, da),
                 gemm(dev, B, H, H, dx_t, w_aa, dh, beta=1),
                 gemm(dev, B, H, H, dph_t, w_hh, dh, beta=1))
        ops = []
        for s in reversed(range(T)):
            t = i64(time_of(s, T, tape.reverse))
            ops.append(pointwise(dev, "twostage_bwd_a", g, n=B * H,
                                  args=(ws.table, ws["dh"], ws["dph_t"], t, i64(B), i64(H))))
            ops.append(gemms[0])
            ops.append(pointwise(dev, "twostage_bwd_b", f, n=B * H,
                                  args=(ws.table, ws["da"], ws["dx_t"], t, i64(B), i64(H))))
            ops.extend(gemms[1:])
        dev.run(ops, graph=True, workspace=ws)
        d0 = _final_state(dev, ws["dh"], what=GRADIENTS_OF_STATE0)
    a_c = from_f32(dev, tape.atape, "the a_t tape in the compute dtype")
    grads = {"weight_aa": outer_grad(dev, dxw, tape.hprev, "the gradient of W_aa"),
             "weight_ha": outer_grad(dev, dph, a_c, "the gradient of W_ha"),
             "weight_hh": outer_grad(dev, dph, tape.hprev, "the gradient of W_hh")}
    if tape.has_bias:
        ones = filled(dev, T * B, 1.0, "a ones vector")
        grads["bias_h"] = bias_grad(dev, dph, ones, "the gradient of b_h")
    return dxw, d0, grads
