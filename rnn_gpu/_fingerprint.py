"""Fingerprints of the caller's arrays that a tape refers to (x, the initial state, lengths,
the parameters), so that :meth:`RecurrentLayer.backward` can refuse a tape whose arrays were
changed in place after ``forward`` instead of computing gradients for values the forward never
saw (torch's autograd does the same with its version counters).

* torch tensors: their version counter (free, exact for in-place torch operations);
* NumPy arrays: CRC-32 of the bytes (position-dependent; ~2.3 GB/s on the CI VM, so ~7 ms for
  a 16 MB input at forward and again at backward, against ~440 ms for the NumPy LSTM forward
  of 256x32x512 alone);
* CuPy arrays: the wrapping sum of the elements' bits, computed on the device without a sync
  (a swap of two elements keeps it; every scaling, optimizer step or partial write changes
  it); the comparison at backward is one scalar copied to the host.
"""

from __future__ import annotations

import weakref
import zlib
from typing import Any

import numpy as np

from ._arrays import kind_of


def fingerprint(a: Any) -> Any:
    """A value that changes when ``a``'s contents change (see the module docstring)."""
    kind = kind_of(a)
    if kind == "torch":
        # An inference tensor has no version counter, and nothing outside inference mode can
        # change it in place (torch refuses): it needs none.
        return None if a.is_inference() else a._version
    if kind == "numpy":
        # bytes through a uint8 view: a memoryview cannot hold ml_dtypes' bfloat16
        return zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
    return bit_sum(a)


def bit_sum(a: Any) -> Any:
    """The sum of ``a``'s elements read as unsigned integers of their width, modulo 2**64, as
    a 0-d array of ``a``'s own kind (no sync on a GPU)."""
    flat = a.reshape(-1)
    if flat.size and not flat.flags.c_contiguous:
        flat = flat.copy()
    return flat.view(f"uint{8 * a.dtype.itemsize}").sum(dtype="uint64")


def first_changed(entries: list[tuple[str, Any, Any]]) -> str | None:
    """The name of the first ``(name, array, fingerprint at forward)`` whose array changed
    since, or None. The device fingerprints are compared on the device and copied to the host
    together: one sync, not one per array. ``array`` may be a weak reference; one that died
    (nothing holds the array any more) is unchanged."""
    on_device = []
    for name, a, before in entries:
        if isinstance(a, weakref.ref):
            a = a()
            if a is None:
                continue
        if kind_of(a) in ("torch", "numpy"):
            if fingerprint(a) != before:
                return name
        else:
            on_device.append((name, fingerprint(a) != before))
    if on_device:
        import cupy

        flags = cupy.stack([flag for _, flag in on_device]).get()
        for (name, _), flag in zip(on_device, flags):
            if flag:
                return name
    return None
