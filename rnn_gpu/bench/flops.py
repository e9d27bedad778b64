"""How much work a case is: GEMM flops, the convention cuDNN and papers report against.

Elementwise work (the gate nonlinearities) is not counted: it is small next to the GEMMs in
flops, though not always in time (see docs/performance.md).
"""

from __future__ import annotations

GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}


def forward_flops(cell: str, T: int, B: int, I: int, H: int, P: int = 0) -> int:  # noqa: E741
    """Multiply-adds x 2 of one layer, one direction, forward.

    RNN/GRU/LSTM: ``2*T*B*(I+H)*gates*H`` (the input GEMM plus the recurrent one).
    LSTM with proj_size P: the recurrent product reads h of width P, and h = W_hr m adds
    P x H: ``2*T*B*((I+P)*4H + P*H)`` (the problem's work, whatever a backend computes).
    TwoStageRNN: ``W_ia x`` (H x I) and ``W_aa h``, ``W_ha a``, ``W_hh h`` (each H x H):
    ``2*T*B*H*(I+3H)``.
    """
    if cell == "TwoStageRNN":
        return 2 * T * B * H * (I + 3 * H)
    try:
        gates = GATES[cell]
    except KeyError:
        raise ValueError(f"cell: expected one of {[*GATES, 'TwoStageRNN']}, got {cell!r}") from None
    if P:
        return 2 * T * B * ((I + P) * gates * H + P * H)
    return 2 * T * B * (I + H) * gates * H


def train_flops(cell: str, T: int, B: int, I: int, H: int, P: int = 0) -> int:  # noqa: E741
    """Forward + backward: the backward does two GEMMs per forward one (dx and dW), so ≈ 3x."""
    return 3 * forward_flops(cell, T, B, I, H, P)


def case_flops(case) -> int:
    """The case's flops over its valid steps (``case.tokens``: with lengths, their sum), the
    work the problem asks for, whatever a runner computes for the padding."""
    fn = forward_flops if case.pass_ == "forward" else train_flops
    return fn(case.cell, 1, case.tokens, case.I, case.H, case.P)
