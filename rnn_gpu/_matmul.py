"""The layers' large float32 GEMMs in the precision in force (:func:`rnn_gpu.float32_precision`).

Around the recurrence, a layer multiplies whole sequences at once: the input projection
``x W_ihᵀ`` in the forward, ``dxw W_ih`` and ``dxwᵀ x`` in the backward, and the backends'
``dW_hh``. Under IEEE float32 these run on the CUDA cores; on the H100 at LSTM 256×4096×256 each
is ~0.55 TFLOP, ~11 ms, while the tf32x3 recurrence kernel takes ~15 ms for the whole sequence
(run 4, docs/performance.md). So the precision the kernels use applies to these products too:

* ``"ieee"``: ``a @ b``, as before.
* ``"tf32"``: ``a @ b`` with torch's TF32 matmuls allowed for the call.
* ``"tf32x3"``: each operand split into a TF32 high part (rounded to the nearest TF32 number:
  float32's top 10 mantissa bits) and a TF32 low part (the remainder, rounded the same way),
  ``hi·hi + hi·lo + lo·hi`` as three TF32 products summed in float32; what is dropped (``lo·lo``
  and the low part's rounding) is ~2⁻²² relative. The same scheme as the kernels' dots (Triton's
  tf32x3, CUTLASS's 3xTF32).

Only torch float32 CUDA tensors take the TF32 paths (there is no TF32 anywhere else); all other
arrays, and every other dtype, are multiplied as they are.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

TF32_HIGH_MASK = -(1 << 13)      # 0xFFFFE000 as int32: sign, exponent, top 10 mantissa bits
TF32_HALF_ULP = 1 << 12          # half of the lowest mantissa bit TF32 keeps


def matmul(a: Any, b: Any, precision: str, bias: Any = None) -> Any:
    """``a @ b`` (2-D), plus ``bias`` broadcast over rows when given, float32 products in
    ``precision`` where the arrays allow it. A torch bias goes in through ``torch.addmm``,
    which hands it to cuBLAS's GEMM epilogue on CUDA instead of a separate pass over the
    product: at LSTM 256x4096x256 fp16 that pass reads and writes the 2 GB input projection,
    ~1.3 ms of the 9 ms forward on an H100 (run 4)."""
    tf32 = precision != "ieee" and _takes_tf32(a, b)
    if tf32 and precision == "tf32x3":
        out = tf32x3_matmul(a, b)
    elif tf32 and precision != "tf32":
        raise ValueError(f"precision: expected ieee, tf32x3 or tf32, got {precision!r}")
    else:
        with _tf32_matmuls() if tf32 else contextlib.nullcontext():
            torch = sys.modules.get("torch")
            if bias is not None and torch is not None and isinstance(bias, torch.Tensor):
                return torch.addmm(bias, a, b)
            out = a @ b
    if bias is not None:
        out += bias
    return out


def tf32x3_matmul(a, b):
    """``a @ b`` for torch float32 tensors as three TF32 products (see the module docstring)."""
    a_hi, a_lo = split_tf32(a)
    b_hi, b_lo = split_tf32(b)
    with _tf32_matmuls():
        out = a_hi @ b_hi
        out += a_hi @ b_lo
        out += a_lo @ b_hi
    return out


def split_tf32(a):
    """``(hi, lo)``, both TF32 numbers (low 13 mantissa bits zero), ``hi`` the nearest TF32 to
    ``a`` and ``lo`` the nearest to ``a - hi``: ``|a - hi - lo| <= 2⁻²² |a|``.

    Both parts are rounded, not truncated, and both are exact TF32 inputs. The first version
    kept ``hi`` truncated and ``lo = a - hi`` with 13 significant bits, which the tensor cores
    then cut to TF32 themselves, towards zero. On the H100 (run 5) a few weight-gradient
    elements of the tf32x3 test then missed float32's tolerance by up to 6% (LSTM, GRU,
    TwoStageRNN at 48x64x256); the same test had passed while these GEMMs ran in IEEE float32
    (run 4). Rounding halves the high part's remainder (2⁻¹¹ instead of 2⁻¹⁰ relative) and
    leaves the hardware nothing to cut.

    Non-finite values: a NaN stays NaN in ``hi`` (so it reaches the product); an infinite
    input gives ``hi`` = inf and ``lo`` = NaN, so the product is NaN there, as before; within
    2⁻¹² of float32's largest value ``hi`` rounds to inf, with the same result."""
    torch = _torch()
    # A NaN whose payload fills the top mantissa bits would carry out of the int32 pattern
    # in the rounding and come back as a zero; it keeps its own bits instead.
    hi = torch.where(torch.isnan(a), a, _round_tf32(a))
    return hi, _round_tf32(a - hi)


def _round_tf32(a):
    """The nearest TF32 number (ties away from zero), as float32. Adding half of the lowest
    kept bit to the bit pattern rounds the magnitude, and a carry into the exponent is right.
    A same-size dtype view keeps a's strides, so a transposed operand is not copied."""
    torch = _torch()
    return ((a.view(torch.int32) + TF32_HALF_ULP) & TF32_HIGH_MASK).view(torch.float32)


def _takes_tf32(a, b) -> bool:
    torch = sys.modules.get("torch")
    return (torch is not None and isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype == torch.float32 and a.is_cuda and b.is_cuda)


_tf32_lock = threading.Lock()
_tf32_users = 0
_tf32_previous: Any = None


@contextlib.contextmanager
def _tf32_matmuls() -> Iterator[None]:
    """torch's TF32 switch for matmuls, on for the block.

    The switch is process-wide in torch, so blocks in several threads share one setting: the
    first turns it on and the last puts back what was there before. Each restoring its own
    saved value, interleaved blocks could leave TF32 on for the rest of the process (and
    every IEEE float32 GEMM after in TF32). A thread's IEEE GEMM that runs while another's
    block is open still gets TF32: torch has no per-thread switch.

    torch >= 2.9 has ``fp32_precision`` beside the legacy ``allow_tf32``, and reading the
    legacy flag raises once a program has set the new one to another value ("mix of the legacy
    and new APIs"); the new one reads and restores cleanly whichever was set, so it is used
    where it exists (torch 2.13: legacy True reads back as "tf32", untouched as "none")."""
    global _tf32_users, _tf32_previous
    flags = _torch().backends.cuda.matmul
    name, on = (("fp32_precision", "tf32") if hasattr(flags, "fp32_precision")
                else ("allow_tf32", True))
    with _tf32_lock:
        if _tf32_users == 0:
            _tf32_previous = getattr(flags, name)
            setattr(flags, name, on)
        _tf32_users += 1
    try:
        yield
    finally:
        with _tf32_lock:
            _tf32_users -= 1
            if _tf32_users == 0:
                setattr(flags, name, _tf32_previous)


def _torch():
    import torch

    return torch
