"""cuBLAS for the cupy backend: the enums its GEMMs use, and ``cublasGemmEx`` through ctypes on
handles of our own (``RawCublas``), the only GEMM that may run while a stream captures a CUDA
graph (CuPy's wrappers refuse; see backends/cupy.py)."""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator

import numpy as np

# cuBLAS / CUDA enums (cublas_api.h, library_types.h).
CUDA_DATA_TYPES = {"float32": 0, "float16": 2, "bfloat16": 14}
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 77
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_POINTER_MODE_HOST = 0
# gemmEx's m, n, k, lda, ldb and ldc are C ints (the 32-bit API; the _64 variants are newer
# than the cuBLAS this backend supports).
CUBLAS_MAX_DIM = 2**31 - 1

# gemmEx reads alpha and beta through host pointers (float32 for the 32F compute types).
ONE = np.ones(1, np.float32)
ZERO = np.zeros(1, np.float32)

CUBLAS_STATUS = {0: "CUBLAS_STATUS_SUCCESS", 1: "CUBLAS_STATUS_NOT_INITIALIZED",
                 3: "CUBLAS_STATUS_ALLOC_FAILED", 7: "CUBLAS_STATUS_INVALID_VALUE",
                 8: "CUBLAS_STATUS_ARCH_MISMATCH", 11: "CUBLAS_STATUS_MAPPING_ERROR",
                 13: "CUBLAS_STATUS_EXECUTION_FAILED", 14: "CUBLAS_STATUS_INTERNAL_ERROR",
                 15: "CUBLAS_STATUS_NOT_SUPPORTED", 16: "CUBLAS_STATUS_LICENSE_ERROR"}


class RawCublas:
    """``cublasGemmEx`` called through ctypes, on cuBLAS handles of this module's own (one per
    thread and device, created on first use outside any capture, pointer mode host, never
    destroyed). Why: CuPy's wrappers raise while a stream captures (backends/cupy.py), cuBLAS
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


_raw: list = []
_raw_lock = threading.Lock()


def raw_cublas() -> RawCublas | str:
    """The ctypes cuBLAS (or the reason there is none), tried once per process."""
    with _raw_lock:
        if not _raw:
            _raw.append(load_raw_cublas())
        return _raw[0]


def load_raw_cublas() -> RawCublas | str:
    tried = []
    for path in dict.fromkeys(cublas_candidates()):
        try:
            return RawCublas(ctypes.CDLL(path), path)
        except (OSError, AttributeError) as exc:
            tried.append(f"{path}: {exc}")
    return f"no usable libcublas ({'; '.join(tried) or 'none found'})"


def cublas_candidates() -> Iterator[str]:
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
