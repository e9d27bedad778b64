"""A reader thread: produce the next items (disk reads) while the current batch computes.

NumPy's file reads and the BLAS calls of the recurrence both release the GIL, so one thread
reading ahead hides most of the I/O on the CPU too. The queue is bounded: at most ``depth``
items wait, which is what keeps host memory at "a few batches".
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate ``items`` in a daemon thread, ``depth`` items ahead of the consumer.

    An exception in the producer is re-raised in the consumer. When the consumer stops early
    (an error, Ctrl-C, a generator closed), the producer stops at its next item.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            put(_Failure(exc))
            return
        put(_DONE)

    # daemon: a run killed by Ctrl-C must not wait for a read in flight to finish
    thread = threading.Thread(target=produce, name="rnn-gpu-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
