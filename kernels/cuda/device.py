"""One call's view of the GPU for the cupy backend (``CupyDevice``): allocation, copies, kernel
launches, GEMMs, persistent-kernel plans, and running a time loop plainly or through the graph
cache. The backend's algorithms talk to the GPU only through it, so that
tests/test_cupy_emulated.py can run them against a CPU emulation of the same interface."""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from rnn_gpu import _config

from . import graphs as cuda_graphs
from . import ops as cuda_ops
from .cublas import (
    CUBLAS_COMPUTE_32F,
    CUBLAS_COMPUTE_32F_FAST_TF32,
    CUBLAS_POINTER_MODE_HOST,
    RawCublas,
    raw_cublas,
)
from .graphs import FAILED, SEEN, Captured
from .ops import Gemm, Launch, run_ops
from .sources import CTYPES, compiled, kernel_name

PERSISTENT_THREADS = 256               # = PERSISTENT_THREADS in persistent.cuh
MMA_TILE = 16                          # the 16 x 16 tile (two mma.sync m16n8k16) for half, bfloat16
MMA_SMEM_PAD = 8                       # persistent_mma.cu's shared-memory row padding (elements)


BWD_CHUNK_BYTES = 512                  # the persistent backward's chunk width a row, as timed


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def check_row_groups(value, name: str = "row_groups") -> None:
    """A row-group count (:func:`row_split`) must be a positive int; ``name`` names it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def check_chunk_bytes(value, name: str = "chunk_bytes") -> None:
    """The tensor-core backward's chunk bytes a row must be a positive multiple of
    :data:`BWD_CHUNK_BYTES`; ``name`` names the value."""
    if (isinstance(value, bool) or not isinstance(value, int) or value < BWD_CHUNK_BYTES
            or value % BWD_CHUNK_BYTES):
        raise ValueError(f"{name}: expected a positive multiple of {BWD_CHUNK_BYTES}, "
                         f"got {value!r}")


def row_split(batch: int, row_groups: int) -> tuple[int, int]:
    """``(rows, groups)``: the tensor-core kernels' rows a row group (``BlockSlice`` in
    persistent_mma.cu), the batch over ``row_groups`` rounded up to whole 16-row tiles, and the
    groups that then hold rows (fewer where the rounding leaves the last ones empty: batch 40
    over 4 groups is 3 groups of 16 rows)."""
    rows = round_up(-(-batch // row_groups), MMA_TILE)
    return rows, -(-batch // rows)


def fwd_warp_split(rows: int, w_rows: int) -> int:
    """How many warps of ``gated_fwd_persistent_mma`` share one 32 x 32 warp tile (its
    ``warp_split``), each over a slice of every chunk of K: the largest power of two that keeps
    the warps busy (the warp tiles are ceil(rows / 32) x ceil(w_rows / 32), 2 at 64 rows and 32
    weight rows), or 0 where the warp tiles alone outnumber the warps (the per-tile loop then
    runs)."""
    warps = PERSISTENT_THREADS // 32
    tiles = -(-rows // 32) * -(-w_rows // 32)
    if tiles > warps:
        return 0
    k = 1
    while 2 * k * tiles <= warps:
        k *= 2
    return k


def bwd_k_split(Bp: int, Np: int, itemsize: int, chunk_bytes: int = BWD_CHUNK_BYTES) -> int:
    """How many warps of ``gated_bwd_persistent_mma`` share one 16 x 16 output tile, each over
    a slice of every chunk (``chunk_bytes`` a row): the largest power of two that keeps the
    warps busy (the tiles are (Bp / 16) x (Np / 16), 4 at batch 64 with 8 units a block) and
    the slices whole k-steps of 16."""
    warps, tiles = PERSISTENT_THREADS // 32, (Bp // MMA_TILE) * (Np // MMA_TILE)
    chunk = chunk_bytes // itemsize
    k = 1
    while 2 * k * tiles <= warps and chunk // (2 * k) >= MMA_TILE:
        k *= 2
    return k


@dataclass(frozen=True)
class PersistentPlan:
    blocks: int
    units: int                    # hidden units per block
    shared_mem: int               # bytes of dynamic shared memory (0 without the weights)
    use_smem: bool
    rows: int = 0                 # the tensor-core kernels: batch rows a row group (padded)
    row_groups: int = 1           # ... and the groups: blocks = row_groups x blocks a group
    warp_split: int = 0           # the tensor-core forward: warps a warp tile (0: per tile)
    chunk: int = 0                # the tensor-core backward: chunk width (elements a row)
    k_split: int = 0              # ... and the warps a tile (bwd_k_split)

    def describe(self, itemsize: int) -> str:
        """The grid and what the plan chose, for reports (the bench's ``config`` column): the
        plan that ran, where it fell back from the settings asked for."""
        words = [f"{self.blocks} blocks of {self.units} units"]
        if not self.rows:             # the CUDA-core kernels
            words.append("W_hh in shared memory" if self.use_smem else "W_hh read from L2")
        if self.row_groups > 1:
            words.append(f"{self.row_groups} row groups of {self.rows} rows")
        if self.warp_split:
            words.append(f"32 x 32 warp tiles of {self.warp_split} warps")
        if self.chunk:
            words.append(f"{self.chunk * itemsize}-byte chunks")
        return ", ".join(words)


_smem_attribute_lock = threading.Lock()


class CupyDevice:
    """One call's view of the GPU: its device, the caller's stream, the compute dtype, and how
    GEMMs run (CuPy's cuBLAS wrapper, or with ``capture`` the capture-safe ``RawCublas``)."""

    def __init__(self, index: int, dtype, *, capture: bool = False):
        import cupy

        self.cupy = cupy
        self.index = index
        self.dtype = dtype
        self.dtype_name = str(np.dtype(dtype))
        self.ctype = CTYPES[self.dtype_name]
        self.itemsize = np.dtype(dtype).itemsize
        self.stream = cupy.cuda.get_current_stream()
        self.compute = compute_type(self.dtype_name)
        self.capturing = False
        self.plans: list[PersistentPlan] = []    # the persistent kernels launched, in order
        self.op_stream = self.stream  # where GEMMs go: the caller's stream, or a capture's
        self.blas: RawCublas | None = None
        if capture and cuda_graphs.GRAPH_CACHE_SIZE > 0 and not cuda_graphs.capture_off:
            blas = raw_cublas()
            if isinstance(blas, str):
                cuda_graphs.turn_capture_off(f"graph capture needs cuBLAS through ctypes, and "
                                             f"{blas}")
            else:
                self.blas = blas

    @property
    def graphs(self) -> bool:
        return self.blas is not None and not cuda_graphs.capture_off

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
            if cuda_ops.CHECK_LAUNCHES:
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
            if cuda_ops.CHECK_LAUNCHES:
                self.synchronize()
        except Exception as exc:
            raise RuntimeError(f"rnn_gpu cupy backend: a device-to-device copy of {rows} rows "
                               f"of {width} bytes failed: {type(exc).__name__}: {exc}") from exc

    def any_nonzero(self, a) -> bool:
        """Whether any byte of contiguous ``a`` is not zero (a -0.0 counts: a false "yes" only
        costs work). Reads one value back, so it waits for the stream; CuPy reduces the bytes,
        so bfloat16 needs nothing from ml_dtypes."""
        raw = self.cupy.ndarray((a.nbytes,), dtype=self.cupy.uint8, memptr=a.data)
        return bool(raw.any())

    def upload(self, dst, host: np.ndarray) -> None:
        """Host bytes into a device array on the caller's stream (CUDA stages a pageable
        source before returning, so ``host`` may go at once)."""
        dst.set(host, stream=self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()

    # ------------------------------------------------------------ kernels
    def kernel(self, module: str, base: str, *template_args: int):
        name = kernel_name(base, self.ctype, *template_args)
        return name, compiled(self.index, module, self.dtype_name)[name]

    def launch(self, op: Launch) -> None:
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

    def gemm(self, op: Gemm) -> None:
        if self.blas is not None:
            self.blas.gemm_ex(self.index, self.op_stream.ptr, op.cublas_args())
            return
        from cupy_backends.cuda.libs import cublas

        # CuPy's wrapper puts the handle on CuPy's current stream (the caller's) itself.
        cublas.gemmEx(self.cupy.cuda.device.get_cublas_handle(), *op.cublas_args())

    def persistent_plan(self, fn, n_mat: int, hidden: int) -> PersistentPlan | str:
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
                return PersistentPlan(blocks, units, size, use_smem)
        return (f"{blocks} blocks of {PERSISTENT_THREADS} threads cannot all be resident on "
                f"cuda:{self.index} ({sms} SMs)")

    def persistent_mma_plan(self, fn, n_mat: int, hidden: int, batch: int,
                            row_groups: int = 1, warp_tiles: bool = False
                            ) -> PersistentPlan | str:
        """As :meth:`persistent_plan` for the tensor-core kernel: the block's weight rows and a
        copy of its row group's rows of the state (both padded to whole 16 x 16 tiles, each row
        MMA_SMEM_PAD elements longer against bank conflicts) and its fp32 products (rows x
        weight rows; with ``warp_tiles``, one such array a part of :func:`fwd_warp_split`)
        must fit in shared memory, plus 128 bytes to align them. ``row_groups``: see
        :meth:`_tensor_core_plan`. Warp tiles that cannot run are planned without."""
        def layout_with(tiles: bool):
            def layout(units: int, rows: int) -> tuple[int, str, dict]:
                w_rows, Hp = round_up(n_mat * units, MMA_TILE), round_up(hidden, MMA_TILE)
                split = fwd_warp_split(rows, w_rows) if tiles else 0
                return ((w_rows + rows) * (Hp + MMA_SMEM_PAD) * self.itemsize
                        + max(split, 1) * rows * w_rows * 4,
                        f"{units} units' weights, {rows} rows of the state and the products",
                        {"warp_split": split})
            return layout

        plan = self._tensor_core_plan(fn, hidden, batch, layout_with(warp_tiles), row_groups)
        if isinstance(plan, str) and warp_tiles:
            plan = self._tensor_core_plan(fn, hidden, batch, layout_with(False), row_groups)
        return plan

    def persistent_mma_bwd_plan(self, fn, gates: int, hidden: int, batch: int,
                                row_groups: int = 1, chunk_bytes: int = BWD_CHUNK_BYTES
                                ) -> PersistentPlan | str:
        """As :meth:`persistent_mma_plan` for the tensor-core backward
        (``gated_bwd_persistent_mma``): the block's columns of W_hh (``gates * hidden`` rows by
        its units, both padded to whole tiles), two chunk buffers of its row group's rows of the
        recurrent gradient (``chunk_bytes`` a row, a multiple of 512) and the fp32 partial
        products (:func:`bwd_k_split` of them) must fit in shared memory. Chunks wider than
        512 bytes that do not fit are planned at 512."""
        check_chunk_bytes(chunk_bytes)

        def layout_with(width: int):
            def layout(units: int, rows: int) -> tuple[int, str, dict]:
                GHp, Np = round_up(gates * hidden, MMA_TILE), round_up(units, MMA_TILE)
                chunk = width // self.itemsize
                k_split = bwd_k_split(rows, Np, self.itemsize, width)
                return ((Np * (GHp + MMA_SMEM_PAD) + 2 * rows * (chunk + MMA_SMEM_PAD))
                        * self.itemsize + k_split * rows * Np * 4,
                        f"{units} units' columns of W_hh, the gradient chunks and the products",
                        {"chunk": chunk, "k_split": k_split})
            return layout

        plan = self._tensor_core_plan(fn, hidden, batch, layout_with(chunk_bytes), row_groups)
        if isinstance(plan, str) and chunk_bytes != BWD_CHUNK_BYTES:
            plan = self._tensor_core_plan(fn, hidden, batch, layout_with(BWD_CHUNK_BYTES),
                                          row_groups)
        return plan

    def _tensor_core_plan(self, fn, hidden: int, batch: int, layout,
                          row_groups: int) -> PersistentPlan | str:
        """The persistent grid over ``hidden`` units and ``row_groups`` groups of the batch's
        rows (:func:`row_split`), with ``layout(units, rows)`` = (bytes of shared memory a
        block, what they hold, the kernel's further plan fields), plus 128 bytes of alignment. Where
        that many groups cannot run, half as many are tried, down to one; with one, the reason
        it cannot run (more than the opt-in limit, or too many blocks to be resident at once)
        is returned."""
        check_row_groups(row_groups)
        while True:
            rows, groups = row_split(batch, row_groups)
            plan = self._tensor_core_grid(fn, hidden, batch, layout, rows, groups)
            if not isinstance(plan, str) or groups == 1:
                return plan
            row_groups = groups // 2

    def _tensor_core_grid(self, fn, hidden: int, batch: int, layout, rows: int,
                          groups: int) -> PersistentPlan | str:
        grid = self._persistent_grid(hidden, groups)
        if isinstance(grid, str):
            return grid
        sms, optin, units, blocks = grid
        smem, holds, fields = layout(units, rows)
        smem += 128
        if smem > optin:
            return (f"{smem} B of shared memory per block for {holds} at batch {batch}; "
                    f"cuda:{self.index} allows {optin}")
        if self._occupancy(fn, smem) * sms < blocks:
            return (f"{blocks} blocks of {PERSISTENT_THREADS} threads with {smem} B of shared "
                    f"memory cannot all be resident on cuda:{self.index} ({sms} SMs)")
        return PersistentPlan(blocks, units, smem, True, rows, groups, **fields)

    def _persistent_grid(self, hidden: int,
                         row_groups: int = 1) -> tuple[int, int, int, int] | str:
        """``(SMs, shared-memory opt-in limit, units per block, blocks)`` of a persistent grid
        that splits ``hidden`` units over at most one block per SM in each of ``row_groups``
        groups of blocks, or why none can launch."""
        if not self._attribute("cudaDevAttrCooperativeLaunch"):
            return f"cuda:{self.index} does not support cooperative launches"
        sms = self._attribute("cudaDevAttrMultiProcessorCount")
        optin = self._attribute("cudaDevAttrMaxSharedMemoryPerBlockOptin")
        per_group = min(sms // row_groups, hidden)
        if per_group < 1:
            return (f"{row_groups} row groups need a block each at least, and cuda:{self.index} "
                    f"has {sms} SMs")
        units = -(-hidden // per_group)
        return sms, optin, units, row_groups * -(-hidden // units)

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
            run_ops(self, ops)
            return
        with self._cublas_on(self.stream):
            run_ops(self, ops)

    def _run_graph(self, ops: list, workspace=None) -> bool:
        """Replays (or captures, then replays) ``ops``; False when they must run plainly."""
        key = (self.index, tuple(op.key(self) for op in ops))
        entry = cuda_graphs.graphs.lookup(key)
        if isinstance(entry, str) and entry == SEEN:
            entry = self._capture(ops, workspace)
            cuda_graphs.graphs.store(key, FAILED if entry is None else entry)
        if not isinstance(entry, Captured):
            return False
        try:
            entry.graph.launch(stream=self.stream)
            cuda_graphs.graphs.replays += 1
            if cuda_ops.CHECK_LAUNCHES:
                self.synchronize()
        except Exception as exc:
            raise RuntimeError(f"rnn_gpu cupy backend: replaying a captured time loop of "
                               f"{len(ops)} operations (the first: {ops[0].describe()}) "
                               f"failed: {type(exc).__name__}: {exc}") from exc
        return True

    def _capture(self, ops: list, workspace=None) -> Captured | None:
        """``ops`` captured as a CUDA graph on the capture stream, or None after a failure
        (then capture is off for the process, with a warning naming what failed)."""
        failure = None
        graph = None
        with cuda_graphs.capture_lock:
            stream = cuda_graphs.capture_stream(self.index)
            try:
                self.blas.handle(self.index)    # no cuBLAS handle may be created in a capture
            except Exception as exc:
                failure = f"creating a cuBLAS handle: {type(exc).__name__}: {exc}"
            if failure is None:
                failure, graph = self._record(stream, ops)
        if failure is not None or graph is None:
            cuda_graphs.turn_capture_off(f"capturing the time loop as a CUDA graph failed "
                                         f"({failure or 'no graph came back'})")
            self.blas = None        # the rest of this call: plain launches, CuPy's cuBLAS
            return None
        return Captured(graph, tuple(ops), workspace)

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
                run_ops(self, ops)
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


def compute_type(dtype: str) -> int:
    """IEEE float32 unless the caller allowed TF32 (DESIGN §3); fp16/bf16 accumulate in fp32."""
    if dtype == "float32" and _config.tf32_allowed():
        return CUBLAS_COMPUTE_32F_FAST_TF32
    return CUBLAS_COMPUTE_32F
