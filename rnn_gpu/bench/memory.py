"""Peak GPU memory of one call, in bytes: torch's caching allocator and CuPy's memory pool.

What is counted: the high-water mark of memory allocated through torch during the call, above
what was allocated before it (the weights and the input are the caller's), plus what CuPy's
default pool grew by during the call. CuPy's pool keeps no peak statistic: its cached blocks are
freed first, so that what it holds after the call is what the call needed at once (blocks freed
during the call are reused from the cache, never returned), an upper bound by its rounding.
Without the pool's part the CuPy backend's rows read as needing next to nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def peak_bytes(fn: Callable[[], object], device: str = "cuda") -> int:
    """Bytes the call needed at its peak beyond what was allocated when it started."""
    import torch

    with torch.cuda.device(device):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out, pool_grew = cupy_pool_growth(fn)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del out
    return max(0, peak - before) + pool_grew


def cupy_pool_growth(fn: Callable[[], object]) -> tuple[object, int]:
    """``(fn(), bytes CuPy's default pool grew by during it)``; 0 where CuPy is not loaded."""
    cupy = sys.modules.get("cupy")
    if cupy is None:
        return fn(), 0
    pool = cupy.get_default_memory_pool()
    cupy.cuda.Device().synchronize()
    pool.free_all_blocks()
    before = pool.total_bytes()
    out = fn()
    cupy.cuda.Device().synchronize()
    return out, max(0, pool.total_bytes() - before)
