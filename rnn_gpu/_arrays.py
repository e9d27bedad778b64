"""Array kinds (NumPy, CuPy, torch): recognising them, moving between them, small ops.

The layer code works on whatever array kind the chosen backend computes in. Everything here is
kind-generic so that no other module needs an ``isinstance(x, torch.Tensor)`` ladder. torch and
CuPy are imported only when an array of theirs is seen: a NumPy user never pays for them.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from ._dtypes import canonical_dtype

KINDS = ("numpy", "torch", "cupy")


def kind_of(x: Any) -> str | None:
    """``"numpy"``, ``"torch"``, ``"cupy"``, or None for anything else (lists, scalars)."""
    if isinstance(x, np.ndarray):
        return "numpy"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch"
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        return "cupy"
    return None


def device_of(x: Any) -> str:
    """Canonical device string: ``"cpu"`` or ``"cuda:N"``."""
    kind = kind_of(x)
    if kind == "torch":
        d = x.device
        return "cpu" if d.type == "cpu" else f"{d.type}:{d.index or 0}"
    if kind == "cupy":
        return f"cuda:{x.device.id}"
    return "cpu"


def dtype_name(x: Any) -> str:
    """The array's dtype as one of our canonical names (or its own name if unknown)."""
    return canonical_dtype(x.dtype, strict=False)


def parse_device(device: Any) -> str:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, a torch.device or an int -> canonical string."""
    if isinstance(device, int) and not isinstance(device, bool):
        return f"cuda:{device}"
    text = str(device).strip().lower()
    if text == "cpu":
        return "cpu"
    if text == "cuda":
        return "cuda:0"
    if text.startswith("cuda:") and text[5:].isdigit():
        return f"cuda:{int(text[5:])}"
    raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def to_kind(x: Any, kind: str, device: str | None = None):
    """Return ``x`` as an array of ``kind`` on ``device`` (default: x's own device).

    Zero-copy where the memory can be shared: NumPy <-> CPU torch through ``from_numpy`` /
    ``.numpy()``, CuPy <-> CUDA torch through DLPack. A copy happens only across devices.
    """
    src = kind_of(x)
    device = device or device_of(x)
    if src == kind and device_of(x) == device:
        return x
    if kind == "numpy":
        if device != "cpu":
            raise ValueError(f"NumPy arrays live on the CPU; cannot place one on {device}")
        if src == "torch":
            return x.detach().cpu().numpy()
        if src == "cupy":
            return x.get()
        return np.asarray(x)
    if kind == "torch":
        import torch

        if src == "numpy":
            # torch refuses negative strides and warns on read-only memory: copy only then.
            if not x.flags.writeable or any(s < 0 for s in x.strides):
                x = np.array(x)
            t = torch.from_numpy(x)
            return t if device == "cpu" else t.to(device)
        if src == "cupy":
            t = torch.from_dlpack(x)
            return t if device_of(t) == device else t.to(device)
        return x.detach().to(device)
    if kind == "cupy":
        import cupy

        if device == "cpu":
            raise ValueError("CuPy arrays live on a CUDA device; cannot place one on the CPU")
        index = int(device.split(":")[1])
        if src == "torch" and x.device.type == "cuda":
            arr = cupy.from_dlpack(x.detach())
            if arr.device.id == index:
                return arr
            x = arr
        with cupy.cuda.Device(index):
            if kind_of(x) == "torch":
                x = x.detach().cpu().numpy()
            return cupy.asarray(x)
    raise ValueError(f"unknown array kind {kind!r}; expected one of {KINDS}")


def to_numpy(x: Any) -> np.ndarray:
    return to_kind(x, "numpy", "cpu")


def column_sums(rows: np.ndarray) -> np.ndarray:
    """``rows.sum(0)`` of a 2-D NumPy float array as one BLAS product with a vector of ones:
    a bias gradient over T*B rows. NumPy's own reduction down axis 0 runs on one core: at
    (32768, 512) float32 (LSTM 128x256x128's gradients) it took 10.8 ms (6 GB/s) against 2.1
    for the product on 2 cores (Sapphire Rapids VM), and the product's blocked sums came
    closer to the float64 sum (2.2e-6 against 7.0e-6 of the largest)."""
    return np.ones(rows.shape[0], rows.dtype) @ rows


class Ops:
    """The handful of array operations the layer code needs, for one array kind."""

    def __init__(self, kind: str):
        self.kind = kind
        if kind == "torch":
            import torch

            self._torch = torch
        elif kind == "cupy":
            import cupy

            self._xp = cupy
        else:
            self._xp = np

    def zeros(self, shape, dtype: str, device: str):
        if self.kind == "torch":
            return self._torch.zeros(shape, dtype=_torch_dtype(dtype), device=device)
        if self.kind == "cupy":
            with self._xp.cuda.Device(int(device.split(":")[1])):
                return self._xp.zeros(shape, dtype=dtype)
        return np.zeros(shape, dtype=dtype)

    def concat(self, arrays, axis: int):
        if self.kind == "torch":
            return self._torch.cat(list(arrays), dim=axis)
        return self._xp.concatenate(list(arrays), axis=axis)

    def stack(self, arrays, axis: int = 0):
        if self.kind == "torch":
            return self._torch.stack(list(arrays), dim=axis)
        return self._xp.stack(list(arrays), axis=axis)

    def contiguous(self, x):
        if self.kind == "torch":
            return x.contiguous()
        return self._xp.ascontiguousarray(x)

    def sum_leading(self, x):
        """Sum over every axis but the last (bias gradients)."""
        rows = x.reshape(-1, x.shape[-1])
        return column_sums(rows) if self.kind == "numpy" else rows.sum(0)

    def copy(self, x):
        return x.clone() if self.kind == "torch" else x.copy()

    def index(self, values: np.ndarray, device: str):
        """Host ints as an index array of this kind on ``device``."""
        if self.kind == "torch":
            return self._torch.as_tensor(values, device=device)
        if self.kind == "cupy":
            with self._xp.cuda.Device(int(device.split(":")[1])):
                return self._xp.asarray(values)
        return np.asarray(values)


# Matched by type name so that neither torch nor cupy has to be imported to recognise them:
# MemoryError (NumPy), torch.cuda.OutOfMemoryError, cupy.cuda.memory.OutOfMemoryError.
_OOM_TYPE_NAMES = frozenset({"MemoryError", "OutOfMemoryError"})


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the out-of-memory errors of NumPy, torch and CuPy (and their subclasses)."""
    return any(cls.__name__ in _OOM_TYPE_NAMES for cls in type(exc).__mro__)
