"""Peak GPU memory of one call, in bytes, read off torch's caching allocator.

What is counted: the high-water mark of memory allocated through torch during the call, above
what was allocated before it (the weights and the input are the caller's). A backend that
allocates through another allocator (CuPy's pool) reports its own peak next to this one.
"""

from __future__ import annotations

from collections.abc import Callable


def peak_bytes(fn: Callable[[], object], device: str = "cuda") -> int:
    """Bytes the call needed at its peak beyond what was allocated when it started."""
    import torch

    with torch.cuda.device(device):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del out
    return max(0, peak - before)
