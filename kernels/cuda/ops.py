"""The operations a cupy-backend call is made of: a kernel launch (``Launch``) or a cuBLAS GEMM
(``Gemm``), each with a key that holds every address and scalar it uses (what a captured CUDA
graph froze) and a description for error messages; ``run_ops`` runs them on a device."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .cublas import (
    CUBLAS_GEMM_DEFAULT,
    CUBLAS_MAX_DIM,
    CUBLAS_OP_N,
    CUBLAS_OP_T,
    CUDA_DATA_TYPES,
    ONE,
    ZERO,
)

# Synchronize after every launch and GEMM outside captures, so that an asynchronous fault is
# reported with the name of the kernel that caused it (slow; for debugging and the GPU tests).
CHECK_LAUNCHES = os.environ.get("RNN_GPU_CUPY_CHECK_LAUNCHES", "") not in ("", "0")


def arg_key(dev, a) -> Any:
    if a is None:
        return 0
    if isinstance(a, np.generic):
        return (a.dtype.char, a.item())
    return ("p", dev.ptr(a))


def check_arg(a) -> None:
    # Kernel parameters are `long long`, `float` or pointers (see recurrent.cu): a Python int
    # or a numpy.int32 would reach the kernel with the wrong size, so only these are accepted.
    if a is None or isinstance(a, (np.int64, np.float32)):
        return
    if not isinstance(a, (np.generic, int, float)) and hasattr(a, "shape"):
        return
    raise TypeError(f"kernel argument {a!r} ({type(a).__name__}): expected an array, None, "
                    "numpy.int64 or numpy.float32")


@dataclass(frozen=True, eq=False)
class Launch:
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
            check_arg(a)

    def key(self, dev) -> tuple:
        return ("k", self.name, self.grid, self.block, self.shared_mem, self.cooperative,
                tuple(arg_key(dev, a) for a in self.args))

    def run(self, dev) -> None:
        dev.launch(self)

    def describe(self) -> str:
        smem = f", {self.shared_mem} B of dynamic shared memory" if self.shared_mem else ""
        coop = ", cooperative" if self.cooperative else ""
        return f"kernel {self.name} (grid {self.grid} x block {self.block}{smem}{coop})"


@dataclass(frozen=True)
class Gemm:
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

    def __post_init__(self):
        # gemmEx takes m, n, k and the leading dimensions as C ints; ctypes (the captured
        # path's RawCublas) wraps a larger Python int silently, so that k = 2**32 + 5 would
        # sum over 5 rows. The backend declines such problems up front (CUBLAS_MAX_DIM in
        # backends/cupy.py); this is the net under it.
        _, _, n, m, k, _, _, _, lda, _, _, ldb, _, _, _, ldc, _, _ = self.cublas_args()
        for name, v in (("m", m), ("n", n), ("k", k), ("lda", lda), ("ldb", ldb),
                        ("ldc", ldc)):
            if not 0 <= v <= CUBLAS_MAX_DIM:
                raise ValueError(f"cuBLAS gemmEx takes 32-bit dimensions: {name} = {v} is "
                                 f"outside 0..{CUBLAS_MAX_DIM} ({self.describe()})")

    def cublas_args(self) -> tuple:
        """gemmEx's arguments after the handle. cuBLAS is column-major, where a row-major X is
        Xᵀ: C = op(A)·op(B) is computed as Cᵀ = op(B)ᵀ·op(A)ᵀ, i.e. with A and B swapped."""
        transa = CUBLAS_OP_T if self.trans_b else CUBLAS_OP_N
        transb = CUBLAS_OP_T if self.trans_a else CUBLAS_OP_N
        lda = self.k if self.trans_b else self.n
        ldb = self.m if self.trans_a else self.k
        beta = ONE if self.beta else ZERO
        return (transa, transb, self.n, self.m, self.k, ONE.ctypes.data, self.b, self.ab_type,
                lda, self.a, self.ab_type, ldb, beta.ctypes.data, self.c, self.c_type, self.n,
                self.compute, CUBLAS_GEMM_DEFAULT)

    def key(self, dev) -> tuple:
        return ("g", self)

    def run(self, dev) -> None:
        dev.gemm(self)

    def describe(self) -> str:
        ab = DATA_TYPE_NAMES.get(self.ab_type, self.ab_type)
        c = DATA_TYPE_NAMES.get(self.c_type, self.c_type)
        return (f"cuBLAS gemmEx C[{self.m}x{self.n}] ({c}) = {'Aᵀ' if self.trans_a else 'A'}"
                f" {'Bᵀ' if self.trans_b else 'B'} ({ab}, k={self.k}) + {self.beta} C, compute "
                f"type {self.compute}")


DATA_TYPE_NAMES = {v: k for k, v in CUDA_DATA_TYPES.items()}


def run_op(dev, op) -> None:
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


def run_ops(dev, ops) -> None:
    for op in ops:
        run_op(dev, op)
