"""One thread count for every runner: torch, OpenBLAS (through threadpoolctl) and the NumPy
backend's own tiles (``RNN_GPU_NUM_THREADS``)."""

from __future__ import annotations

import contextlib
import os


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@contextlib.contextmanager
def same_threads(n: int):
    """Within the block every runner uses ``n`` threads; restores the previous settings."""
    from threadpoolctl import threadpool_limits

    old_env = os.environ.get("RNN_GPU_NUM_THREADS")
    torch = _torch()
    old_torch = torch.get_num_threads() if torch is not None else None
    os.environ["RNN_GPU_NUM_THREADS"] = str(n)
    if torch is not None:
        torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n, user_api="blas"):
            yield n
    finally:
        if old_env is None:
            os.environ.pop("RNN_GPU_NUM_THREADS", None)
        else:
            os.environ["RNN_GPU_NUM_THREADS"] = old_env
        if torch is not None:
            torch.set_num_threads(old_torch)


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch
