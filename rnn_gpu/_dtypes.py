"""Canonical dtype names shared by every array kind: float16, bfloat16, float32, float64."""

from __future__ import annotations

from typing import Any

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


# (type, dtype) -> canonical name, for the dtypes seen so far (a handful per process). The
# layers ask for every array they check, several times a call, and str() of a NumPy dtype
# alone costs ~10 us (LSTM 1x1x8x8 through the torch drop-in: 6 lookups, ~0.1 of the call).
# Keyed with the type so that objects that compare equal across kinds (np.dtype("float64")
# == float) never share an entry; errors are not cached.
_CANONICAL: dict[tuple[Any, Any], str] = {}


def canonical_dtype(dtype: Any, *, strict: bool = True) -> str:
    """Map a dtype given as a string, a NumPy dtype or a torch dtype to its canonical name.

    With ``strict`` an unsupported dtype raises ``ValueError``; without, its own name is
    returned (for use in error messages about inputs).
    """
    try:
        key = (type(dtype), dtype)
        text = _CANONICAL.get(key)
    except TypeError:                                  # unhashable: no cache
        key = text = None
    if text is None:
        text = _canonical_text(dtype)
        if key is not None and len(_CANONICAL) < 256:
            _CANONICAL[key] = text
    if text in FLOAT_DTYPES or not strict:
        return text
    raise ValueError(f"dtype: expected one of {FLOAT_DTYPES}, got {dtype!r}")


def _canonical_text(dtype: Any) -> str:
    text = str(dtype)
    for prefix in ("torch.", "<class 'numpy.", "dtype('"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    text = text.rstrip("')>")
    aliases = {"float": "float32", "double": "float64", "half": "float16", "bf16": "bfloat16",
               "fp32": "float32", "fp16": "float16", "fp64": "float64"}
    return aliases.get(text, text)


def host_dtype(dtype: str) -> str:
    """The NumPy dtype that holds values of ``dtype`` on the host: itself, or float32 for
    bfloat16, which NumPy lacks (every bfloat16 value is exactly a float32)."""
    return "float32" if dtype == "bfloat16" else dtype
