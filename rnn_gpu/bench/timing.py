"""How a call is timed, and how the runners of one case share the machine fairly.

:class:`CpuTimer` is ``time.perf_counter`` around a synchronous call. :class:`CudaEventTimer`
records CUDA events on the current stream around the call and reads ``elapsed_time`` after
synchronising on the end event, so it measures the GPU's time for the work the call queued,
not the Python that queued it. :class:`CudaEventClock` is the same events as a clock (seconds
since a reference event), which is what asv's ``timer`` attribute wants. :func:`timer_for` is
the one place that picks a timer by device.

:func:`measure` interleaves the runners call by call (A B A B ..., the order rotating), each
timed call right after an untimed one of the same runner. On a noisy machine this spreads
bursts of noise over all runners instead of over whichever ran during a burst. (An idle gap
before each call instead was tried and rejected: after ~0.1 s idle this VM's scheduler needs
tens of ms to spread two threads over the two cores again, which measures the wake-up, not
the kernels: RNN 128x256x128 34 ms back to back, 59 ms after a 0.15 s sleep.)
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Timing:
    """Seconds per call of one runner on one case."""

    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        return min(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the samples were."""
        return (max(self.samples) - min(self.samples)) / self.median if self.samples else 0.0


class CpuTimer:
    """Wall-clock seconds of one synchronous call."""

    device = "cpu"

    def __call__(self, fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


class CudaEventTimer:
    """GPU seconds of the work one call queues on the current stream of ``device``.

    The stream is synchronised before the start event, so work queued earlier (the untimed
    warm-up call) is not billed to this call.
    """

    def __init__(self, device: str = "cuda"):
        import torch

        self.device = device
        self._torch = torch

    def __call__(self, fn: Callable[[], object]) -> float:
        torch = self._torch
        with torch.cuda.device(self.device):
            _check_one_stream(torch)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3


def _check_one_stream(torch) -> None:
    """The events are on torch's current stream; the cupy backend queues on CuPy's. Both are
    the legacy default stream unless a caller changed one, and then the end event would not
    wait for CuPy's kernels: refused rather than timed short."""
    cupy = sys.modules.get("cupy")
    if cupy is None:
        return
    ours, theirs = torch.cuda.current_stream().cuda_stream, cupy.cuda.get_current_stream().ptr
    if ours != theirs:
        raise RuntimeError(f"timing: torch's current stream ({ours:#x}) is not CuPy's "
                           f"({theirs:#x}); CUDA events on torch's would not wait for work "
                           f"queued on CuPy's. Time with both on the same stream")


class CudaEventClock:
    """A monotonic clock read off CUDA events: seconds since a reference event.

    Each reading records an event on the current stream and waits for it, so the difference of
    two readings is the GPU time of everything queued in between: asv's ``timer`` attribute
    turns its own repeat loop into CUDA-event timings this way.
    """

    def __init__(self, device: str = "cuda"):
        import torch

        self._torch = torch
        self.device = device
        with torch.cuda.device(device):
            torch.cuda.synchronize()
            self._origin = torch.cuda.Event(enable_timing=True)
            self._origin.record()

    def __call__(self) -> float:
        torch = self._torch
        with torch.cuda.device(self.device):
            now = torch.cuda.Event(enable_timing=True)
            now.record()
            now.synchronize()
            return self._origin.elapsed_time(now) / 1e3


def timer_for(device: str):
    """The timer for a device: CPU wall clock, or CUDA events on ``cuda``/``cuda:N``."""
    if device == "cpu":
        return CpuTimer()
    if device.startswith("cuda"):
        return CudaEventTimer(device)
    raise ValueError(f"device: expected 'cpu' or 'cuda[:N]', got {device!r}")


def measure(fns: dict[str, Callable[[], object]], *, timer, repeats: int,
            warm_each: bool = True) -> dict[str, Timing]:
    """Time every callable ``repeats`` times, alternating between them call by call.

    With ``warm_each`` every timed call comes right after an untimed call of the same runner:
    each runner is measured in its steady state (its own threads awake and placed on the
    cores, as when a model processes batch after batch), and the previous runner's
    idle-spinning worker threads (OpenBLAS spins ~0.1 s of CPU after a multi-threaded call,
    libgomp ~10 ms) have run out during the untimed call. The order rotates per repetition.
    """
    names = list(fns)
    timings = {name: Timing() for name in names}
    for name in names:
        fns[name]()
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if warm_each:
                fns[name]()
            timings[name].samples.append(timer(fns[name]))
    return timings
