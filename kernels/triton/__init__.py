"""Triton kernels: the fused recurrence of every cell, persistent in time (DESIGN §5).

One op per module, in flash-linear-attention's ``fused_recurrent`` style: the kernels, their
launcher and a naive torch reference live together.

* :mod:`.gated` serves the cells whose step is one recurrent product: RNN, LSTM and GRU.
* :mod:`.twostage` serves the seed's TwoStageRNN (two products per step, a barrier between).
* :mod:`.common` holds the jit helpers both share (activations, the grid-wide step barrier).
* :mod:`.launch` chooses tiles per shape (and times candidates once per shape on a GPU).

This package itself does not import triton; its kernel modules do. Set ``TRITON_INTERPRET=1``
before importing them to run the very same kernels on the CPU through Triton's interpreter.
"""

import os


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter. Lives here, where triton is
    not imported, so the backend can ask it in its availability checks for free."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The gated forward kernel's offsets within one time step are int32 (only a step's start is
# int64), and its accumulators start from xw: 64-bit offset tiles cost two registers per
# element, and x tiles loaded after the products stayed live across them. Spill stores per
# thread (ptxas -v, sm_90, 8 warps, LSTM), before -> after: bf16 64 rows x 256 units 852 ->
# 24 B, 128 x 64 units with the grid barrier 4826 -> 1204 B; fp32 the same tiles 124 -> 64 B
# and 3476 -> 1420 B; no tiling spilled more (tests/triton_compile_check.py --spills). The
# backward kernel's are int32 too: at the tilings run 5 chose, bf16 LSTM 64 x 128 units
# 1328 -> 564 B, 64 x 64 824 -> 80 B, GRU 716 -> 84 B, RNN 1356 -> 888 B. fp32 LSTM at 128 x 64
# spills more (3596 -> 6364 B: ptxas now stops at 128 registers there) and at 64 x 64
# (812 -> 1028 B), but every shape's least-spilling candidate spills less than before (e.g.
# 256x4096x256 fp32: 1064 -> 340 B), and the tuner times them all.
# So what one step addresses must stay below 2**31 elements.
MAX_STEP_ELEMENTS = 2**31 - 1


def step_elements(B: int, H: int) -> int:
    """The most elements the gated kernels (forward and backward) address within one step of a
    (B, H) problem: a step of xw or of the gates tape (B x 4H at most), or W_hh (4H x H at most)."""
    return 4 * H * max(B, H)


def steps_of(a, n: int):
    """The first ``n`` steps of a (T, ...) tensor, repeated when T < n: what the tuner times a
    candidate tiling on (the cost of a step does not depend on the values)."""
    return (a if n <= a.shape[0] else a.repeat(-(-n // a.shape[0]), *[1] * (a.dim() - 1)))[:n]
