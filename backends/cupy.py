"""CuPy backend: the fused recurrence as CUDA C++ kernels (``kernels/cuda/*.cu``) loaded with
``cupy.RawModule``, for RNN (tanh, relu), LSTM, GRU and TwoStageRNN in float32, float16 and
bfloat16, with fp32 accumulation and fp32 state; results come back in the input dtype.

Two paths (DESIGN §5), the same tape layout for both:

``"graph"`` (every cell, forward and backward; large batch)
    Per time step, the recurrent GEMM ``h_{t-1} W_hhᵀ`` through cuBLAS ``gemmEx`` (A and B in the
    compute dtype, C in float32, compute type ``CUBLAS_COMPUTE_32F``, or ``..._FAST_TF32`` for
    float32 when TF32 is allowed; fp16/bf16 use the tensor cores that way), then ONE fused
    pointwise kernel (``recurrent.cu``): gate math, state update, lengths mask, y and tape.
    Backward: the reverse-time pointwise kernel, then ``dh += dgates_t W_hh`` (cuBLAS, beta 1)
    per step; the weight gradients are large GEMMs after the loop (``dW_hh = dgatesᵀ h_prev``
    over all T*B rows, ``db_hh = 1ᵀ dgates``).

    By default the steps run as plain launches, two per step (one GEMM, one kernel). CUDA-graph
    capture of the time loop is OFF by default (``USE_GRAPH = False``; the environment variable
    ``RNN_GPU_CUPY_GRAPH=1`` turns it on) until a card has timed it. CuPy's own cuBLAS wrappers
    refuse to run while a stream captures (CuPy >= 11 raises ``NotImplementedError: calling
    cuBLAS API during stream capture is currently unsupported`` from ``cublas.setStream``), so
    with capture on the graph path's GEMMs go through a cuBLAS handle of this module's own,
    called through ctypes on the libcublas CuPy loaded (``_RawCublas``; cuBLAS itself supports
    stream capture). The time loop is a list of operations; a list seen a second time is
    captured as a CUDA graph and replayed from then on (``GRAPH_CACHE_SIZE`` lists remembered).

    A replay must serve a new call, whose arrays live elsewhere: the step kernels therefore read
    the call's own arrays (xw, y, the tape, dy, dxw, lengths, bias) through a CALL TABLE in
    device memory, rewritten before each call, and everything the GEMMs touch (state, products,
    a copy of the recurrent weights) lives in a WORKSPACE kept per shape and stream
    (``_Workspace``). Every call of one shape on one stream then issues the very same operations
    with the very same arguments, and is replayed. (Before the tables, on an H100, each call's
    fresh buffers made every loop new: a call recorded its graph and never replayed it, 36.5 ms
    against 17.2 ms plainly, LSTM fp16 512x64x1024.) The cache key still holds every address
    and scalar the operations use. A capture that fails turns capture off for the process, with
    one warning, and the call runs as plain launches; never a wrong result. ``clear_graphs()``
    forgets the graphs and workspaces.

``"persistent"`` (forward of every cell; small batch)
    One cooperative kernel (``persistent.cu``) for the whole sequence, ``grid.sync()`` once per
    step (twice for TwoStageRNN), hidden units split across blocks, each block's slice of the
    recurrent weights in shared memory when it fits. No tensor cores: it wins only where the
    per-step product is too small for a GEMM launch to pay off. Training forwards take it too
    (it writes the same tape); backward always takes the graph path.

``"persistent-mma"`` (forward of RNN, LSTM and GRU; only when asked for: ``FORCE_PATH``)
    The same cooperative design with the recurrent product on the tensor cores
    (``gated_fwd_persistent_mma``, nvcuda::wmma 16x16x16 tiles, fp32 accumulation; the float32
    instantiation computes the same tiles on the CUDA cores), the block's weight rows always in
    shared memory, the state also kept in the compute dtype for the product. Written for item 5
    of the issue (beat cuDNN's fp16 persistent kernel at 512x64x1024, where the CUDA-core
    kernel above is 23x slower); **not yet run on a GPU**, so the heuristic never picks it.
    TwoStageRNN takes the plain persistent kernel; a block slice that does not fit in shared
    memory falls back to it with a warning.

Heuristic (``choose_path``): persistent when ``B <= PERSISTENT_MAX_BATCH`` (16) and the
per-step multiply-adds ``B * n_mat * H * H <= PERSISTENT_MAX_STEP_MACS`` (2**23, e.g. LSTM
H=512 B=8; n_mat = gates, 3 for TwoStageRNN), else graph. Why: DESIGN §5 measured one
``grid.sync()`` over 132 blocks at ~1.2 µs, while a step of the graph path costs a GEMM launch
plus a pointwise launch (~5-10 µs of fixed cost even inside a graph); the persistent kernel's
CUDA-core dot products (~10-30 TFLOP/s at best) fall behind cuBLAS's tensor cores once a step
is more than ~10 M multiply-adds. The thresholds are a first estimate, to be measured; set
``FORCE_PATH = "graph" | "persistent" | "persistent-mma"`` to override. When the persistent
grid cannot be co-resident (occupancy × SMs), it falls back to the graph path with a warning.

Everything runs on the caller's current CuPy stream, on the input's device; the kernels are
compiled lazily by NVRTC, once per device, dtype and source file (and cached on disk by CuPy).
The backend never asks CuPy to compute on bfloat16 arrays (CuPy needs ml_dtypes for that type
at all): conversions are kernels of ``recurrent.cu`` and GEMMs are direct ``gemmEx`` calls.

The algorithms below talk to the GPU only through ``_CupyDevice`` (allocate, launch, GEMM,
copy), so that tests/test_cupy_backend.py can run them on the CPU against an emulation that
executes the real kernel source compiled as C++ and interprets the cuBLAS calls with NumPy.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.resources
import importlib.util
import math
import os
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from rnn_gpu import _config
from rnn_gpu.backend_api import Backend, Problem, Tape

# ---------------------------------------------------------------------- switches (see above)

FORCE_PATH: str | None = None          # one of PATHS, or None (the heuristic)
# Capture repeated time loops as CUDA graphs (see above); RNN_GPU_CUPY_GRAPH=1 turns it on.
USE_GRAPH = os.environ.get("RNN_GPU_CUPY_GRAPH", "") not in ("", "0")
GRAPH_CACHE_SIZE = 16                  # time loops remembered (seen once, or captured)
# Synchronize after every launch and GEMM outside captures, so that an asynchronous fault is
# reported with the name of the kernel that caused it (slow; for debugging and the GPU tests).
CHECK_LAUNCHES = os.environ.get("RNN_GPU_CUPY_CHECK_LAUNCHES", "") not in ("", "0")
PERSISTENT_MAX_BATCH = 16
PERSISTENT_MAX_STEP_MACS = 1 << 23

PATHS = ("graph", "persistent", "persistent-mma")
# What `rnn-gpu bench --backend cupy:NAME` runs: NAME -> (FORCE_PATH, USE_GRAPH; None: as set).
VARIANTS = {"graph": ("graph", False), "graph-captured": ("graph", True),
            "persistent": ("persistent", None), "persistent-mma": ("persistent-mma", None)}
# Field order of the call tables in recurrent.cu (the per-call addresses the graph path's step
# kernels read from device memory; tests/test_cupy_backend.py compares the two).
CALL_TABLES = {
    "GatedFwdCall": ("xw", "bias", "lengths", "y", "gates", "ctape", "hprev"),
    "GatedBwdCall": ("dy", "gates", "ctape", "c0", "hprev", "lengths", "dxw", "dhh"),
    "TwoStageFwdCall": ("xw", "bias", "lengths", "y", "atape", "htape", "hprev"),
    "TwoStageBwdCall": ("dy", "atape", "htape", "lengths", "dph", "dxw"),
}
MMA_TILE = 16                          # wmma's m = n = k for half and bfloat16
DTYPES = ("float32", "float16", "bfloat16")
CELLS = ("rnn", "lstm", "gru", "twostage")
PRIORITY = 90                          # below triton (100), above numpy (0)
INSTALL_HINT = "pip install 'rnn-gpu[cupy-cuda13]'"

THREADS = 256                          # block size of the pointwise kernels
PERSISTENT_THREADS = 256               # = PERSISTENT_THREADS in persistent.cu
COMPILE_OPTIONS: tuple[str, ...] = ()  # CuPy >= 14 compiles RawModules as C++17 by default

# Template arguments, as in common.cuh.
CELL_IDS = {"rnn": 0, "lstm": 1, "gru": 2}
ACT_IDS = {"tanh": 0, "sigmoid": 1, "relu": 2}
GATES = {"rnn": 1, "lstm": 4, "gru": 3}
TAPE_GATES = {"rnn": 1, "lstm": 4, "gru": 4}
GATED_VARIANTS = ((0, 0), (0, 2), (1, 0), (2, 0))      # (cell, activation) instantiated
CTYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}

# cuBLAS / CUDA enums (cublas_api.h, library_types.h).
CUDA_DATA_TYPES = {"float32": 0, "float16": 2, "bfloat16": 14}
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 77
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_POINTER_MODE_HOST = 0

# gemmEx reads alpha and beta through host pointers (float32 for the 32F compute types).
_ONE = np.ones(1, np.float32)
_ZERO = np.zeros(1, np.float32)


# ---------------------------------------------------------------------- the backend

class CupyBackend(Backend):
    """Fused recurrence in CUDA C++ through CuPy (see the module docstring)."""

    name = "cupy"
    priority = PRIORITY
    array_kind = "cupy"

    def unavailable_reason(self) -> str | None:
        return _unavailable_reason()

    def describe_run(self, problem: Problem) -> str:
        path = choose_path(problem.cell, problem.batch, problem.hidden_size)
        if path == "persistent-mma" and problem.cell != "twostage":
            kind = "persistent on tensor cores"
            fallback = "plain persistent, then graph, where it cannot run"
        elif path.startswith("persistent"):
            kind, fallback = "persistent", "graph path where the grid does not fit"
        else:
            captured = ", captured as a CUDA graph and replayed" if USE_GRAPH else ""
            return f"graph path: a cuBLAS GEMM and a fused pointwise kernel per step{captured}"
        if problem.training:
            return f"{kind} forward ({fallback}), graph backward"
        return f"{kind} ({fallback})"

    def variants(self) -> tuple[str, ...]:
        """The paths, for benchmarks to compare side by side (``rnn-gpu bench --backend
        cupy:persistent``): see :data:`VARIANTS`."""
        return tuple(VARIANTS)

    @contextlib.contextmanager
    def variant(self, name: str) -> Iterator[None]:
        """Calls inside run the named path (``FORCE_PATH``), with capture on or off where the
        variant says; both settings are restored on exit. Process-wide while entered."""
        global FORCE_PATH, USE_GRAPH
        if name not in VARIANTS:
            raise ValueError(f"variant: expected one of {tuple(VARIANTS)}, got {name!r}")
        path, capture = VARIANTS[name]
        saved = FORCE_PATH, USE_GRAPH
        FORCE_PATH = path
        USE_GRAPH = USE_GRAPH if capture is None else capture
        try:
            yield
        finally:
            FORCE_PATH, USE_GRAPH = saved

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
        if problem.proj_size:
            reasons.append("the cupy backend has no LSTM projection (proj_size > 0); use the "
                           "numpy backend")
        if problem.cell not in CELLS:
            reasons.append(f"the cupy backend has no cell {problem.cell!r}")
        else:
            allowed = {"rnn": ("tanh", "relu"), "twostage": tuple(ACT_IDS)}.get(problem.cell, ())
            bad = [a for a in problem.activations if a not in allowed]
            if bad:
                reasons.append(f"the cupy backend has no activation {bad[0]!r} for "
                               f"{problem.cell}")
        return reasons

    def forward(self, problem: Problem, xw, weights, state, lengths, *, reverse: bool,
                keep_tape: bool):
        import cupy

        with cupy.cuda.Device(xw.device.id):
            dev = _CupyDevice(xw.device.id, xw.dtype)
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
            dev = _CupyDevice(dy.device.id, dy.dtype)
            return run_backward(dev, tape.problem, ktape, dy, dstate)


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


# ---------------------------------------------------------------------- kernel sources

def name_expressions(module: str, dtype: str) -> list[str]:
    """The template instantiations the backend asks NVRTC for, per source file and dtype
    (tests/test_cupy_backend.py has nvcc instantiate exactly these for sm_80 and sm_90)."""
    ct = CTYPES[dtype]
    if module == "recurrent":
        names = [f"{k}<{ct}, {c}, {a}>" for k in ("gated_fwd_step", "gated_bwd_step")
                 for c, a in GATED_VARIANTS]
        names += [f"{k}<{ct}, {a}>" for k in ("twostage_fwd_a", "twostage_fwd_b",
                                              "twostage_bwd_a", "twostage_bwd_b")
                  for a in range(3)]
        return names + [f"{k}<{ct}>" for k in ("cast_to_f32", "cast_from_f32", "fill_value")]
    if module == "persistent_mma":
        return [f"gated_fwd_persistent_mma<{ct}, {c}, {a}>" for c, a in GATED_VARIANTS]
    if module == "persistent":
        names = [f"gated_fwd_persistent<{ct}, {c}, {a}>" for c, a in GATED_VARIANTS]
        return names + [f"twostage_fwd_persistent<{ct}, {f}, {g}>" for f in range(3)
                        for g in range(3)]
    raise ValueError(f"unknown kernel source {module!r}")


def kernel_name(base: str, ctype: str, *template_args: int) -> str:
    return f"{base}<{', '.join([ctype, *map(str, template_args)])}>"


def kernel_source(module: str) -> str:
    """``kernels/cuda/{module}.cu`` with its ``#include "..."`` lines replaced by the files
    (NVRTC then needs no include path into the package)."""
    root = importlib.resources.files("rnn_gpu.kernels").joinpath("cuda")

    def inlined(name: str) -> str:     # headers include headers; their guards drop repeats
        return re.sub(r'^#include "([\w.]+)"[ \t]*$', lambda m: inlined(m.group(1)),
                      root.joinpath(name).read_text(encoding="utf-8"), flags=re.MULTILINE)

    return inlined(f"{module}.cu")


_modules: dict[tuple[int, str, str], dict[str, Any]] = {}
_modules_lock = threading.Lock()


def _compiled(index: int, module: str, dtype: str) -> dict[str, Any]:
    """name expression -> ``cupy.RawKernel`` for one device, source file and dtype."""
    key = (index, module, dtype)
    with _modules_lock:
        kernels = _modules.get(key)
        if kernels is None:
            kernels = _modules[key] = _compile(module, dtype)
        return kernels


def _compile(module: str, dtype: str) -> dict[str, Any]:
    """Compiles (NVRTC) and loads every kernel of one source file for one dtype. Any failure
    says which file, dtype and kernel, with NVRTC's log when there is one."""
    import cupy

    names = name_expressions(module, dtype)
    what = f"kernels/cuda/{module}.cu for {dtype}"
    current = "(the module)"
    try:
        raw = cupy.RawModule(code=kernel_source(module), options=COMPILE_OPTIONS,
                             name_expressions=names)
        kernels = {}
        for current in names:            # CuPy compiles on the first get_function
            kernels[current] = raw.get_function(current)
        return kernels
    except cupy.cuda.compiler.CompileException as exc:
        raise RuntimeError(f"cupy backend: NVRTC failed to compile {what} (kernels "
                           f"{', '.join(names)}); NVRTC's log:\n{exc.get_message()}") from exc
    except Exception as exc:             # NVRTC missing, a driver that cannot load the code...
        raise RuntimeError(f"cupy backend: could not compile or load {what}, at kernel "
                           f"{current} ({type(exc).__name__}: {exc})") from exc


