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
