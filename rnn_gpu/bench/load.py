"""How busy the machine was with other work while a case was timed.

On a loaded CPU the timings stop meaning anything, and not evenly: torch's worker threads spin
while they wait for work and collapse when other processes hold the cores, while the NumPy
backend's threads sleep. On this project's 2-core VM, with a test run beside it, torch.nn's RNN
at 128x256x128 took 1902 ms against 38.5 ms with OMP_WAIT_POLICY=PASSIVE, and the table read
as a 40x win; every sample was slow alike, so the spread gave no warning. So each case measures
the CPU time the rest of the machine used while it ran: all CPUs' busy time (/proc/stat) less
this process's own (os.times, every thread), per second of wall time, in cores.
"""

from __future__ import annotations

import os
import time

# Other processes' average use, in cores, above which a case's timings are flagged: half a
# core steals enough from a 2-core run to move torch's spinning threads by several times.
BUSY_CORES = 0.5


def _busy_seconds() -> float | None:
    """Every CPU's non-idle time since boot, in seconds (Linux), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    values = [int(v) for v in fields[1:9]]
    busy = values[0] + values[1] + values[2] + values[5] + values[6] + values[7]
    return busy / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


class LoadMeter:
    """``with LoadMeter() as load: ...``; then ``load.other_cores``: the average number of
    cores other processes kept busy during the block (None where /proc/stat is missing)."""

    other_cores: float | None = None

    def __enter__(self) -> LoadMeter:
        self._start = (_busy_seconds(), _own_seconds(), time.perf_counter())
        return self

    def __exit__(self, *exc_info) -> None:
        busy0, own0, wall0 = self._start
        busy1, own1, wall1 = _busy_seconds(), _own_seconds(), time.perf_counter()
        if busy0 is None or busy1 is None or wall1 <= wall0:
            return
        # jiffies are 10 ms: a short block's estimate is coarse, never below zero
        self.other_cores = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (wall1 - wall0))


def busy_note(other_cores: float | None, cores: int, device: str = "cpu") -> str | None:
    """The warning for a case timed while other processes used ``other_cores``, or None. On a
    GPU the kernels do not share the CPU, only their launches do: a quarter of the cores
    (at least one) busy elsewhere before it is flagged."""
    limit = BUSY_CORES if device == "cpu" else max(1.0, cores / 4)
    if other_cores is None or other_cores < limit:
        return None
    return (f"the machine was busy: other processes used {other_cores:.1f} of {cores} cores "
            f"while this case ran; its times (the peer's spinning threads above all) are not "
            f"to be trusted, rerun it on a quiet machine")