# ---------------------------------------------------------------------- operations

def _arg_key(dev, a) -> Any:
    if a is None:
        return 0
    if isinstance(a, np.generic):
        return (a.dtype.char, a.item())
    return ("p", dev.ptr(a))


def _check_arg(a) -> None:
    # Kernel parameters are `long long`, `float` or pointers (see recurrent.cu): a Python int
    # or a numpy.int32 would reach the kernel with the wrong size, so only these are accepted.
    if a is None or isinstance(a, (np.int64, np.float32)):
        return
    if not isinstance(a, (np.generic, int, float)) and hasattr(a, "shape"):
        return
    raise TypeError(f"kernel argument {a!r} ({type(a).__name__}): expected an array, None, "
                    "numpy.int64 or numpy.float32")


@dataclass(frozen=True, eq=False)
class _Launch:
    """One kernel launch: ``grid`` blocks of ``block`` threads on the current stream."""

    name: str
    fn: Any                       # cupy.RawKernel (the emulation: the name)
    grid: int
    block: int
    args: tuple
    shared_mem: int = 0
    cooperative: bool = False

    def __post_init__(self):
        for a in self.args:
            _check_arg(a)

    def key(self, dev) -> tuple:
        return ("k", self.name, self.grid, self.block, self.shared_mem, self.cooperative,
                tuple(_arg_key(dev, a) for a in self.args))

    def run(self, dev) -> None:
        dev.launch(self)

    def describe(self) -> str:
        smem = f", {self.shared_mem} B of dynamic shared memory" if self.shared_mem else ""
        coop = ", cooperative" if self.cooperative else ""
        return f"kernel {self.name} (grid {self.grid} x block {self.block}{smem}{coop})"


