"""Jit helpers shared by the recurrence kernels.

Activations are written with ``exp2`` (sigmoid) and a rational function (tanh) rather than
libdevice's so that one source runs both compiled and under Triton's interpreter. Cell ids and
activation ids are constexpr ints so that every branch on them is resolved at compile time.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Cell ids (constexpr in the kernels).
RNN, LSTM, GRU = 0, 1, 2
# Activation ids (RNN nonlinearity, TwoStageRNN's f and g).
TANH, SIGMOID, RELU = 0, 1, 2
ACTIVATION_IDS = {"tanh": TANH, "sigmoid": SIGMOID, "relu": RELU}

_LOG2E = tl.constexpr(1.4426950408889634)   # a constexpr: jit code may only read those


def _interpreter_fixes() -> None:
    """Two bugs of Triton's interpreter (3.6 to 3.9) that the kernels would trip over under
    ``TRITON_INTERPRET=1``; both patches only touch the interpreter, never compiled kernels.

    * Triton 3.6 turns a scalar into an index with ``int(array_of_one)``, which NumPy >= 2.4
      refuses, so ``for i in range(n_steps)`` failed. Triton 3.9 squeezes first; so do we.
    * ``tl.dot`` on bfloat16 multiplies the raw uint16 storage as integers (LSTM outputs were
      off by 1.3). We widen bfloat16 operands to float32 first, exactly (bf16 is the top half of
      an fp32), which is what the tensor cores compute with fp32 accumulation.
    """
    try:
        import numpy as np
        from triton.runtime import interpreter
    except ImportError:                                   # pragma: no cover - layout changed
        return
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is not None and not getattr(patch, "_rnn_gpu_fixed", False):
        def patched(tensor, scope):
            patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

        patched._rnn_gpu_fixed = True
        interpreter._patch_lang_tensor = patched
    builder = getattr(interpreter, "InterpreterBuilder", None)
    dot = getattr(builder, "create_dot", None)
    if dot is not None and not getattr(dot, "_rnn_gpu_fixed", False):
        def widen(h):
            if h.dtype.scalar == tl.bfloat16:
                data = (h.data.astype(np.uint32) << 16).view(np.float32)
                return interpreter.TensorHandle(data, tl.float32)
            return h

        def create_dot(self, a, b, d, *args, **kwargs):
            return dot(self, widen(a), widen(b), d, *args, **kwargs)

        create_dot._rnn_gpu_fixed = True
        builder.create_dot = create_dot


_interpreter_fixes()


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp2(-_LOG2E * x))


# tanh as Eigen's rational approximation (generic_fast_tanh_float): an odd polynomial of degree
# 13 over an even one of degree 6, on x clamped to +-7.9988 (beyond, tanh is 1 in float32 to
# 2e-7). Its relative error is at most 3.6e-7 over all of float32's normal range, 1.7e-7 near
# 0, where 1 - 2/(e^{2x}+1), the formula before it, kept only an absolute error of 1's
# rounding: tanh(1e-8) came out 0, and an LSTM fed inputs of 1e-6 was 24% off torch.nn. No
# exp and no select: a small-|x| branch beside that formula (tl.where) kept x and the
# formula's tile alive together, and ptxas fell to 32 registers and 24 KB of spills in the
# float32 split forward (tests/test_triton_compile.py); this costs 144 bytes, 120 before.
_TANH_CLAMP = tl.constexpr(7.99881172180175781)


@triton.jit
def tanh(x):
    c = tl.minimum(tl.maximum(x, -_TANH_CLAMP, propagate_nan=tl.PropagateNan.ALL),
                   _TANH_CLAMP, propagate_nan=tl.PropagateNan.ALL)     # NaN stays NaN
    c2 = c * c
    p = c2 * -2.76076847742355e-16 + 2.00018790482477e-13
    p = p * c2 + -8.60467152213735e-11
    p = p * c2 + 5.12229709037114e-08
    p = p * c2 + 1.48572235717979e-05
    p = p * c2 + 6.37261928875436e-04
    p = p * c2 + 4.89352455891786e-03
    q = c2 * 1.19825839466702e-06 + 1.18534705686654e-04
    q = q * c2 + 2.26843463243900e-03
    q = q * c2 + 4.89352518554385e-03
    return (p * c) / q


@triton.jit
def activate(x, ACT: tl.constexpr):
    if ACT == 0:
        y = tanh(x)
    elif ACT == 1:
        y = sigmoid(x)
    else:
        y = tl.maximum(x, 0.0)
    return y


@triton.jit
def activation_grad(y, ACT: tl.constexpr):
    """d act / d x written in terms of the output y = act(x)."""
    if ACT == 0:
        d = 1.0 - y * y
    elif ACT == 1:
        d = y * (1.0 - y)
    else:
        d = tl.where(y > 0.0, 1.0, 0.0)
    return d


@triton.jit
def time_index(s, T, REVERSE: tl.constexpr):
    """The time step that processing step ``s`` handles (reverse direction: from the end)."""
    if REVERSE:
        t = T - 1 - s
    else:
        t = s
    return t


@triton.jit
def program_rows(B, H, len_ptr, HAS_LENGTHS: tl.constexpr, BLOCK_B: tl.constexpr,
                 UNITS: tl.constexpr):
    """This program's batch rows (int32 and int64), which of them exist, their lengths (the
    rows themselves when there are no lengths: never read then) and the end of its units."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    lens = rows
    if HAS_LENGTHS:
        lens = tl.load(len_ptr + rows, mask=row_ok, other=0)
    unit_end = tl.minimum((tl.program_id(1) + 1) * UNITS, H)
    return rows, row_ok, rows.to(tl.int64), lens, unit_end


