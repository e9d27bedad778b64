"""Process-wide switches."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_TF32 = False
_tf32_scope: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "rnn_gpu_tf32", default=None)


def allow_tf32(enabled: bool = True) -> None:
    """Let GPU backends use TF32 tensor cores for float32 (off by default: float32 means IEEE
    float32). ``rnn_gpu.torch`` layers follow ``torch.backends.cudnn.allow_tf32`` instead."""
    global _TF32
    _TF32 = bool(enabled)


@contextlib.contextmanager
def tf32_scope(enabled: bool) -> Iterator[None]:
    """Within the block, TF32 is ``enabled`` whatever :func:`allow_tf32` said (the torch
    drop-ins wrap each call in it with ``torch.backends.cudnn.allow_tf32``)."""
    token = _tf32_scope.set(bool(enabled))
    try:
        yield
    finally:
        _tf32_scope.reset(token)


def tf32_allowed() -> bool:
    scoped = _tf32_scope.get()
    return _TF32 if scoped is None else scoped