@dataclass(frozen=True)
class _Gemm:
    """Row-major ``C (m×n) = op(A) (m×k) · op(B) (k×n) + beta·C``, op(X) = Xᵀ when trans_x.
    a, b, c are device addresses of contiguous row-major matrices (slices of larger arrays)."""

    m: int
    n: int
    k: int
    a: int
    trans_a: bool
    b: int
    trans_b: bool
    c: int
    ab_type: int                  # cudaDataType of A and B
    c_type: int
    beta: int                     # 0 or 1
    compute: int                  # cublasComputeType_t

    def cublas_args(self) -> tuple:
        """gemmEx's arguments after the handle. cuBLAS is column-major, where a row-major X is
        Xᵀ: C = op(A)·op(B) is computed as Cᵀ = op(B)ᵀ·op(A)ᵀ, i.e. with A and B swapped."""
        transa = CUBLAS_OP_T if self.trans_b else CUBLAS_OP_N
        transb = CUBLAS_OP_T if self.trans_a else CUBLAS_OP_N
        lda = self.k if self.trans_b else self.n
        ldb = self.m if self.trans_a else self.k
        beta = _ONE if self.beta else _ZERO
        return (transa, transb, self.n, self.m, self.k, _ONE.ctypes.data, self.b, self.ab_type,
                lda, self.a, self.ab_type, ldb, beta.ctypes.data, self.c, self.c_type, self.n,
                self.compute, CUBLAS_GEMM_DEFAULT)

    def key(self, dev) -> tuple:
        return ("g", self)

    def run(self, dev) -> None:
        dev.gemm(self)

    def describe(self) -> str:
        ab = _DATA_TYPE_NAMES.get(self.ab_type, self.ab_type)
        c = _DATA_TYPE_NAMES.get(self.c_type, self.c_type)
        return (f"cuBLAS gemmEx C[{self.m}x{self.n}] ({c}) = {'Aᵀ' if self.trans_a else 'A'}"
                f" {'Bᵀ' if self.trans_b else 'B'} ({ab}, k={self.k}) + {self.beta} C, compute "
                f"type {self.compute}")


_DATA_TYPE_NAMES = {v: k for k, v in CUDA_DATA_TYPES.items()}


def _run_op(dev, op) -> None:
    """Runs one operation; any failure comes back as a RuntimeError that names the operation
    (the kernel and its launch shape, or the GEMM's shape and types) and carries the
    underlying error's type and message. With ``CHECK_LAUNCHES`` (outside captures) the
    stream is synchronized after each operation, so that an asynchronous fault (an illegal
    address, say) is reported against the kernel that caused it."""
    try:
        op.run(dev)
        if CHECK_LAUNCHES and not dev.capturing:
            dev.synchronize()
    except Exception as exc:
        raise RuntimeError(f"rnn_gpu cupy backend: {op.describe()} failed: "
                           f"{type(exc).__name__}: {exc}") from exc


def _run_ops(dev, ops) -> None:
    for op in ops:
        _run_op(dev, op)


_NEW, _SEEN, _FAILED = "new", "seen", "failed"


@dataclass(frozen=True, eq=False)
class _Captured:
    """A captured time loop: the CUDA graph, the operations it was captured from (held so
    that the kernels' modules live as long as the graph that launches them) and the workspace
    whose addresses it uses."""

    graph: Any
    ops: tuple
    workspace: Any = None


class _GraphCache:
    """What to do with a time loop (a tuple of operation keys): ``_NEW`` the first time (run
    it plainly), ``_SEEN`` the second (capture it), then the captured graph (replay it), or
    ``_FAILED`` after a capture that failed (run it plainly, without retrying)."""

    def __init__(self):
        self._entries: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.replays = 0                  # graphs launched from the cache (tests, benchmarks)

    def lookup(self, key) -> Any:
        with self._lock:
            if key not in self._entries:
                self._put(key, _SEEN)
                return _NEW
            self._entries.move_to_end(key)
            return self._entries[key]

    def store(self, key, value) -> None:
        with self._lock:
            self._put(key, value)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _put(self, key, value) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > max(GRAPH_CACHE_SIZE, 0):
            self._entries.popitem(last=False)


_graphs = _GraphCache()


class _Workspace:
    """What one graph-path time loop touches besides the call's own arrays: the buffers its
    GEMMs read and write (state, products, a copy of the recurrent weights) and its call table
    (the call's addresses, read by the step kernels; recurrent.cu explains why). With capture
    on, one workspace is kept per shape and stream, so that every call of that shape issues the
    very same operations and the captured graph is replayed; ``lock`` keeps two host threads on
    one stream from interleaving their calls' writes into it."""

    def __init__(self, dev, table: str, buffers: dict[str, tuple]):
        self.table_name = table
        self.table = dev.empty((len(CALL_TABLES[table]),), np.int64, f"the call table {table}")
        self.buffers = {name: dev.empty(shape, dtype, what)
                        for name, (shape, dtype, what) in buffers.items()}
        self.lock = threading.Lock()

    def __getitem__(self, name: str):
        return self.buffers[name]

    def bind(self, dev, **arrays) -> None:
        """Writes the call's addresses (None: a null pointer) into the table, on the caller's
        stream, so after every earlier use of the table on that stream."""
        fields = CALL_TABLES[self.table_name]
        if set(arrays) != set(fields):
            raise TypeError(f"{self.table_name}: expected the fields {fields}, got "
                            f"{tuple(arrays)}")
        dev.upload(self.table, np.array([0 if arrays[f] is None else dev.ptr(arrays[f])
                                         for f in fields], np.int64))


class _WorkspaceCache:
    """Workspaces by (device, stream, loop signature), least recently used dropped beyond
    ``GRAPH_CACHE_SIZE`` (a captured graph keeps its own workspace alive through its
    operations' arguments, so dropping one here never frees memory a graph still uses)."""

    def __init__(self):
        self._entries: OrderedDict[Any, _Workspace] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, make) -> _Workspace:
        with self._lock:
            ws = self._entries.get(key)
            if ws is None:
                ws = self._entries[key] = make()
            self._entries.move_to_end(key)
            while len(self._entries) > max(GRAPH_CACHE_SIZE, 0):
                self._entries.popitem(last=False)
            return ws

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_workspaces = _WorkspaceCache()


