"""The host-side building blocks of the cupy backend's algorithms (``backends/cupy.py``): a
pointwise kernel of ``recurrent.cu`` as a :class:`~.ops.Launch`, a row-major cuBLAS GEMM as a
:class:`~.ops.Gemm`, conversions to and from float32, raw copies and the weight-gradient
GEMMs. Each takes the device (``CupyDevice`` or the tests' emulation) as its first argument."""

from __future__ import annotations

import numpy as np

from .cublas import CUDA_DATA_TYPES
from .ops import Gemm, Launch

THREADS = 256                          # block size of the pointwise kernels


def i64(v: int) -> np.int64:
    return np.int64(v)


def grid_for(n: int) -> int:
    return max(1, -(-n // THREADS))


def contiguous(dev, a):
    return a if a.flags.c_contiguous else dev.contiguous(a)


def time_of(s: int, T: int, reverse: bool) -> int:
    return T - 1 - s if reverse else s


def pointwise(dev, base: str, *template_args: int, n: int, args: tuple) -> Launch:
    name, fn = dev.kernel("recurrent", base, *template_args)
    return Launch(name, fn, grid_for(n), THREADS, tuple(args))


def gemm(dev, m: int, n: int, k: int, a: int, b: int, c: int, *, trans_a: bool = False,
          trans_b: bool = False, beta: int = 0) -> Gemm:
    """A and B in the compute dtype, C in float32."""
    return Gemm(m, n, k, a, trans_a, b, trans_b, c, CUDA_DATA_TYPES[dev.dtype_name],
                 CUDA_DATA_TYPES["float32"], beta, dev.compute)


def to_f32(dev, a, what: str, out=None):
    out = dev.empty(a.shape, np.float32, what) if out is None else out
    dev.run([pointwise(dev, "cast_to_f32", n=a.size, args=(a, out, i64(a.size)))])
    return out


def from_f32(dev, a32, what: str):
    out = dev.empty(a32.shape, dev.dtype, what)
    dev.run([pointwise(dev, "cast_from_f32", n=a32.size, args=(a32, out, i64(a32.size)))])
    return out


def filled(dev, n: int, value: float, what: str):
    out = dev.empty((n,), dev.dtype, what)
    dev.run([pointwise(dev, "fill_value", n=n, args=(out, np.float32(value), i64(n)))])
    return out


def copied(dev, a, what: str):
    out = dev.empty(a.shape, a.dtype, what)
    copy_into(dev, out, a)
    return out


def copy_into(dev, dst, src, offset: int = 0) -> None:
    """The bytes of contiguous ``src`` into ``dst`` from byte ``offset`` on (a workspace
    buffer of the same dtype)."""
    if offset + src.nbytes > dst.nbytes or np.dtype(src.dtype) != np.dtype(dst.dtype):
        raise ValueError(f"cannot copy {src.nbytes} bytes of {src.dtype} into {dst.nbytes} "
                         f"bytes of {dst.dtype} at offset {offset}")
    dev.copy_raw(dev.ptr(dst) + offset, dev.ptr(src), src.nbytes)


def stacked(dev, mats: list, what: str, out=None):
    """Row-wise concatenation of contiguous (r_i, H) matrices, by raw copies (into ``out``, a
    workspace buffer, when given)."""
    if out is None:
        rows = sum(m.shape[0] for m in mats)
        out = dev.empty((rows, mats[0].shape[1]), dev.dtype, what)
    offset = 0
    for m in mats:
        copy_into(dev, out, m, offset)
        offset += m.nbytes
    return out


def outer_grad(dev, d, x, what: str):
    """``dᵀ x`` over all T*B rows -> (cols of d, cols of x) in the compute dtype."""
    rows, n_d, n_x = d.size // d.shape[-1], d.shape[-1], x.shape[-1]
    out = dev.empty((n_d, n_x), np.float32, what)
    dev.run([gemm(dev, n_d, n_x, rows, dev.ptr(d), dev.ptr(x), dev.ptr(out), trans_a=True)])
    return from_f32(dev, out, what)


def bias_grad(dev, d, ones, what: str):
    """``1ᵀ d`` over all T*B rows (a GEMM with a ones vector: fp32 accumulation for every
    dtype without asking CuPy to reduce bfloat16)."""
    rows, n_d = d.size // d.shape[-1], d.shape[-1]
    out = dev.empty((n_d,), np.float32, what)
    dev.run([gemm(dev, 1, n_d, rows, dev.ptr(ones), dev.ptr(d), dev.ptr(out))])
    return from_f32(dev, out, what)
