"""The gated forward with the recurrent weights kept on chip across all steps ("resident").

The streaming kernel of :mod:`.gated` reads its columns of W_hh from L2 every step. At small
batch and large hidden size that is most of a step: LSTM 512x64x1024 fp16 on an H100, its best
tiling (32 rows x 16 units, 128 programs) reads 128 KB of W_hh and 64 KB of h per program and
step, and ran at 14.6 us a step against cuDNN's 8.3 (run 4, 0.61x).

Here program ``(pb, ph)`` loads its ``UNITS`` units of every gate once, before the time loop,
as one ``(HP, G4 * UNITS)`` tile (HP: H padded to a power of two; column ``j * G4 + g`` is W_hh's
row ``g * H + u0 + j``, G4 the gate count padded to 1 or 4). Triton hoists the loop-invariant
tile's copy into shared memory out of the loop (sm_90: ``ttg.local_alloc`` of W before the
``scf.for``, checked by tests/triton_compile_check.py ``--resident``), so each step reads only
h_{t-1} of its rows (``BLOCK_B x HP``) and runs one product ``h @ W`` on the tensor cores
(wgmma with both operands in shared memory), then splits the gates apart (reshape and split)
and finishes the step as the streaming kernel does (:mod:`.gated_step`). At 512x64x1024: 64
rows x 8 units, 128 programs, 64 KB of weights and 128 KB of h in shared memory per program.

It serves fp16 and bf16 only (float32 would double the weights and take no wgmma) and shapes
whose weights and h fit in shared memory with every program resident (:func:`fits`); the tuner
offers it beside the streaming tilings and keeps whichever its timing says is faster.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import program_rows, step_barrier, time_index, valid_rows
from .gated_step import finish_step, xw_plus_bias

# Shared memory the tuner plans with: the weights and h in the compute dtype (2 bytes), plus
# Triton's own staging (~4 KB seen at 512x64x1024), under the H100's 227 KB opt-in limit.
SMEM_BUDGET = 200 * 1024
MIN_ROWS = 64          # a wgmma tile's M: fewer rows would fall back to mma.sync from registers


def gate_slots(gates: int) -> int:
    """Columns per unit in the weight tile: 1 for RNN, 4 for LSTM and GRU (GRU's 4th empty)."""
    return 1 if gates == 1 else 4


def smem_bytes(gates: int, block_b: int, units: int, H: int) -> int:
    hp = triton.next_power_of_2(H)
    return 2 * hp * (gate_slots(gates) * units + block_b)


def fits(gates: int, block_b: int, units: int, H: int) -> bool:
    """Whether the tile can run at all: dot sizes Triton accepts (>= 16 each way) and shared
    memory within :data:`SMEM_BUDGET`."""
    return (gate_slots(gates) * units >= 16 and block_b >= 16
            and smem_bytes(gates, block_b, units, H) <= SMEM_BUDGET)


@triton.jit
def _split_gates(acc, BLOCK_B: tl.constexpr, UNITS: tl.constexpr, G4: tl.constexpr):
    """The (BLOCK_B, G4*UNITS) product, columns unit-major, as one tile per gate."""
    if G4 == 1:
        g0, g1, g2, g3 = acc, acc, acc, acc
    else:
        x = tl.reshape(acc, (BLOCK_B, UNITS, 2, 2))  # column j*4 + g -> [j, g // 2, g % 2]
        even, odd = tl.split(x)                      # g % 2 == 0, 1
        g0, g2 = tl.split(even)
        g1, g3 = tl.split(odd)
    return g0, g1, g2, g3


@triton.jit(do_not_specialize=["T", "B", "t_begin", "n_steps"])
def gated_fwd_resident_kernel(
    xw_ptr, w_ptr, b_ptr, h0_ptr, c0_ptr, len_ptr,
    y_ptr, hbuf_ptr, h_ptr, c_ptr, gates_ptr, ctape_ptr, hprev_ptr, sync_ptr,
    T, B, H, t_begin, n_steps,
    CELL: tl.constexpr, G: tl.constexpr, TG: tl.constexpr, ACT: tl.constexpr,
    REVERSE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    KEEP_TAPE: tl.constexpr, GRID_SYNC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, UNITS: tl.constexpr, G4: tl.constexpr, HP: tl.constexpr,
):
    """Arguments, state buffers and tape as :func:`.gated._gated_fwd_kernel`'s, except that
    ``hbuf``'s slots are padded to whole row blocks and HP columns, the padding zero: h_{t-1}
    is then read with a compile-time row stride and no masks. (Read with H's runtime stride and
    masks it cost 2.2 KB of spill stores per thread at 64 x 1024, 64-bit addresses per element;
    padded, 68 bytes, compiled without the divisibility specialisation; as a launch at that
    shape compiles it, none; tests/triton_compile_check.py --resident.)"""
    pid_b = tl.program_id(0)
    n_split = tl.num_programs(1)
    rows, row_ok, _, lens, unit_end = program_rows(B, H, len_ptr, HAS_LENGTHS, BLOCK_B, UNITS)
    u0 = tl.program_id(1) * UNITS
    GH = G * H
    # one padded slot of hbuf (not tl.cdiv: a jit function, whose compiled-or-interpreted mode
    # is fixed when triton is first imported; see launch.check_mode)
    slot = ((B + BLOCK_B - 1) // BLOCK_B).to(tl.int64) * BLOCK_B * HP
    ks = tl.arange(0, HP)
    k_ok = ks < H
    n = tl.arange(0, G4 * UNITS)
    gate, unit = n % G4, u0 + n // G4
    w_ok = k_ok[:, None] & ((gate < G) & (unit < unit_end))[None, :]
    w = tl.load(w_ptr + (gate * H + unit)[None, :] * H + ks[:, None], mask=w_ok, other=0.0)
    cols = u0 + tl.arange(0, UNITS)
    col_ok = cols < unit_end
    m2 = row_ok[:, None] & col_ok[None, :]
    own = rows[:, None] * H + cols[None, :]
    for i in range(n_steps):
        s = t_begin + i
        t = time_index(s, T, REVERSE)
        valid = valid_rows(row_ok, t, lens, HAS_LENGTHS)
        src_slot = tl.where(s == 0, 0, 1 + (s + 1) % 2)
        src = hbuf_ptr + src_slot * slot
        dst = hbuf_ptr + (1 + s % 2) * slot
        step = t.to(tl.int64) * B
        xg = xw_ptr + step * GH + (rows[:, None] * GH + cols[None, :])
        hk = tl.load(src + (rows[:, None] * HP + ks[None, :]))
        p0, p1, p2, p3 = _split_gates(tl.dot(hk, w, input_precision=PRECISION), BLOCK_B,
                                      UNITS, G4)
        x0, x1, x2, x3 = xw_plus_bias(xg, b_ptr, cols, col_ok, m2, H, CELL, G, HAS_BIAS,
                                      BLOCK_B, UNITS)
        finish_step(x0 + p0, x1 + p1, x2 + p2, x3 + p3, xg, s, own, m2, valid, rows, cols, H,
                    h0_ptr, c0_ptr, h_ptr, c_ptr, dst, rows[:, None] * HP + cols[None, :],
                    y_ptr + step * H, hprev_ptr + step * H,
                    gates_ptr + step * (TG * H), ctape_ptr + step * H, CELL, TG, ACT, KEEP_TAPE)
        step_barrier(sync_ptr + pid_b, (i + 1) * n_split, GRID_SYNC)