@contextlib.contextmanager
def _workspace(dev, signature: tuple, table: str, buffers: dict[str, tuple]):
    """The time loop's workspace, held for the call: a kept one with capture on (the same
    addresses for every call of this signature on this stream), else a fresh one."""
    def make():
        return _Workspace(dev, table, buffers)

    ws = (_workspaces.get((dev.index, dev.stream.ptr, dev.dtype_name, *signature), make)
          if dev.graphs else make())
    with ws.lock:
        yield ws


def clear_graphs() -> None:
    """Forgets every captured time loop and kept workspace (their GPU memory returns to CuPy's
    pool once no call still uses it)."""
    _graphs.clear()
    _workspaces.clear()
_capture_lock = threading.Lock()        # one capture at a time: the capture stream is shared
_capture_streams: dict[int, Any] = {}
_capture_off: list[str] = []            # why capture is off for this process (after a failure)


def _capture_stream(index: int):
    """A non-blocking stream per device for captures (the legacy default stream cannot
    capture); the captured graph is launched on the caller's stream. Under _capture_lock."""
    import cupy

    stream = _capture_streams.get(index)
    if stream is None:
        stream = _capture_streams[index] = cupy.cuda.Stream(non_blocking=True)
    return stream


def _turn_capture_off(reason: str) -> None:
    """Capture stays off for the rest of the process after a failure: one warning, not one per
    call (a capture that failed once fails for a reason that does not go away)."""
    with _capture_lock:
        first = not _capture_off
        _capture_off.append(reason)
    if first:
        warnings.warn(f"rnn_gpu cupy backend: {reason}; running the steps as plain launches "
                      f"from now on (rnn_gpu.backends.cupy.USE_GRAPH = False skips the attempt)",
                      RuntimeWarning, stacklevel=4)


# ---------------------------------------------------------------------- cuBLAS through ctypes

CUBLAS_STATUS = {0: "CUBLAS_STATUS_SUCCESS", 1: "CUBLAS_STATUS_NOT_INITIALIZED",
                 3: "CUBLAS_STATUS_ALLOC_FAILED", 7: "CUBLAS_STATUS_INVALID_VALUE",
                 8: "CUBLAS_STATUS_ARCH_MISMATCH", 11: "CUBLAS_STATUS_MAPPING_ERROR",
                 13: "CUBLAS_STATUS_EXECUTION_FAILED", 14: "CUBLAS_STATUS_INTERNAL_ERROR",
                 15: "CUBLAS_STATUS_NOT_SUPPORTED", 16: "CUBLAS_STATUS_LICENSE_ERROR"}


class _RawCublas:
    """``cublasGemmEx`` called through ctypes, on cuBLAS handles of this module's own (one per
    thread and device, created on first use outside any capture, pointer mode host, never
    destroyed). Why: CuPy's wrappers raise while a stream captures (module docstring), cuBLAS
    does not. Signatures from cublas_api.h; the ``_v2`` names are the exported symbols behind
    cublas_v2.h's macros."""

    def __init__(self, lib, path: str):
        self.path = path
        i, p = ctypes.c_int, ctypes.c_void_p
        self._create = _cublas_symbol(lib, "cublasCreate_v2", "cublasCreate")
        self._create.argtypes = [ctypes.POINTER(p)]
        self._set_stream = _cublas_symbol(lib, "cublasSetStream_v2", "cublasSetStream")
        self._set_stream.argtypes = [p, p]
        self._set_pointer_mode = _cublas_symbol(lib, "cublasSetPointerMode_v2",
                                                "cublasSetPointerMode")
        self._set_pointer_mode.argtypes = [p, i]
        self._gemm_ex = _cublas_symbol(lib, "cublasGemmEx")
        #                       handle transa transb m  n  k  alpha A  Atype lda B  Btype ldb
        self._gemm_ex.argtypes = [p, i, i, i, i, i, p, p, i, i, p, i, i,
                                  p, p, i, i, i, i]
        #                         beta C  Ctype ldc computeType algo
        for f in (self._create, self._set_stream, self._set_pointer_mode, self._gemm_ex):
            f.restype = i
        self._local = threading.local()

    def handle(self, index: int):
        """This thread's handle for device ``index`` (the current device when first made)."""
        handles = self._local.__dict__.setdefault("handles", {})
        handle = handles.get(index)
        if handle is None:
            handle = ctypes.c_void_p()
            self._check("cublasCreate", self._create(ctypes.byref(handle)))
            self._check("cublasSetPointerMode",
                        self._set_pointer_mode(handle, CUBLAS_POINTER_MODE_HOST))
            handles[index] = handle
        return handle

    def gemm_ex(self, index: int, stream_ptr: int, args: tuple) -> None:
        handle = self.handle(index)
        self._check("cublasSetStream", self._set_stream(handle, stream_ptr))
        self._check("cublasGemmEx", self._gemm_ex(handle, *args))

    def _check(self, call: str, status: int) -> None:
        if status != 0:
            raise RuntimeError(f"{call} returned {CUBLAS_STATUS.get(status, status)} "
                               f"(libcublas at {self.path})")


def _cublas_symbol(lib, *names: str):
    for name in names:
        try:
            return getattr(lib, name)
        except AttributeError:
            continue
    raise AttributeError(f"none of {', '.join(names)} in {lib._name}")


@_once
def _raw_cublas() -> _RawCublas | str:
    """The ctypes cuBLAS (or the reason there is none), tried once."""
    return _load_raw_cublas()


def _load_raw_cublas() -> _RawCublas | str:
    tried = []
    for path in dict.fromkeys(_cublas_candidates()):
        try:
            return _RawCublas(ctypes.CDLL(path), path)
        except (OSError, AttributeError) as exc:
            tried.append(f"{path}: {exc}")
    return f"no usable libcublas ({'; '.join(tried) or 'none found'})"


def _cublas_candidates() -> Iterator[str]:
    """The libcublas CuPy loads (CuPy 14 through cuda.pathfinder), then any copy already
    mapped into the process, then the dynamic linker's search. Any copy works: the handles
    are this module's own, never CuPy's."""
    try:
        from cuda import pathfinder

        path = pathfinder.load_nvidia_dynamic_lib("cublas").abs_path
        if path:
            yield path
    except Exception:                   # no pathfinder (CuPy < 14), or it found nothing
        pass
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and os.path.basename(parts[5].strip()).startswith(
                        "libcublas.so"):
                    yield parts[5].strip()
    except OSError:
        pass
    yield from ("libcublas.so.13", "libcublas.so.12", "libcublas.so")


# ---------------------------------------------------------------------- the device

@dataclass(frozen=True)
class _PersistentPlan:
    blocks: int
    units: int                    # hidden units per block
    shared_mem: int               # bytes of dynamic shared memory (0 without the weights)
    use_smem: bool


_smem_attribute_lock = threading.Lock()


