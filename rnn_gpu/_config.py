"""Process-wide switches."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from . import _checks

_TF32 = False
FLOAT32_PRECISIONS = ("ieee", "tf32x3", "tf32")
_FLOAT32 = "ieee"
_tf32_scope: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "rnn_gpu_tf32", default=None)


def allow_tf32(enabled: bool = True) -> None:
    """Let GPU backends use TF32 tensor cores for float32 (off by default: float32 means IEEE
    float32). ``rnn_gpu.torch`` layers follow ``torch.backends.cudnn.allow_tf32`` instead."""
    global _TF32
    _TF32 = _checks.flag("enabled", enabled)


@contextlib.contextmanager
def tf32_scope(enabled: bool) -> Iterator[None]:
    """Within the block, TF32 is ``enabled`` whatever :func:`allow_tf32` said (the torch
    drop-ins wrap each call in it with ``torch.backends.cudnn.allow_tf32``)."""
    token = _tf32_scope.set(bool(enabled))
    try:
        yield
    finally:
        _tf32_scope.reset(token)


_cpu_threads: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "rnn_gpu_cpu_threads", default=None)


@contextlib.contextmanager
def cpu_threads_scope(n: int | None) -> Iterator[None]:
    """Within the block, CPU backends use at most ``n`` threads (``RNN_GPU_NUM_THREADS``, when
    set, still decides). The torch drop-ins wrap each call in it with torch.get_num_threads(),
    so that torch.set_num_threads(1) (DataLoader workers, one process a core) holds for them as
    it does for torch.nn; before, they took every usable core whatever torch was told."""
    token = _cpu_threads.set(n)
    try:
        yield
    finally:
        _cpu_threads.reset(token)


def cpu_threads_cap() -> int | None:
    return _cpu_threads.get()


def tf32_allowed() -> bool:
    scoped = _tf32_scope.get()
    return _TF32 if scoped is None else scoped


def set_float32_precision(precision: str) -> None:
    """How GPU backends multiply float32 when TF32 is not allowed.

    ``"ieee"`` (the default, DESIGN §3): IEEE float32 products, on the CUDA cores.
    ``"tf32x3"``: each float32 operand split into a TF32 high and a TF32 low part, three
    tensor-core products summed in float32 (the low x low term dropped), so each product keeps
    ~22 of float32's 24 mantissa bits; errors against float64 stay at float32's order (checked
    against torch.nn in float64 by the tests), at a fraction of the IEEE kernel's time (H100,
    LSTM 256x4096x256 forward step: 59-72 against 173 us). The layers' GEMMs around the kernels
    on torch CUDA tensors follow it too (:mod:`rnn_gpu._matmul`). A backend with no such path
    (cupy, numpy) computes IEEE float32, which is at least as precise. ``"tf32"`` is the same
    as :func:`allow_tf32`, and ``"ieee"`` or ``"tf32x3"`` turn an earlier ``allow_tf32(True)``
    off: one setting, the last one made."""
    global _FLOAT32, _TF32
    if precision not in FLOAT32_PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(FLOAT32_PRECISIONS)}, got "
                         f"{precision!r}")
    _TF32 = precision == "tf32"
    _FLOAT32 = "ieee" if precision == "tf32" else precision


def float32_precision() -> str:
    """The precision GPU backends use for float32 products in this context: ``"tf32"`` where
    TF32 is allowed (:func:`allow_tf32`, or the torch layers' ``cudnn.allow_tf32``), else the
    setting of :func:`set_float32_precision`."""
    return "tf32" if tf32_allowed() else _FLOAT32


@contextlib.contextmanager
def float32_precision_set(precision: str) -> Iterator[None]:
    """:func:`set_float32_precision` for the block, the previous setting restored after it
    (``rnn-gpu bench --float32-precision`` runs inside one, also when called in-process)."""
    global _FLOAT32, _TF32
    previous = _FLOAT32, _TF32
    set_float32_precision(precision)
    try:
        yield
    finally:
        _FLOAT32, _TF32 = previous
