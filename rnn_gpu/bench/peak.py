"""The machine's peak: GFLOP/s of one large square GEMM, the yardstick for the floor of a case
(its GEMM flops at that rate). Measured with the current thread settings."""

from __future__ import annotations

import time

import numpy as np


def peak_gemm_gflops(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> dict:
    """Best-of-``repeats`` GFLOP/s of an n x n x n GEMM in NumPy (its BLAS) and in torch."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    out = np.empty_like(a)
    result = {"numpy": _best(lambda: np.matmul(a, b, out=out), n, repeats)}
    try:
        import torch
    except ImportError:
        return result
    ta, tb, tout = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out)
    result["torch"] = _best(lambda: torch.matmul(ta, tb, out=tout), n, repeats)
    return result


def _best(fn, n: int, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9
