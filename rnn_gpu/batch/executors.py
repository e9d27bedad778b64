"""Executors: who runs :func:`~rnn_gpu.batch.apply.apply_batch` on the batches of a job.

An executor has a ``name``, a ``map`` and a ``close``; ``rnn-gpu run`` does the reading,
writing, manifest and progress itself and only hands batches to the executor, so the local
path and Dask (``rnn_gpu.dask.DaskExecutor``) share everything but the running.

``map(model, batches, *, emit, backend)`` takes an iterable of ``(key, x, lengths)``, ``x`` a
NumPy ``(B, T, I)`` batch and ``lengths`` ``(B,)`` ints or None, and yields ``(key, output)``
with ``output = apply_batch(model, x, lengths, emit=emit, backend=backend)``, in any order. It
pulls batches lazily, keeping a bounded number in flight. An executor may count the batches it
had to retry in ``batches_retried`` (the run's summary reports it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from .apply import apply_batch

# Matched by type name so that neither torch nor cupy has to be imported to recognise them:
# MemoryError (NumPy), torch.cuda.OutOfMemoryError, cupy.cuda.memory.OutOfMemoryError.
_OOM_TYPE_NAMES = frozenset({"MemoryError", "OutOfMemoryError"})


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the out-of-memory errors of NumPy, torch and CuPy (and their subclasses)."""
    return any(cls.__name__ in _OOM_TYPE_NAMES for cls in type(exc).__mro__)


class OutOfMemory(RuntimeError):
    """Even a batch of one sequence does not fit."""


class LocalExecutor:
    """Runs batches in this process, one after another, in order.

    On an out-of-memory error the batch is split in halves and each half retried (recursively,
    down to one sequence). The size that worked becomes the ceiling for later batches, so that
    a batch size too large for the device costs one failed attempt, not one per batch.
    """

    name = "local"

    def __init__(self, *, device: str = "cpu", log: Callable[[str], None] | None = None):
        self.device = device
        self.batches_retried = 0
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._ceiling: int | None = None       # largest batch known to fit after an OOM
        self._staging = _HostStaging(device)

    def map(self, model, batches: Iterable[tuple[Any, np.ndarray, Any]], *, emit: str,
            backend: str | None) -> Iterator[tuple[Any, np.ndarray]]:
        for key, x, lengths in batches:          # lazily: one batch in flight at a time
            yield key, self._run(model, x, lengths, emit, backend)

    def close(self) -> None:
        self._staging = _HostStaging(self.device)

    def _run(self, model, x, lengths, emit, backend) -> np.ndarray:
        size = len(x)
        if self._ceiling is not None and size > self._ceiling:
            return self._in_parts(model, x, lengths, emit, backend, self._ceiling)
        try:
            return apply_batch(model, self._staging.to_device(x), lengths, emit=emit,
                               backend=backend)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            if size <= 1:
                raise OutOfMemory(f"out of memory ({type(exc).__name__}) even for a batch of "
                                  "one sequence; the model or the sequence length is too "
                                  "large for this device") from exc
        self.batches_retried += 1
        half = (size + 1) // 2
        self._ceiling = half if self._ceiling is None else min(self._ceiling, half)
        self._log(f"rnn-gpu run: out of memory on a batch of {size} sequences; retrying it in "
                  f"batches of {half}")
        return self._in_parts(model, x, lengths, emit, backend, half)

    def _in_parts(self, model, x, lengths, emit, backend, size: int) -> np.ndarray:
        parts = [self._run(model, x[i:i + size], None if lengths is None else lengths[i:i + size],
                           emit, backend)
                 for i in range(0, len(x), size)]
        return np.concatenate(parts, axis=0)


class _HostStaging:
    """Host-to-device copies for a CUDA run.

    On the CPU, batches go to the model as they are. On CUDA with torch present, a batch is
    copied into a reused page-locked (pinned) host buffer and sent with ``non_blocking=True``;
    the disk read of the next batch already overlaps the compute through the reader thread
    (:mod:`rnn_gpu.batch.prefetch`). The buffer is reused only after ``apply_batch`` returned a
    host array, which synchronises the device, so the copy out of it has finished by then.
    Without torch (a CuPy-only machine) the batch is copied with ``cupy.asarray``, unpinned.
    """

    def __init__(self, device: str):
        self.device = device
        self._pinned = None

    def to_device(self, x: np.ndarray):
        if not self.device.startswith("cuda"):
            return x
        try:
            import torch
        except ImportError:          # the model is on CUDA through CuPy then; no pinning here
            import cupy

            index = int(self.device.partition(":")[2] or 0)
            with cupy.cuda.Device(index):
                return cupy.asarray(x)
        src = torch.from_numpy(np.ascontiguousarray(x))
        if self._pinned is None or self._pinned.numel() < src.numel() or (
                self._pinned.dtype != src.dtype):
            self._pinned = torch.empty(src.numel(), dtype=src.dtype, pin_memory=True)
        staged = self._pinned[:src.numel()].view(src.shape)
        staged.copy_(src)
        return staged.to(self.device, non_blocking=True)
