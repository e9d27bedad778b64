"""Triton kernels: the fused recurrence of every cell, persistent in time (DESIGN §5).

One op per module, in flash-linear-attention's ``fused_recurrent`` style: the kernels, their
launcher and a naive torch reference live together.

* :mod:`.gated` serves the cells whose step is one recurrent product: RNN, LSTM and GRU.
* :mod:`.twostage` serves the seed's TwoStageRNN (two products per step, a barrier between).
* :mod:`.common` holds the jit helpers both share (activations, the grid-wide step barrier).
* :mod:`.launch` chooses tiles per shape (and times candidates once per shape on a GPU).

Importing this package imports triton; set ``TRITON_INTERPRET=1`` before that to run the very
same kernels on the CPU through Triton's interpreter.
"""

import os


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter. Lives here, where triton is
    not imported, so the backend can ask it in its availability checks for free."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
