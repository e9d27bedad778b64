"""CUDA-graph capture of the graph path's time loops (backends/cupy.py explains the design):
the cache of loops seen and captured, the process-wide capture state, and the workspaces (with
their call tables) that make one loop serve every call of its shape on a stream."""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from rnn_gpu import _warnings

GRAPH_CACHE_SIZE = 16                  # time loops remembered (seen once, or captured)
# Field order of the call tables in recurrent.cu (the per-call addresses the graph path's step
# kernels read from device memory; tests/test_cupy_compile.py compares the two).
CALL_TABLES = {
    "GatedFwdCall": ("xw", "bias", "lengths", "y", "gates", "ctape", "hprev"),
    "GatedBwdCall": ("dy", "gates", "ctape", "c0", "hprev", "lengths", "dxw", "dhh"),
    "TwoStageFwdCall": ("xw", "bias", "lengths", "y", "atape", "htape", "hprev"),
    "TwoStageBwdCall": ("dy", "atape", "htape", "lengths", "dph", "dxw"),
}

NEW, SEEN, FAILED = "new", "seen", "failed"


@dataclass(frozen=True, eq=False)
class Captured:
    """A captured time loop: the CUDA graph, the operations it was captured from (held so
    that the kernels' modules live as long as the graph that launches them) and the workspace
    whose addresses it uses."""

    graph: Any
    ops: tuple
    workspace: Any = None


class GraphCache:
    """What to do with a time loop (a tuple of operation keys): ``NEW`` the first time (run
    it plainly), ``SEEN`` the second (capture it), then the captured graph (replay it), or
    ``FAILED`` after a capture that failed (run it plainly, without retrying)."""

    def __init__(self):
        self._entries: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.replays = 0                  # graphs launched from the cache (tests, benchmarks)

    def lookup(self, key) -> Any:
        with self._lock:
            if key not in self._entries:
                self._put(key, SEEN)
                return NEW
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


graphs = GraphCache()


class Workspace:
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


class WorkspaceCache:
    """Workspaces by (device, stream, loop signature), least recently used dropped beyond
    ``GRAPH_CACHE_SIZE`` (a captured graph keeps its own workspace alive through its
    operations' arguments, so dropping one here never frees memory a graph still uses)."""

    def __init__(self):
        self._entries: OrderedDict[Any, Workspace] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, make) -> Workspace:
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


workspaces = WorkspaceCache()


@contextlib.contextmanager
def workspace(dev, signature: tuple, table: str, buffers: dict[str, tuple]):
    """The time loop's workspace, held for the call: a kept one with capture on (the same
    addresses for every call of this signature on this stream), else a fresh one."""
    def make():
        return Workspace(dev, table, buffers)

    ws = (workspaces.get((dev.index, stream_key(dev.stream.ptr), dev.dtype_name, *signature),
                         make)
          if dev.graphs else make())
    with ws.lock:
        yield ws


CUDA_STREAM_PER_THREAD = 2     # cudaStreamPerThread: one handle, a different stream per thread


def stream_key(ptr: int):
    """What identifies the caller's stream across calls: its handle, and for the per-thread
    default stream (``cupy.cuda.Stream.ptds``) also the thread, since that one handle names
    another stream in each thread and two threads' loops would run concurrently on one
    workspace."""
    return (ptr, threading.get_ident()) if ptr == CUDA_STREAM_PER_THREAD else ptr


def clear_graphs() -> None:
    """Forgets every captured time loop and kept workspace (their GPU memory returns to CuPy's
    pool once no call still uses it)."""
    graphs.clear()
    workspaces.clear()
capture_lock = threading.Lock()        # one capture at a time: the capture stream is shared
_capture_streams: dict[int, Any] = {}
capture_off: list[str] = []            # why capture is off for this process (after a failure)


def capture_stream(index: int):
    """A non-blocking stream per device for captures (the legacy default stream cannot
    capture); the captured graph is launched on the caller's stream. Under capture_lock."""
    import cupy

    stream = _capture_streams.get(index)
    if stream is None:
        stream = _capture_streams[index] = cupy.cuda.Stream(non_blocking=True)
    return stream


def turn_capture_off(reason: str) -> None:
    """Capture stays off for the rest of the process after a failure: one warning, not one per
    call (a capture that failed once fails for a reason that does not go away)."""
    with capture_lock:
        first = not capture_off
        capture_off.append(reason)
    if first:
        _warnings.warn(f"rnn_gpu cupy backend: {reason}; running the steps as plain launches "
                       f"from now on (rnn_gpu.backends.cupy.USE_GRAPH = False skips the "
                       f"attempt)", RuntimeWarning)
