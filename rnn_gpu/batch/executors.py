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

from .._arrays import is_out_of_memory
from .apply import apply_batch


class OutOfMemory(RuntimeError):
    """Even a batch of one sequence does not fit."""


class LocalExecutor:
    """Runs batches in this process, one after another, in order.

    On CUDA with torch, ``map`` looks one batch ahead: the host-to-device copy of batch i+1 is
    issued on a copy stream before batch i computes, so the transfer runs during batch i's
    compute instead of before batch i+1's (see :class:`_HostStaging`). That holds one more
    batch in host and device memory. On the CPU batches are used as they are, without lookahead.

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
        if not self._staging.lookahead:
            for key, x, lengths in batches:      # lazily: one batch in flight at a time
                yield key, self._run(model, x, lengths, emit, backend)
            return
        batches = iter(batches)
        item = next(batches, None)
        ahead = self._stage(item)
        while item is not None:
            following = next(batches, None)
            # issued before batch i is computed: the copy overlaps that compute
            current, ahead = [ahead], self._stage(following)
            key, x, lengths = item
            # pop(): only _run holds the staged batch, so it can free it before retrying halves
            yield key, self._run(model, x, lengths, emit, backend, current.pop())
            item = following

    def close(self) -> None:
        self._staging = _HostStaging(self.device)

    def _stage(self, item):
        """Start the copy of a batch ahead of its turn; None when it will be sent in parts
        anyway (above the ceiling) or the device has no room for it now (``_run`` then copies
        it itself, and halves it if it really does not fit)."""
        if item is None or (self._ceiling is not None and len(item[1]) > self._ceiling):
            return None
        try:
            return self._staging.stage(item[1])
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            return None

    def _run(self, model, x, lengths, emit, backend, staged=None) -> np.ndarray:
        size = len(x)
        if self._ceiling is not None and size > self._ceiling:
            return self._in_parts(model, x, lengths, emit, backend, self._ceiling)
        try:
            return apply_batch(model, self._staging.to_device(x) if staged is None
                               else self._staging.ready(staged), lengths, emit=emit,
                               backend=backend)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            if size <= 1:
                raise OutOfMemory(f"out of memory ({type(exc).__name__}) even for a batch of "
                                  "one sequence; the model or the sequence length is too "
                                  "large for this device") from exc
        staged = None              # free the whole batch on the device before its halves go
        self.batches_retried += 1
        half = (size + 1) // 2
        self._ceiling = half if self._ceiling is None else min(self._ceiling, half)
        self._log(f"rnn-gpu run: out of memory on a batch of {size} sequences; retrying it in "
                  f"batches of {half}")
        return self._in_parts(model, x, lengths, emit, backend, half)

    def _in_parts(self, model, x, lengths, emit, backend, size: int) -> np.ndarray:
        # the parts are copied from the host slices one by one, without lookahead: simple, and
        # a retry is rare
        parts = [self._run(model, x[i:i + size], None if lengths is None else lengths[i:i + size],
                           emit, backend)
                 for i in range(0, len(x), size)]
        return np.concatenate(parts, axis=0)


class _HostStaging:
    """Host-to-device copies for a CUDA run.

    On the CPU, batches go to the model as they are. Without torch (a CuPy-only machine) a
    batch is copied with ``cupy.asarray``, unpinned and synchronously. On CUDA with torch:

    * A batch is copied into a page-locked (pinned) host buffer, the only memory the GPU's copy
      engine can read while the host goes on (from pageable memory the copy is synchronous).
    * The copy to the device is issued on a dedicated copy stream, so that it runs while the
      compute stream works on the previous batch; an event recorded after it marks it done.
    * Two pinned buffers take turns (double buffering): batch i+1 is written into one while the
      copy of batch i may still be reading the other. Before a buffer is written again, the host
      waits for the event of the copy that last read it.
    * :meth:`ready` makes the compute stream wait for that event, and calls ``record_stream``:
      the device tensor was allocated on the copy stream, and without it the caching allocator
      could hand its memory out again as soon as it is freed, while kernels queued on the
      compute stream still read it.

    The disk read of the next batch overlaps the compute through the reader thread
    (:mod:`rnn_gpu.batch.prefetch`).
    """

    def __init__(self, device: str):
        self.device = device
        self.lookahead = False         # True when stage() is asynchronous (CUDA through torch)
        self.copy_stream = None
        self.copies = 0                # asynchronous copies issued (the GPU tests look)
        self._pinned: list[Any] = [None, None]
        self._events: list[Any] = [None, None]   # per buffer: the last copy that read it
        self._turn = 0
        if device.startswith("cuda"):
            try:
                import torch
            except ImportError:        # the model is on CUDA through CuPy then
                return
            if not torch.cuda.is_available():     # a CPU build of torch beside CuPy: the same
                return
            self._torch = torch
            self.lookahead = True

    def to_device(self, x: np.ndarray):
        """``x`` on the device, ready for the compute stream."""
        return self.ready(self.stage(x))

    def stage(self, x: np.ndarray):
        """Start copying ``x`` to the device; pass the result to :meth:`ready`."""
        if not self.device.startswith("cuda"):
            return x
        if not self.lookahead:
            import cupy

            index = int(self.device.partition(":")[2] or 0)
            with cupy.cuda.Device(index):
                return cupy.asarray(x)
        torch = self._torch
        if self.copy_stream is None:
            self.copy_stream = torch.cuda.Stream(device=self.device)
        src = torch.from_numpy(np.ascontiguousarray(x))
        turn, self._turn = self._turn, 1 - self._turn
        if self._events[turn] is not None:
            self._events[turn].synchronize()     # its last copy has read the buffer
        pinned = self._pinned[turn]
        if pinned is None or pinned.numel() < src.numel() or pinned.dtype != src.dtype:
            pinned = self._pinned[turn] = torch.empty(src.numel(), dtype=src.dtype,
                                                      pin_memory=True)
        host = pinned[:src.numel()].view(src.shape)
        host.copy_(src)
        with torch.cuda.stream(self.copy_stream):
            on_device = host.to(self.device, non_blocking=True)
        done = torch.cuda.Event()
        done.record(self.copy_stream)
        self._events[turn] = done
        self.copies += 1
        return on_device, done

    def ready(self, staged):
        """The staged batch, usable by work queued on the current (compute) stream."""
        if not self.lookahead:
            return staged
        on_device, done = staged
        compute = self._torch.cuda.current_stream(self.device)
        compute.wait_event(done)
        on_device.record_stream(compute)
        return on_device
