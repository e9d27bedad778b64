"""Argument checks whose errors name the argument, what was expected and what was received."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._arrays import device_of, dtype_name, kind_of


def positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)


def seed(name: str, value: Any) -> int | None:
    """None, or an int >= 0 (what NumPy's default_rng takes, named here and not 7 frames deep
    in SeedSequence)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected None or an int >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name}: expected None or an int >= 0, got {value!r}")
    return int(value)


def flag(name: str, value: Any) -> bool:
    """A bool (NumPy's too): "no" or None would otherwise count as True or False."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {value!r}")
    return bool(value)


def choice(name: str, value: Any, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{name}: expected one of {options}, got {value!r}")
    return value


def array(name: str, x: Any) -> str:
    """Check that ``x`` is an array we handle; return its kind."""
    kind = kind_of(x)
    if kind is None:
        raise TypeError(f"{name}: expected a NumPy array, CuPy array or torch tensor, got "
                        f"{type(x).__name__}")
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name}: expected a plain array, got a NumPy masked array, whose mask "
                        f"would be ignored; pass {name}.filled(0) (and, for padding at the "
                        f"end of sequences, lengths=)")
    return kind


def same_place(name: str, x: Any, *, kind: str, device: str, dtype: str, shape: tuple) -> None:
    """``x`` must match the reference array kind, device, dtype and shape exactly."""
    got_kind = array(name, x)
    if got_kind != kind:
        raise TypeError(f"{name}: expected a {kind} array like the input, got a {got_kind} array")
    if device_of(x) != device:
        raise ValueError(f"{name}: expected an array on {device} like the input, got one on "
                         f"{device_of(x)}")
    if dtype_name(x) != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} like the input, got {dtype_name(x)}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")


def whole_lengths(lengths: np.ndarray) -> None:
    """Lengths stored as floats must hold whole numbers (3.0, not 2.5, NaN or inf): the one
    rule of the layers, ``rnn-gpu run --lengths`` and ``rnn_gpu.dask.apply``."""
    if lengths.dtype.kind != "f":
        return
    whole = np.isfinite(lengths) & (lengths == np.round(lengths))
    if not whole.all():
        i = int(np.argmin(whole))
        raise TypeError(f"lengths: expected integers, got dtype {lengths.dtype} with "
                        f"lengths[{i}] = {lengths[i].item()!r}")
