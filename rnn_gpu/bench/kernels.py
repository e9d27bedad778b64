"""Where a call's GPU time goes, kernel by kernel: ``rnn-gpu bench --kernels [N]``.

After a case is timed, each timed runner's call runs once more under ``torch.profiler`` with
CUDA activity (CUPTI records every kernel the process launches on the device: torch's and
cuDNN's, Triton's and CuPy's, inside a replayed CUDA graph too). The row then holds the sum of
its kernels' times (``kernel_ms``; the timed median less this is launch gaps and host work)
and its ``N`` costliest kernels by total time, with their launches.

Why: a ratio against cuDNN says how far a row is behind, not where. The CuPy graph path's
LSTM fp16 forward at 256x4096x256 took ~56 us a step (H100, run 5) where its GEMM and its
pointwise kernel should take ~15 by their bytes, and only a per-kernel split tells a slow GEMM
from a slow pointwise kernel or from gaps between launches.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

DEFAULT_TOP = 6
NAME_WIDTH = 80


@dataclass(frozen=True)
class KernelTime:
    """One kernel's share of a call: its (shortened) name, launches and total microseconds."""

    name: str
    launches: int
    us: float


def short_name(name: str, width: int = NAME_WIDTH) -> str:
    """A kernel's name without its return type and argument list, at most ``width`` long:
    ``void gated_fwd_step<__half, 1, 0>(GatedFwdCall<__half> const*, ...)`` ->
    ``gated_fwd_step<__half, 1, 0>``."""
    name = re.sub(r"^void ", "", name.strip()).replace("(anonymous namespace)", "{anon}")
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):            # the argument list: the first "(" outside <...>
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif ch == "(" and depth == 0 and i > 0:
            cut = i
            break
    name = name[:cut]
    return name if len(name) <= width else name[:width - 1] + "…"


def summarize(events: Iterable, top: int = DEFAULT_TOP) -> tuple[float, list[KernelTime]]:
    """``(milliseconds of all kernels, the top kernels by total time)`` from profiler events:
    those on a CUDA device (``device_type``), grouped by shortened name."""
    from torch.autograd import DeviceType

    totals: dict[str, list] = {}
    for event in events:
        if event.device_type != DeviceType.CUDA:
            continue
        entry = totals.setdefault(short_name(event.name), [0, 0.0])
        entry[0] += 1
        entry[1] += event.time_range.elapsed_us()
    kernels = sorted((KernelTime(name, n, us) for name, (n, us) in totals.items()),
                     key=lambda k: (-k.us, k.name))
    return sum(k.us for k in kernels) / 1e3, kernels[:top]


def profile_kernels(call: Callable[[], object], device: str,
                    top: int = DEFAULT_TOP) -> tuple[float, list[KernelTime]]:
    """One ``call()`` under torch.profiler with CUDA activity: :func:`summarize` of it."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize(device)
    return summarize(prof.events(), top)


def format_kernels(kernel_ms: float, kernels: list[KernelTime], call_ms: float | None) -> str:
    """One row's kernels as text: the total against the timed call, then a line a kernel."""
    head = f"kernels {kernel_ms:.3f} ms"
    if call_ms:
        head += f" of {call_ms:.3f} ms timed ({kernel_ms / call_ms:.0%})"
    lines = [head]
    for k in kernels:
        share = f"{k.us / 1e3 / kernel_ms:4.0%}" if kernel_ms else "   -"
        lines.append(f"    {k.us / 1e3:9.3f} ms {share} {k.launches:6d}× "
                     f"{k.us / max(k.launches, 1):9.2f} us  {k.name}")
    return "\n".join(lines)