class _CupyDevice:
    """One call's view of the GPU: its device, the caller's stream, the compute dtype, and how
    GEMMs run (CuPy's cuBLAS wrapper, or with ``USE_GRAPH`` the capture-safe ``_RawCublas``)."""

    def __init__(self, index: int, dtype):
        import cupy

        self.cupy = cupy
        self.index = index
        self.dtype = dtype
        self.dtype_name = str(np.dtype(dtype))
        self.ctype = CTYPES[self.dtype_name]
        self.itemsize = np.dtype(dtype).itemsize
        self.stream = cupy.cuda.get_current_stream()
        self.compute = _compute_type(self.dtype_name)
        self.capturing = False
        self.op_stream = self.stream  # where GEMMs go: the caller's stream, or a capture's
        self.blas: _RawCublas | None = None
        if USE_GRAPH and GRAPH_CACHE_SIZE > 0 and not _capture_off:
            blas = _raw_cublas()
            if isinstance(blas, str):
                _turn_capture_off(f"graph capture needs cuBLAS through ctypes, and {blas}")
            else:
                self.blas = blas

    @property
    def graphs(self) -> bool:
        return self.blas is not None and not _capture_off

    # ------------------------------------------------------------ memory
    def ptr(self, a) -> int:
        return a.data.ptr

    def empty(self, shape, dtype, what: str):
        try:
            return self.cupy.empty(shape, dtype=dtype)
        except self.cupy.cuda.memory.OutOfMemoryError as exc:
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            raise MemoryError(
                f"cupy backend: out of GPU memory on cuda:{self.index} allocating {what}, "
                f"shape {tuple(shape)} {np.dtype(dtype)} ({nbytes / 2**20:.1f} MiB); use a "
                f"smaller batch or shorter sequences ({exc})") from exc

    def contiguous(self, a):
        return self.cupy.ascontiguousarray(a)

    def lengths(self, lengths: np.ndarray | None):
        if lengths is None:
            return None
        return self.cupy.asarray(np.ascontiguousarray(lengths, dtype=np.int64))

    def copy_raw(self, dst: int, src: int, nbytes: int) -> None:
        """Device-to-device bytes on the caller's stream (dtype-agnostic, bfloat16 included)."""
        runtime = self.cupy.cuda.runtime
        try:
            runtime.memcpyAsync(dst, src, nbytes, runtime.memcpyDeviceToDevice, self.stream.ptr)
            if CHECK_LAUNCHES:
                self.synchronize()
        except Exception as exc:
            raise RuntimeError(f"rnn_gpu cupy backend: a device-to-device copy of {nbytes} bytes "
                               f"({src:#x} -> {dst:#x}) failed: {type(exc).__name__}: {exc}"
                               ) from exc

    def copy_2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int,
                rows: int) -> None:
        """``rows`` rows of ``width`` bytes between pitched device buffers (caller's stream)."""
        runtime = self.cupy.cuda.runtime
        try:
            runtime.memcpy2DAsync(dst, dst_pitch, src, src_pitch, width, rows,
                                  runtime.memcpyDeviceToDevice, self.stream.ptr)
            if CHECK_LAUNCHES:
                self.synchronize()
        except Exception as exc:
            raise RuntimeError(f"rnn_gpu cupy backend: a device-to-device copy of {rows} rows "
                               f"of {width} bytes failed: {type(exc).__name__}: {exc}") from exc

    def upload(self, dst, host: np.ndarray) -> None:
        """Host bytes into a device array on the caller's stream (CUDA stages a pageable
        source before returning, so ``host`` may go at once)."""
        dst.set(host, stream=self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()

    # ------------------------------------------------------------ kernels
    def kernel(self, module: str, base: str, *template_args: int):
        name = kernel_name(base, self.ctype, *template_args)
        return name, _compiled(self.index, module, self.dtype_name)[name]

    def launch(self, op: _Launch) -> None:
        """On the current CuPy stream: the caller's, or the capture stream during a capture."""
        if not op.cooperative:
            op.fn((op.grid,), (op.block,), op.args, shared_mem=op.shared_mem)
            return
        # RawKernel.kernel is the cupy.cuda.Function of the current device; its __call__
        # takes enable_cooperative_groups (cuLaunchCooperativeKernel). CuPy shrinks a
        # cooperative grid that is too large, with a warning; the kernels need every block,
        # so that must never pass silently (persistent_plan prevents it).
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            op.fn.kernel((op.grid,), (op.block,), op.args, shared_mem=op.shared_mem,
                         enable_cooperative_groups=True)
        for w in caught:
            if "grid size" in str(w.message):
                raise RuntimeError(f"cupy backend: {op.name} was launched with fewer blocks "
                                   f"than the {op.grid} it needs ({w.message})")
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def gemm(self, op: _Gemm) -> None:
        if self.blas is not None:
            self.blas.gemm_ex(self.index, self.op_stream.ptr, op.cublas_args())
            return
        from cupy_backends.cuda.libs import cublas

        # CuPy's wrapper puts the handle on CuPy's current stream (the caller's) itself.
        cublas.gemmEx(self.cupy.cuda.device.get_cublas_handle(), *op.cublas_args())

    def persistent_plan(self, fn, n_mat: int, hidden: int) -> _PersistentPlan | str:
        """Blocks, units per block and shared memory for a persistent kernel, or why none fits.
        The grid must be co-resident (grid.sync()): at most occupancy × SMs blocks. The weights
        go to shared memory when ``n_mat * units * H`` elements fit, else they stay in L2."""
        grid = self._persistent_grid(hidden)
        if isinstance(grid, str):
            return grid
        sms, optin, units, blocks = grid
        smem = n_mat * units * hidden * self.itemsize
        for use_smem, size in ((True, smem), (False, 0)):
            if size > optin:
                continue
            if self._occupancy(fn, size) * sms >= blocks:
                return _PersistentPlan(blocks, units, size, use_smem)
        return (f"{blocks} blocks of {PERSISTENT_THREADS} threads cannot all be resident on "
                f"cuda:{self.index} ({sms} SMs)")

    def persistent_mma_plan(self, fn, n_mat: int, hidden: int,
                            batch: int) -> _PersistentPlan | str:
        """As :meth:`persistent_plan` for the tensor-core kernel: the block's weight rows and a
        copy of the state (both padded to whole 16 x 16 tiles) and its fp32 products (padded
        batch x rows) must fit in shared memory, plus 128 bytes to align them for wmma."""
        grid = self._persistent_grid(hidden)
        if isinstance(grid, str):
            return grid
        sms, optin, units, blocks = grid
        rows, Bp, Hp = (_round_up(n, MMA_TILE) for n in (n_mat * units, batch, hidden))
        smem = (rows + Bp) * Hp * self.itemsize + Bp * rows * 4 + 128
        if smem > optin:
            return (f"{smem} B of shared memory per block for {units} units' weights, the state "
                    f"and the products at batch {batch}; cuda:{self.index} allows {optin}")
        if self._occupancy(fn, smem) * sms < blocks:
            return (f"{blocks} blocks of {PERSISTENT_THREADS} threads with {smem} B of shared "
                    f"memory cannot all be resident on cuda:{self.index} ({sms} SMs)")
        return _PersistentPlan(blocks, units, smem, True)

    def _persistent_grid(self, hidden: int) -> tuple[int, int, int, int] | str:
        """``(SMs, shared-memory opt-in limit, units per block, blocks)`` of a persistent grid
        that splits ``hidden`` units over at most one block per SM, or why none can launch."""
        if not self._attribute("cudaDevAttrCooperativeLaunch"):
            return f"cuda:{self.index} does not support cooperative launches"
        sms = self._attribute("cudaDevAttrMultiProcessorCount")
        optin = self._attribute("cudaDevAttrMaxSharedMemoryPerBlockOptin")
        units = -(-hidden // min(sms, hidden))
        return sms, optin, units, -(-hidden // units)

    def _attribute(self, name: str) -> int:
        runtime = self.cupy.cuda.runtime
        return runtime.deviceGetAttribute(getattr(runtime, name), self.index)

    def _occupancy(self, fn, shared_mem: int) -> int:
        """Resident blocks per SM of ``fn`` (a RawKernel) with that much dynamic shared memory.
        The kernel's opt-in limit only ever grows (it is shared by every caller of ``fn``; a
        smaller value set by another thread must not break a launch planned with more)."""
        from cupy_backends.cuda.api import driver

        with _smem_attribute_lock:
            if shared_mem > fn.max_dynamic_shared_size_bytes:
                fn.max_dynamic_shared_size_bytes = shared_mem      # opts in beyond 48 KiB
        return driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr,
                                                                PERSISTENT_THREADS, shared_mem)

    # ------------------------------------------------------------ running
    def run(self, ops: list, *, graph: bool = False, workspace=None) -> None:
        """Run ``ops`` on the caller's stream: plainly, or (``graph``, with capture on) through
        the graph cache; a captured graph keeps ``workspace`` alive."""
        if not ops:
            return
        if graph and self.graphs and self._run_graph(ops, workspace):
            return
        if self.blas is not None:
            _run_ops(self, ops)
            return
        with self._cublas_on(self.stream):
            _run_ops(self, ops)

    def _run_graph(self, ops: list, workspace=None) -> bool:
        """Replays (or captures, then replays) ``ops``; False when they must run plainly."""
        key = (self.index, tuple(op.key(self) for op in ops))
        entry = _graphs.lookup(key)
        if isinstance(entry, str) and entry == _SEEN:
            entry = self._capture(ops, workspace)
            _graphs.store(key, _FAILED if entry is None else entry)
        if not isinstance(entry, _Captured):
            return False
        try:
            entry.graph.launch(stream=self.stream)
            _graphs.replays += 1
            if CHECK_LAUNCHES:
                self.synchronize()
        except Exception as exc:
            raise RuntimeError(f"rnn_gpu cupy backend: replaying a captured time loop of "
                               f"{len(ops)} operations (the first: {ops[0].describe()}) "
                               f"failed: {type(exc).__name__}: {exc}") from exc
        return True

    def _capture(self, ops: list, workspace=None) -> _Captured | None:
        """``ops`` captured as a CUDA graph on the capture stream, or None after a failure
        (then capture is off for the process, with a warning naming what failed)."""
        failure = None
        graph = None
        with _capture_lock:
            stream = _capture_stream(self.index)
            try:
                self.blas.handle(self.index)    # no cuBLAS handle may be created in a capture
            except Exception as exc:
                failure = f"creating a cuBLAS handle: {type(exc).__name__}: {exc}"
            if failure is None:
                failure, graph = self._record(stream, ops)
        if failure is not None or graph is None:
            _turn_capture_off(f"capturing the time loop as a CUDA graph failed "
                              f"({failure or 'no graph came back'})")
            self.blas = None        # the rest of this call: plain launches, CuPy's cuBLAS
            return None
        return _Captured(graph, tuple(ops), workspace)

    def _record(self, stream, ops: list) -> tuple[str | None, Any]:
        """begin_capture, the operations, end_capture; (what failed or None, the graph)."""
        failure = None
        graph = None
        with stream:
            self.capturing, self.op_stream = True, stream
            try:
                stream.begin_capture()
            except Exception as exc:
                self.capturing, self.op_stream = False, self.stream
                return f"begin_capture: {type(exc).__name__}: {exc}", None
            try:
                _run_ops(self, ops)
            except Exception as exc:
                failure = f"{type(exc).__name__}: {exc}"
            finally:
                try:        # always end the capture, whatever happened inside it
                    graph = stream.end_capture()
                except Exception as exc:
                    failure = (f"{failure}; then " if failure else "") + (
                        f"end_capture: {type(exc).__name__}: {exc}")
                self.capturing, self.op_stream = False, self.stream
        return failure, graph

    @contextlib.contextmanager
    def _cublas_on(self, stream) -> Iterator[None]:
        """CuPy's cuBLAS handle on ``stream`` with host-side alpha/beta; its stream is
        restored afterwards."""
        from cupy_backends.cuda.libs import cublas

        handle = self.cupy.cuda.device.get_cublas_handle()
        previous = cublas.getStream(handle)
        cublas.setStream(handle, stream.ptr)
        cublas.setPointerMode(handle, CUBLAS_POINTER_MODE_HOST)
        try:
            yield
        finally:
            cublas.setStream(handle, previous)


def _compute_type(dtype: str) -> int:
    """IEEE float32 unless the caller allowed TF32 (DESIGN §3); fp16/bf16 accumulate in fp32."""
    if dtype == "float32" and _config.tf32_allowed():
        return CUBLAS_COMPUTE_32F_FAST_TF32
    return CUBLAS_COMPUTE_32F


# ---------------------------------------------------------------------- building blocks

def _i64(v: int) -> np.int64:
    return np.int64(v)


def _blocks(n: int) -> int:
    return max(1, -(-n // THREADS))


def _contiguous(dev, a):
    return a if a.flags.c_contiguous else dev.contiguous(a)


def _time(s: int, T: int, reverse: bool) -> int:
    return T - 1 - s if reverse else s


def _row(dev, a, t: int) -> int:
    """Address of a[t] for a contiguous (T, ...) array."""
    return dev.ptr(a) + t * a.strides[0]


def _pointwise(dev, base: str, *template_args: int, n: int, args: tuple) -> _Launch:
    name, fn = dev.kernel("recurrent", base, *template_args)
    return _Launch(name, fn, _blocks(n), THREADS, tuple(args))


def _gemm(dev, m: int, n: int, k: int, a: int, b: int, c: int, *, trans_a: bool = False,
          trans_b: bool = False, beta: int = 0) -> _Gemm:
    """A and B in the compute dtype, C in float32."""
    return _Gemm(m, n, k, a, trans_a, b, trans_b, c, CUDA_DATA_TYPES[dev.dtype_name],
                 CUDA_DATA_TYPES["float32"], beta, dev.compute)


def _to_f32(dev, a, what: str, out=None):
    out = dev.empty(a.shape, np.float32, what) if out is None else out
    dev.run([_pointwise(dev, "cast_to_f32", n=a.size, args=(a, out, _i64(a.size)))])
    return out


def _from_f32(dev, a32, what: str):
    out = dev.empty(a32.shape, dev.dtype, what)
    dev.run([_pointwise(dev, "cast_from_f32", n=a32.size, args=(a32, out, _i64(a32.size)))])
    return out


def _filled(dev, n: int, value: float, what: str):
    out = dev.empty((n,), dev.dtype, what)
    dev.run([_pointwise(dev, "fill_value", n=n, args=(out, np.float32(value), _i64(n)))])
    return out


def _copy(dev, a, what: str):
    out = dev.empty(a.shape, a.dtype, what)
    dev.copy_raw(dev.ptr(out), dev.ptr(a), a.nbytes)
    return out


def _copy_into(dev, dst, src, offset: int = 0) -> None:
    """The bytes of contiguous ``src`` into ``dst`` from byte ``offset`` on (a workspace
    buffer of the same dtype)."""
    if offset + src.nbytes > dst.nbytes or np.dtype(src.dtype) != np.dtype(dst.dtype):
        raise ValueError(f"cannot copy {src.nbytes} bytes of {src.dtype} into {dst.nbytes} "
                         f"bytes of {dst.dtype} at offset {offset}")
    dev.copy_raw(dev.ptr(dst) + offset, dev.ptr(src), src.nbytes)


def _stacked(dev, mats: list, what: str):
    """Row-wise concatenation of contiguous (r_i, H) matrices, by raw copies."""
    rows = sum(m.shape[0] for m in mats)
    out = dev.empty((rows, mats[0].shape[1]), dev.dtype, what)
    offset = 0
    for m in mats:
        dev.copy_raw(dev.ptr(out) + offset, dev.ptr(m), m.nbytes)
        offset += m.nbytes
    return out


def _outer_grad(dev, d, x, what: str):
    """``dᵀ x`` over all T*B rows -> (cols of d, cols of x) in the compute dtype."""
    rows, n_d, n_x = d.size // d.shape[-1], d.shape[-1], x.shape[-1]
    out = dev.empty((n_d, n_x), np.float32, what)
    dev.run([_gemm(dev, n_d, n_x, rows, dev.ptr(d), dev.ptr(x), dev.ptr(out), trans_a=True)])
    return _from_f32(dev, out, what)


def _bias_grad(dev, d, ones, what: str):
    """``1ᵀ d`` over all T*B rows (a GEMM with a ones vector: fp32 accumulation for every
    dtype without asking CuPy to reduce bfloat16)."""
    rows, n_d = d.size // d.shape[-1], d.shape[-1]
    out = dev.empty((n_d,), np.float32, what)
    dev.run([_gemm(dev, 1, n_d, rows, dev.ptr(ones), dev.ptr(d), dev.ptr(out))])
    return _from_f32(dev, out, what)


def choose_path(cell: str, batch: int, hidden: int) -> str:
    """``"persistent"`` or ``"graph"`` for one call (see the module docstring)."""
    if FORCE_PATH is not None:
        if FORCE_PATH not in PATHS:
            raise ValueError(f"rnn_gpu.backends.cupy.FORCE_PATH: expected one of {PATHS} or "
                             f"None, got {FORCE_PATH!r}")
        return FORCE_PATH
    n_mat = 3 if cell == "twostage" else GATES[cell]
    if batch <= PERSISTENT_MAX_BATCH and batch * n_mat * hidden * hidden <= (
            PERSISTENT_MAX_STEP_MACS):
        return "persistent"
    return "graph"


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
    xw = _contiguous(dev, xw)
    w = {k: _contiguous(dev, v) for k, v in weights.items()}
    state = tuple(_contiguous(dev, s) for s in state)
    lens = dev.lengths(lengths)
    T, B, _ = xw.shape
    H = problem.hidden_size
    path = choose_path(problem.cell, B, H)
    if problem.cell == "twostage":
        return _twostage_forward(dev, problem, xw, w, state[0], lens, path, reverse, keep_tape)
    return _gated_forward(dev, problem, xw, w, state, lens, path, reverse, keep_tape)


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
    c0 = _to_f32(dev, state[1], "the fp32 cell state c0") if lstm else None
    outs = (y, gates, ctape, hprev)
    final = None
    if path == "persistent-mma":
        final = _gated_persistent(dev, cell, act, xw, w, state[0], c0, lens, outs, reverse,
                                  mma=True)
        path = "persistent-mma" if final is not None else "persistent"
    if path == "persistent":
        final = _gated_persistent(dev, cell, act, xw, w, state[0], c0, lens, outs, reverse)
    if final is None:
        path = "graph"
        final = _gated_graph(dev, cell, act, xw, w, state[0], c0, lens, outs, reverse)
    tape = None
    if keep_tape:
        tape = GatedTape(cell, act, reverse, w["weight_hh"], "bias_hh" in w, lens, c0, gates,
                         ctape, hprev, path)
    return y, final, tape


GRADIENTS_OF_STATE0 = ("the gradient of h0", "the gradient of c0")


def _final_state(dev, h32, c32=None, what=("the final h", "the final c")) -> tuple:
    """The final state (or its gradient) in the compute dtype: ``(h,)`` or ``(h, c)``."""
    final = (_from_f32(dev, h32, what[0]),)
    return final if c32 is None else final + (_from_f32(dev, c32, what[1]),)


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
    with _workspace(dev, signature, "GatedFwdCall", buffers) as ws:
        _to_f32(dev, h0, "the fp32 state h", out=ws["h"])
        _copy_into(dev, ws["hc"], h0)
        _copy_into(dev, ws["w_hh"], w["weight_hh"])
        if c0 is not None:
            _copy_into(dev, ws["c"], c0)
        ws.bind(dev, xw=xw, bias=w.get("bias_hh"), lengths=lens, y=y, gates=gates,
                ctape=ctape, hprev=hprev)
        c = ws.buffers.get("c")
        product = _gemm(dev, B, GH, H, dev.ptr(ws["hc"]), dev.ptr(ws["w_hh"]),
                        dev.ptr(ws["hh"]), trans_b=True)
        ops = []
        for s in range(T):
            ops.append(product)
            ops.append(_pointwise(dev, "gated_fwd_step", CELL_IDS[cell], act, n=B * H,
                                  args=(ws.table, ws["hh"], ws["h"], c, ws["hc"],
                                        _i64(_time(s, T, reverse)), _i64(B), _i64(H))))
        dev.run(ops, graph=True, workspace=ws)
        return _final_state(dev, ws["h"], c)


def _persistent_launch(dev, base: str, template_args: tuple, n_mat: int, H: int, args_of,
                       batch: int | None = None):
    """Plans and launches a persistent kernel; returns False (after a warning) when it
    cannot run, so that the caller takes the next path. ``args_of(plan)`` gives the args;
    ``batch`` plans the tensor-core kernel (:meth:`_CupyDevice.persistent_mma_plan`)."""
    name, fn = dev.kernel("persistent" if batch is None else "persistent_mma", base,
                          *template_args)
    try:
        plan = (dev.persistent_plan(fn, n_mat, H) if batch is None
                else dev.persistent_mma_plan(fn, n_mat, H, batch))
    except Exception as exc:      # the occupancy query or the shared-memory opt-in failed
        raise RuntimeError(f"rnn_gpu cupy backend: planning the persistent kernel {name} "
                           f"(H={H}) failed: {type(exc).__name__}: {exc}") from exc
    if isinstance(plan, str):
        then = "the CUDA-core persistent kernel" if batch is not None else "the graph path"
        warnings.warn(f"rnn_gpu cupy backend: the persistent kernel {name} cannot run here "
                      f"({plan}); taking {then}", RuntimeWarning, stacklevel=4)
        return False
    dev.run([_Launch(name, fn, plan.blocks, PERSISTENT_THREADS, args_of(plan),
                     shared_mem=plan.shared_mem, cooperative=True)])
    return True


def _gated_persistent(dev, cell, act, xw, w, h0, c0, lens, outs, reverse, *, mma=False):
    """Path (b), or with ``mma`` path "persistent-mma"; returns the final state, or None when
    the kernel cannot run here."""
    T, B, GH = xw.shape
    H = GH // GATES[cell]
    c = None if c0 is None else _copy(dev, c0, "the fp32 cell state c")
    hbuf = dev.empty((2, B, H), np.float32, "the fp32 state buffers")
    _to_f32(dev, h0, "the fp32 state h", out=hbuf)          # slot 0 = h0
    head = (xw, w["weight_hh"], w.get("bias_hh"), lens, hbuf)
    shape = (_i64(T), _i64(B), _i64(H))
    if mma:
        Bp, Hp = _round_up(B, MMA_TILE), _round_up(H, MMA_TILE)
        # h in the compute dtype for the products, zero-padded to whole tiles (both slots)
        hmat = _filled(dev, 2 * Bp * Hp, 0.0, "the padded state in the compute dtype")
        hmat = hmat.reshape(2, Bp, Hp)
        dev.copy_2d(dev.ptr(hmat), Hp * dev.itemsize, dev.ptr(h0), H * dev.itemsize,
                    H * dev.itemsize, B)

        def args_of(plan):
            return (*head, hmat, c, *outs, *shape, _i64(plan.units), _i64(int(reverse)),
                    _i64(Bp), _i64(Hp), _i64(_round_up(GATES[cell] * plan.units, MMA_TILE)))
    else:
        def args_of(plan):
            return (*head, c, *outs, *shape, _i64(plan.units), _i64(int(reverse)),
                    _i64(int(plan.use_smem)))

    base = "gated_fwd_persistent_mma" if mma else "gated_fwd_persistent"
    if not _persistent_launch(dev, base, (CELL_IDS[cell], act), GATES[cell], H, args_of,
                              batch=B if mma else None):
        return None
    return _final_state(dev, hbuf[T % 2], c)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


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
        final = _twostage_persistent(dev, acts, xw, w, h0, lens, outs, reverse)
    if final is None:
        path = "graph"
        final = _twostage_graph(dev, acts, xw, w, h0, lens, outs, reverse)
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
    with _workspace(dev, signature, "TwoStageFwdCall", buffers) as ws:
        _to_f32(dev, h0, "the fp32 state h", out=ws["h"])
        _copy_into(dev, ws["hc"], h0)
        _copy_into(dev, ws["w_cat"], w["weight_aa"])
        _copy_into(dev, ws["w_cat"], w["weight_hh"], offset=w["weight_aa"].nbytes)
        _copy_into(dev, ws["w_ha"], w["weight_ha"])
        ws.bind(dev, xw=xw, bias=w.get("bias_h"), lengths=lens, y=y, atape=atape,
                htape=htape, hprev=hprev)
        first = _gemm(dev, B, 2 * H, H, dev.ptr(ws["hc"]), dev.ptr(ws["w_cat"]),
                      dev.ptr(ws["pa"]), trans_b=True)
        second = _gemm(dev, B, H, H, dev.ptr(ws["a_c"]), dev.ptr(ws["w_ha"]),
                       dev.ptr(ws["pb"]), trans_b=True)
        ops = []
        for s in range(T):
            t = _i64(_time(s, T, reverse))
            ops.append(first)
            ops.append(_pointwise(dev, "twostage_fwd_a", acts[0], n=B * H,
                                  args=(ws.table, ws["pa"], ws["a_c"], t, _i64(B), _i64(H))))
            ops.append(second)
            ops.append(_pointwise(dev, "twostage_fwd_b", acts[1], n=B * H,
                                  args=(ws.table, ws["pa"], ws["pb"], ws["h"], ws["hc"], t,
                                        _i64(B), _i64(H))))
        dev.run(ops, graph=True, workspace=ws)
        return _final_state(dev, ws["h"])


def _twostage_persistent(dev, acts, xw, w, h0, lens, outs, reverse):
    T, B, H = xw.shape
    y, atape, htape, hprev = outs
    w_all = _stacked(dev, [w["weight_aa"], w["weight_ha"], w["weight_hh"]],
                     "[W_aa; W_ha; W_hh]")
    hbuf = dev.empty((2, B, H), np.float32, "the fp32 state buffers")
    _to_f32(dev, h0, "the fp32 state h", out=hbuf)
    abuf = dev.empty((B, H), np.float32, "the fp32 a_t buffer")

    def args_of(plan):
        return (xw, w_all, w.get("bias_h"), lens, hbuf, abuf, y, atape, htape, hprev, _i64(T),
                _i64(B), _i64(H), _i64(plan.units), _i64(int(reverse)),
                _i64(int(plan.use_smem)))

    if not _persistent_launch(dev, "twostage_fwd_persistent", acts, 3, H, args_of):
        return None
    return _final_state(dev, hbuf[T % 2])


# ---------------------------------------------------------------------- backward

def run_backward(dev, problem: Problem, ktape, dy, dstate):
    """Returns ``(dxw, dstate0, dweights)`` (rnn_gpu.backend_api's contract)."""
    dy = _contiguous(dev, dy)
    dstate = tuple(_contiguous(dev, d) for d in dstate)
    if isinstance(ktape, TwoStageTape):
        return _twostage_backward(dev, ktape, dy, dstate[0])
    return _gated_backward(dev, ktape, dy, dstate)


def _gated_backward(dev, tape: GatedTape, dy, dstate):
    T, B, H = dy.shape
    cell, lstm = tape.cell, tape.cell == "lstm"
    GH = GATES[cell] * H
    dxw = dev.empty((T, B, GH), dev.dtype, "the gradient of xw")
    dhh = dev.empty((T, B, GH), dev.dtype, "the gradient of h W_hh^T") if cell == "gru" else dxw
    buffers = {"dh": ((B, H), np.float32, "the fp32 gradient dh"),
               "drec": ((B, GH), dev.dtype, "a step's gradient of h W_hh^T"),
               "w_hh": ((GH, H), dev.dtype, "the graph path's copy of W_hh")}
    if lstm:
        buffers["dc"] = ((B, H), np.float32, "the fp32 gradient dc")
    signature = ("gated_bwd", cell, tape.act, T, B, H, tape.reverse)
    with _workspace(dev, signature, "GatedBwdCall", buffers) as ws:
        _to_f32(dev, dstate[0], "the fp32 gradient dh", out=ws["dh"])
        if lstm:
            _to_f32(dev, dstate[1], "the fp32 gradient dc", out=ws["dc"])
        _copy_into(dev, ws["w_hh"], tape.w_hh)
        ws.bind(dev, dy=dy, gates=tape.gates, ctape=tape.ctape, c0=tape.c0, hprev=tape.hprev,
                lengths=tape.lengths, dxw=dxw, dhh=dhh)
        dc = ws.buffers.get("dc")
        recurrent = _gemm(dev, B, H, GH, dev.ptr(ws["drec"]), dev.ptr(ws["w_hh"]),
                          dev.ptr(ws["dh"]), beta=1)
        ops = []
        for s in reversed(range(T)):
            t = _time(s, T, tape.reverse)
            t_prev = _time(s - 1, T, tape.reverse) if s > 0 else -1
            ops.append(_pointwise(dev, "gated_bwd_step", CELL_IDS[cell], tape.act, n=B * H,
                                  args=(ws.table, ws["dh"], dc, ws["drec"], _i64(t),
                                        _i64(t_prev), _i64(B), _i64(H))))
            ops.append(recurrent)
        dev.run(ops, graph=True, workspace=ws)
        d0 = _final_state(dev, ws["dh"], dc, GRADIENTS_OF_STATE0)
    grads = {"weight_hh": _outer_grad(dev, dhh, tape.hprev, "the gradient of W_hh")}
    if tape.has_bias:
        ones = _filled(dev, T * B, 1.0, "a ones vector")
        grads["bias_hh"] = _bias_grad(dev, dhh, ones, "the gradient of b_hh")
    return dxw, d0, grads


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
    with _workspace(dev, signature, "TwoStageBwdCall", buffers) as ws:
        _to_f32(dev, dh_T, "the fp32 gradient dh", out=ws["dh"])
        for i, m in enumerate((tape.w_ha, tape.w_aa, tape.w_hh)):
            _copy_into(dev, ws["w"], m, offset=i * m.nbytes)
        ws.bind(dev, dy=dy, atape=tape.atape, htape=tape.htape, lengths=tape.lengths, dph=dph,
                dxw=dxw)
        w_ha, w_aa, w_hh = (dev.ptr(ws["w"]) + i * H * H * dev.itemsize for i in range(3))
        dh, da, dph_t, dx_t = (dev.ptr(ws[k]) for k in ("dh", "da", "dph_t", "dx_t"))
        gemms = (_gemm(dev, B, H, H, dph_t, w_ha, da),
                 _gemm(dev, B, H, H, dx_t, w_aa, dh, beta=1),
                 _gemm(dev, B, H, H, dph_t, w_hh, dh, beta=1))
        ops = []
        for s in reversed(range(T)):
            t = _i64(_time(s, T, tape.reverse))
            ops.append(_pointwise(dev, "twostage_bwd_a", g, n=B * H,
                                  args=(ws.table, ws["dh"], ws["dph_t"], t, _i64(B), _i64(H))))
            ops.append(gemms[0])
            ops.append(_pointwise(dev, "twostage_bwd_b", f, n=B * H,
                                  args=(ws.table, ws["da"], ws["dx_t"], t, _i64(B), _i64(H))))
            ops.extend(gemms[1:])
        dev.run(ops, graph=True, workspace=ws)
        d0 = _final_state(dev, ws["dh"], what=GRADIENTS_OF_STATE0)
    a_c = _from_f32(dev, tape.atape, "the a_t tape in the compute dtype")
    grads = {"weight_aa": _outer_grad(dev, dxw, tape.hprev, "the gradient of W_aa"),
             "weight_ha": _outer_grad(dev, dph, a_c, "the gradient of W_ha"),
             "weight_hh": _outer_grad(dev, dph, tape.hprev, "the gradient of W_hh")}
    if tape.has_bias:
        ones = _filled(dev, T * B, 1.0, "a ones vector")
        grads["bias_h"] = _bias_grad(dev, dph, ones, "the gradient of b_h")
    return dxw, d0, grads