@triton.jit
def valid_rows(row_ok, t, lens, HAS_LENGTHS: tl.constexpr):
    """Rows that exist and have not ended by time step t."""
    valid = row_ok
    if HAS_LENGTHS:
        valid = row_ok & (t < lens)
    return valid


@triton.jit
def step_and_next(s, T, row_ok, lens, REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """For backward at processing step s: the time steps of s and s+1 and their valid rows."""
    t = time_index(s, T, REVERSE)
    t_next = time_index(s + 1, T, REVERSE)
    return (t, t_next, valid_rows(row_ok, t, lens, HAS_LENGTHS),
            valid_rows(row_ok, t_next, lens, HAS_LENGTHS))


# Kernels with a grid barrier are launched cooperatively (CU_LAUNCH_ATTRIBUTE_COOPERATIVE):
# the driver then runs the whole grid at once or refuses the launch. Sized to the SM count
# alone, a plain launch spun forever where fewer SMs were free: two such kernels on two
# streams, each holding part of the card and waiting on programs the other kept out, or MPS
# with a thread-percentage limit. Off (RNN_GPU_TRITON_COOPERATIVE=0) restores the plain
# launch that runs 5-7 timed; the barrier is the same either way.
COOPERATIVE = os.environ.get("RNN_GPU_TRITON_COOPERATIVE", "1") != "0"


def cooperative(grid_sync: bool) -> bool:
    """Whether a launch with (``grid_sync``) or without a grid barrier is cooperative."""
    return bool(grid_sync) and COOPERATIVE


@triton.jit
def step_barrier(counter_ptr, target, GRID_SYNC: tl.constexpr):
    """Wait until every program of this row block has reached this point.

    With ``GRID_SYNC`` the programs that split one row block's hidden units meet at an atomic
    counter (release on arrival, acquire while spinning); ``target`` is the count that means
    "all arrived" for this barrier (barriers so far times programs per row block), so the
    counter is never reset inside a launch (it is int32 and zeroed for each launch; a launch
    has at most ``MAX_BARRIER_COUNT // n_split`` barriers, so neither the counter nor the
    target wraps: :func:`rnn_gpu.kernels.triton.launch_spans`). Every program must be
    resident: the grid is no larger than the SM count, and the launch is cooperative
    (:data:`COOPERATIVE`), so the driver schedules all of it at once or refuses. Without it
    only this program's threads meet: its own stores become visible to its own loads of the
    next step.
    """
    tl.debug_barrier()
    if GRID_SYNC:
        tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
        arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        while arrived < target:
            arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()


# float32 products in IEEE precision run on the CUDA cores: Triton lowers them to FMA loops whose
# operands it reads from unswizzled shared memory, 16 bytes at a time along the tile's contiguous
# dimension. Streamed as stored, W's tile (k, unit) is contiguous along k: the 16 lanes of a
# warp that own different units then read addresses one column (BLOCK_K words) apart, all in
# the same four banks, a 16-way conflict on every weight read (8 wavefronts per quarter-warp
# where 1 would do). Shared-memory wavefronts alone, counted from the compiled layouts
# (tests/triton_compile_check.py --fma-banks), account for 60-86% of the float32 forward's step
# time on the H100 at the four tilings run 5 and run 3 timed: e.g. 273 of 334 us a step at
# 256x1024x512 (64 x 64 units), 137 of 158 us at 512x64x1024. Passed as W^T (H, G*H), the
# tile is contiguous along the units and the same reads take 1 wavefront per quarter-warp:
# 6.6x fewer at 256x1024x512 (33.8K -> 5.1K per k-iteration and SM), which leaves the FMAs
# (4.1K cycles) as the bound. Half precision and TF32 keep W as stored: their tensor-core
# products read it through their own swizzled layouts (and TF32's wgmma wants B K-major).
def weights_transposed(dtype, precision: str) -> bool:
    """Whether the forward kernels take their recurrent weights transposed (unit-contiguous):
    float32 products in IEEE precision (see the note above)."""
    return str(dtype) in ("torch.float32", "float32") and precision == "ieee"


@triton.jit
def row_block_dot(acc, a_ptr, a_rows, row_ok, K, w_ptr, stride_wk, stride_wj, cols, col_ok,
                  BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + A[rows, :K] @ W[:K, cols]``: A's rows start at ``a_ptr + a_rows`` (contiguous
    along k); W's element (k, j) sits at ``w_ptr + k*stride_wk + j*stride_wj``."""
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_ptr + a_rows[:, None] + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wj,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    return acc
