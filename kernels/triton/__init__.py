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


# The gated kernels' offsets within one time step are int32 (only a step's start is int64),
# and the forward's accumulators start from xw: 64-bit offset tiles cost two registers per
# element, and x tiles loaded after the products stayed live across them. Spill stores per
# thread (ptxas -v, sm_90, tests/triton_compile_check.py --spills) as a launch compiles them at
# DESIGN's shapes (aligned pointers, H a multiple of 16, so vectorised loads and cp.async
# pipelining): forward LSTM bf16 128 x 64 units with the grid barrier and tape 1152 B, 64 x 256
# 40 B; backward (int64 -> int32) LSTM bf16 64 x 128 784 -> 680 B, 64 x 64 616 -> 720 B,
# fp32 128 x 64 1084 -> 1116 B, GRU 192 -> 128 B. Compiled without that specialisation (an H
# that is not a multiple of 16) the change matters more: forward 4826 -> 1204 B, backward
# 1328 -> 564 B at those tilings (the figures the forward's change was first judged on).
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


# The grid barrier (common.step_barrier) counts arrivals in one int32 per row block, zeroed
# for each launch: the k-th barrier of a launch waits for k x n_split (the programs that split
# the row block's units), so a launch of n barriers reaches n x n_split. Past 2**31 - 1 the
# counter and the target wrap (int32 atomics and products) and the signed compare breaks: a
# program waiting at barrier k reads up to k x n_split + n_split - 1, which has wrapped
# negative while the target has not (it spins forever), or the target has wrapped negative
# first (it passes before the others arrive). n_split is at most the SM count (the grid must
# be resident): 132 on an H100 or H200 gives 16,268,815 barriers, i.e. steps of the gated
# kernels (one barrier a step) and half as many steps of TwoStageRNN (two phases a step).
# Longer sequences are cut into launches of at most MAX_BARRIER_COUNT // n_split barriers,
# each with a fresh counter; the state carries from launch to launch as in the per-step
# launches of the split design without a barrier (launch_spans).
MAX_BARRIER_COUNT = 2**31 - 1


def launch_spans(n_iterations: int, grid_sync: bool, split: bool, n_split: int):
    """``(first iteration, count)`` of each launch over ``n_iterations`` loop iterations
    (steps, or TwoStageRNN's phases; at most one grid barrier each): one launch per iteration
    when the units are split without a grid barrier (Triton's interpreter runs programs one
    after another, so there the kernel boundary is the barrier), else launches of at most
    ``MAX_BARRIER_COUNT // n_split`` iterations, so that the barrier's int32 counter never
    wraps (one launch for any sequence below ~16 million steps)."""
    if split and not grid_sync:
        return [(i, 1) for i in range(n_iterations)]
    per_launch = max(1, MAX_BARRIER_COUNT // max(1, n_split))
    if n_iterations <= per_launch:
        return [(0, n_iterations)]
    return [(b, min(per_launch, n_iterations - b)) for b in range(0, n_iterations, per_launch)]

# The weight gradients are products over all T*B rows (``dgatesᵀ h_prev``), through torch's
# GEMM, which hands cuBLAS 32-bit dimensions (at::cuda::blas refuses k past INT_MAX); T*B may
# be more, so they are summed in chunks of at most this many rows.
GEMM_MAX_ROWS = 2**30


def rows_product(d, x, precision: str):
    """``dᵀ x`` over the rows of ``d`` (N, n) and ``x`` (N, m): one GEMM up to
    :data:`GEMM_MAX_ROWS` rows, else the float32 sum of one GEMM per chunk of rows."""
    from rnn_gpu._matmul import matmul

    n = d.shape[0]
    if n <= GEMM_MAX_ROWS:
        return matmul(d.t(), x, precision)
    total = None
    for r in range(0, n, GEMM_MAX_ROWS):
        part = matmul(d[r:r + GEMM_MAX_ROWS].t(), x[r:r + GEMM_MAX_ROWS], precision).float()
        total = part if total is None else total.add_(part)
    return total
