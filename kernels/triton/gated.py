"""Fused recurrence of the one-product cells (RNN, LSTM, GRU): kernels, launcher, reference.

One launch runs the whole sequence (persistent in time); the sequence length, the batch size
and the step range are not specialised on (``do_not_specialize``), so a new T or B never
compiles a new kernel (and B=1 is not turned into a constant that has no ``.to()``).
Program ``(pb, ph)`` owns the rows ``pb*BLOCK_B ...`` of the batch and the hidden units
``ph*UNITS ...`` of every gate, which it walks in blocks of ``BLOCK_H``. Each step it reads
the full ``h_{t-1}`` of its rows (``hbuf``, in the compute dtype), multiplies it by its
columns of ``W_hh`` with ``tl.dot`` (fp32 accumulation, ``W_hh`` streamed from L2), applies the
gate math, and writes its units of ``h_t`` to the other half of ``hbuf``. Then the programs of
one row block meet at a barrier: within the program only when one program holds all units
(large batch: no cross-program synchronisation at all), or across the grid when the units are
split (small batch, where one program per row block would leave most SMs idle; DESIGN §5
measured 0.04x of cuDNN without the split at 512x64x1024). A second forward kernel,
:mod:`.gated_resident`, keeps each program's columns of W_hh in shared memory for the whole
sequence instead (small batch, half precision); :func:`gated_forward` runs either
(``Tiles.resident``), and both end each step with :mod:`.gated_step`.

State: the fp32 state of a program's own units lives in ``h``/``c`` (fp32, (B, H)), which it
alone reads and writes; ``hbuf`` holds three (B, H) slots in the compute dtype: slot 0 is
``h_0`` (never written by the kernel, so a launch can be repeated, e.g. when timing tiles),
slots 1 and 2 alternate as ``h_t``. Double buffering lets one barrier per step suffice.

Backward runs the fused step in reverse: each step's recurrent gradient
``dh_{t-1} += dgates_t @ W_hh`` is the same kind of product over the full ``dgates_t`` (the
previous iteration's output, read back after the barrier); the weight gradients are two large
GEMMs after the loop (``dW_hh = dgatesᵀ · h_prev``, ``db_hh = Σ dgates``).

Tape (what backward reads), indexed by time t: ``gates`` (T, B, TAPE_GATES*H) fp32 holds the
activated gates (LSTM i, f, g, o; GRU r, z, n and ``W_hn h + b_hn``; RNN h_t), ``c`` (T, B, H)
fp32 the LSTM cell state after each step, ``hprev`` (T, B, H) the state before each step in the
compute dtype (the operand of ``dW_hh``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import MAX_STEP_ELEMENTS, launch_spans, rows_product, step_elements, steps_of
from .common import (
    GRU,
    LSTM,
    RNN,
    activation_grad,
    cooperative,
    program_rows,
    step_and_next,
    step_barrier,
    tanh,
    time_index,
    valid_rows,
    weights_transposed,
)
from .gated_resident import gate_slots, gated_fwd_resident_kernel
from .gated_step import finish_step, xw_plus_bias

GATES = {RNN: 1, LSTM: 4, GRU: 3}
TAPE_GATES = {RNN: 1, LSTM: 4, GRU: 4}


@triton.jit(do_not_specialize=["T", "B", "t_begin", "n_steps"])
def _gated_fwd_kernel(
    xw_ptr, w_ptr, b_ptr, h0_ptr, c0_ptr, len_ptr,
    y_ptr, hbuf_ptr, h_ptr, c_ptr, gates_ptr, ctape_ptr, hprev_ptr, sync_ptr,
    T, B, H, t_begin, n_steps,
    CELL: tl.constexpr, G: tl.constexpr, TG: tl.constexpr, ACT: tl.constexpr,
    REVERSE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    KEEP_TAPE: tl.constexpr, GRID_SYNC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, UNITS: tl.constexpr,
    W_TRANSPOSED: tl.constexpr = False,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_split = tl.num_programs(1)
    rows, row_ok, _, lens, unit_end = program_rows(B, H, len_ptr, HAS_LENGTHS, BLOCK_B, UNITS)
    GH = G * H
    BH = B.to(tl.int64) * H
    # w_ptr holds W_hh (G*H, H), element (unit n, k) at n*H + k, or with W_TRANSPOSED W_hhᵀ
    # (H, G*H), at k*G*H + n: the float32 FMA products' layout (common.weights_transposed)
    if W_TRANSPOSED:
        gate_stride = H
    else:
        gate_stride = H * H
    for i in range(n_steps):
        s = t_begin + i
        t = time_index(s, T, REVERSE)
        valid = valid_rows(row_ok, t, lens, HAS_LENGTHS)
        src_slot = tl.where(s == 0, 0, 1 + (s + 1) % 2)
        src = hbuf_ptr + src_slot * BH
        dst = hbuf_ptr + (1 + s % 2) * BH
        # int64 only for the step's start; offsets within the step are int32 (see
        # MAX_STEP_ELEMENTS: 64-bit offset tiles pushed every tiling into spills)
        step = t.to(tl.int64) * B
        xw_t = xw_ptr + step * GH
        y_t = y_ptr + step * H
        hprev_t = hprev_ptr + step * H
        ctape_t = ctape_ptr + step * H
        gates_t = gates_ptr + step * (TG * H)
        for j0 in range(pid_h * UNITS, unit_end, BLOCK_H):
            cols = j0 + tl.arange(0, BLOCK_H)
            col_ok = cols < unit_end
            m2 = row_ok[:, None] & col_ok[None, :]
            own = rows[:, None] * H + cols[None, :]
            # The accumulators start from xw (+ b_hh): no x tile stays live across the k-loop
            xg = xw_t + (rows[:, None] * GH + cols[None, :])
            acc0, acc1, acc2, acc3 = xw_plus_bias(xg, b_ptr, cols, col_ok, m2, H, CELL, G,
                                                  HAS_BIAS, BLOCK_B, BLOCK_H)
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < H
                hk = tl.load(src + (rows[:, None] * H + ks[None, :]),
                             mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                wmask = k_ok[:, None] & col_ok[None, :]
                if W_TRANSPOSED:                                     # W_hhᵀ block (k, unit)
                    w_cols = w_ptr + ks[:, None] * GH + cols[None, :]
                else:
                    w_cols = w_ptr + cols[None, :] * H + ks[:, None]
                acc0 = tl.dot(hk, tl.load(w_cols, mask=wmask, other=0.0), acc0,
                              input_precision=PRECISION)
                if G > 1:
                    acc1 = tl.dot(hk, tl.load(w_cols + gate_stride, mask=wmask, other=0.0),
                                  acc1, input_precision=PRECISION)
                    acc2 = tl.dot(hk, tl.load(w_cols + 2 * gate_stride, mask=wmask, other=0.0),
                                  acc2, input_precision=PRECISION)
                if G > 3:
                    acc3 = tl.dot(hk, tl.load(w_cols + 3 * gate_stride, mask=wmask, other=0.0),
                                  acc3, input_precision=PRECISION)
            finish_step(acc0, acc1, acc2, acc3, xg, s, own, m2, valid, rows, cols, H, h0_ptr,
                        c0_ptr, h_ptr, c_ptr, dst, own, y_t, hprev_t, gates_t, ctape_t, CELL,
                        TG, ACT, KEEP_TAPE)
        step_barrier(sync_ptr + pid_b, (i + 1) * n_split, GRID_SYNC)


@triton.jit(do_not_specialize=["T", "B", "t_begin", "n_steps"])
def _gated_bwd_kernel(
    dy_ptr, w_ptr, len_ptr, gates_ptr, ctape_ptr, hprev_ptr, c0_ptr, dhT_ptr, dcT_ptr,
    dxw_ptr, dhh_ptr, dh_ptr, dc_ptr, sync_ptr,
    T, B, H, t_begin, n_steps,
    CELL: tl.constexpr, G: tl.constexpr, TG: tl.constexpr, ACT: tl.constexpr,
    REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr, GRID_SYNC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, UNITS: tl.constexpr,
):
    """Iteration i (0..T) handles forward step s = T-1-i: it first adds the recurrent gradient
    of step s+1 (``dgates_{s+1} @ W_hh``, i > 0), then back-propagates step s (i < T).
    Iteration T only finishes ``dh_0``. ``dh``/``dc`` carry each program's own units."""
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_split = tl.num_programs(1)
    dtype = dxw_ptr.dtype.element_ty
    rows, row_ok, _, lens, unit_end = program_rows(B, H, len_ptr, HAS_LENGTHS, BLOCK_B, UNITS)
    GH = G * H
    for i in range(t_begin, t_begin + n_steps):
        s = T - 1 - i
        t, t_next, valid, valid_next = step_and_next(s, T, row_ok, lens, REVERSE, HAS_LENGTHS)
        # int64 only for each step's start; offsets within a step are int32, as in the forward
        # (int64 offset tiles cost two registers per element; spills: see MAX_STEP_ELEMENTS)
        step = t.to(tl.int64) * B
        dhh_next = dhh_ptr + t_next.to(tl.int64) * B * GH      # dgates of step s+1
        dx_t = dxw_ptr + step * GH
        dhh_t = dhh_ptr + step * GH
        gates_t = gates_ptr + step * (TG * H)
        dy_t = dy_ptr + step * H
        ctape_t = ctape_ptr + step * H
        hprev_t = hprev_ptr + step * H
        x_rows = rows * GH
        for j0 in range(pid_h * UNITS, unit_end, BLOCK_H):
            cols = j0 + tl.arange(0, BLOCK_H)
            col_ok = cols < unit_end
            m2 = row_ok[:, None] & col_ok[None, :]
            own = rows[:, None] * H + cols[None, :]        # also a step's (b, u) offset
            dc = tl.full((BLOCK_B, BLOCK_H), 0.0, tl.float32)   # only LSTM has a cell
            if i == 0:                                # state (the others' dc buffers are
                dh = tl.load(dhT_ptr + own, mask=m2, other=0.0)   # one-element placeholders)
                if CELL == 1:
                    dc = tl.load(dcT_ptr + own, mask=m2, other=0.0)
            else:
                dh = tl.load(dh_ptr + own, mask=m2, other=0.0)
                if CELL == 1:
                    dc = tl.load(dc_ptr + own, mask=m2, other=0.0)
                rec = tl.full((BLOCK_B, BLOCK_H), 0.0, tl.float32)
                for m0 in range(0, GH, BLOCK_K):
                    ms = m0 + tl.arange(0, BLOCK_K)
                    m_ok = ms < GH
                    a = tl.load(dhh_next + x_rows[:, None] + ms[None, :],
                                mask=row_ok[:, None] & m_ok[None, :], other=0.0)
                    w = tl.load(w_ptr + ms[:, None] * H + cols[None, :],
                                mask=m_ok[:, None] & col_ok[None, :], other=0.0)
                    rec = tl.dot(a, w, rec, input_precision=PRECISION)
                dh += tl.where(valid_next[:, None], rec, 0.0)
            if i < T:
                dh_new = dh + tl.load(dy_t + own, mask=m2, other=0.0).to(tl.float32)
                vm = valid[:, None] & m2
                gt = gates_t + (rows[:, None] * (TG * H) + cols[None, :])
                dx_out = dx_t + (x_rows[:, None] + cols[None, :])
                g0 = tl.load(gt, mask=m2, other=0.0)
                carry = dh
                if CELL == 0:                                 # RNN
                    d0 = tl.where(vm, dh_new * activation_grad(g0, ACT), 0.0)
                    tl.store(dx_out, d0.to(dtype), mask=m2)
                    carry = tl.where(valid[:, None], 0.0, dh)
                elif CELL == 1:                               # LSTM
                    g1 = tl.load(gt + H, mask=m2, other=0.0)
                    g2 = tl.load(gt + 2 * H, mask=m2, other=0.0)
                    g3 = tl.load(gt + 3 * H, mask=m2, other=0.0)
                    c_t = tl.load(ctape_t + own, mask=m2, other=0.0)
                    if s == 0:
                        c_prev = tl.load(c0_ptr + own, mask=m2, other=0.0)
                    else:
                        t_prev = time_index(s - 1, T, REVERSE)
                        c_prev = tl.load(ctape_ptr + t_prev.to(tl.int64) * B * H + own,
                                         mask=m2, other=0.0)
                    tc = tanh(c_t)
                    dct = dc + dh_new * g3 * (1.0 - tc * tc)
                    d0 = tl.where(vm, dct * g2 * g0 * (1.0 - g0), 0.0)
                    d1 = tl.where(vm, dct * c_prev * g1 * (1.0 - g1), 0.0)
                    d2 = tl.where(vm, dct * g0 * (1.0 - g2 * g2), 0.0)
                    d3 = tl.where(vm, dh_new * tc * g3 * (1.0 - g3), 0.0)
                    tl.store(dx_out, d0.to(dtype), mask=m2)
                    tl.store(dx_out + H, d1.to(dtype), mask=m2)
                    tl.store(dx_out + 2 * H, d2.to(dtype), mask=m2)
                    tl.store(dx_out + 3 * H, d3.to(dtype), mask=m2)
                    dc = tl.where(valid[:, None], dct * g1, dc)
                    carry = tl.where(valid[:, None], 0.0, dh)
                else:                                         # GRU
                    g1 = tl.load(gt + H, mask=m2, other=0.0)
                    g2 = tl.load(gt + 2 * H, mask=m2, other=0.0)
                    g3 = tl.load(gt + 3 * H, mask=m2, other=0.0)
                    h_prev = tl.load(hprev_t + own, mask=m2, other=0.0).to(tl.float32)
                    dn = dh_new * (1.0 - g1) * (1.0 - g2 * g2)
                    d1 = tl.where(vm, dh_new * (h_prev - g2) * g1 * (1.0 - g1), 0.0)
                    d0 = tl.where(vm, dn * g3 * g0 * (1.0 - g0), 0.0)
                    d2 = tl.where(vm, dn, 0.0)
                    tl.store(dx_out, d0.to(dtype), mask=m2)
                    tl.store(dx_out + H, d1.to(dtype), mask=m2)
                    tl.store(dx_out + 2 * H, d2.to(dtype), mask=m2)
                    dhh_out = dhh_t + (x_rows[:, None] + cols[None, :])
                    tl.store(dhh_out, d0.to(dtype), mask=m2)
                    tl.store(dhh_out + H, d1.to(dtype), mask=m2)
                    tl.store(dhh_out + 2 * H, (d2 * g0).to(dtype), mask=m2)
                    carry = tl.where(valid[:, None], dh_new * g1, dh)
                tl.store(dh_ptr + own, carry, mask=m2)
                if CELL == 1:
                    tl.store(dc_ptr + own, dc, mask=m2)
            else:
                tl.store(dh_ptr + own, dh, mask=m2)
                if CELL == 1:
                    tl.store(dc_ptr + own, dc, mask=m2)
        if i < T:
            step_barrier(sync_ptr + pid_b, (i - t_begin + 1) * n_split, GRID_SYNC)


# ----------------------------------------------------------------------------- launcher

@dataclass(frozen=True)
class Tiles:
    """How one call is cut into programs (see :mod:`.launch`)."""

    block_b: int
    block_h: int
    block_k: int
    units: int          # hidden units per program (a multiple of block_h)
    num_warps: int = 4
    num_stages: int = 2
    resident: bool = False  # forward only: W_hh kept in shared memory (.gated_resident)

    def grid(self, B: int, H: int) -> tuple[int, int]:
        return triton.cdiv(B, self.block_b), triton.cdiv(H, self.units)


@dataclass
class GatedTape:
    cell: int
    act: int
    reverse: bool
    precision: str
    tiles: Tiles
    grid_sync: bool
    w_hh: torch.Tensor
    has_bias: bool
    lengths: torch.Tensor | None
    c0: torch.Tensor
    gates: torch.Tensor
    ctape: torch.Tensor
    hprev: torch.Tensor


def _constexprs(cell, act, tiles: Tiles, precision, grid_sync, H: int = 0):
    """The kernels' compile-time arguments; with ``tiles.resident`` (and ``H``) the resident
    forward's, which has no k-loop and no unit blocks."""
    common = dict(CELL=cell, G=GATES[cell], TG=TAPE_GATES[cell], ACT=act, GRID_SYNC=grid_sync,
                  PRECISION=precision, BLOCK_B=tiles.block_b, UNITS=tiles.units,
                  num_warps=tiles.num_warps, num_stages=tiles.num_stages,
                  launch_cooperative_grid=cooperative(grid_sync))
    if tiles.resident:
        return dict(common, G4=gate_slots(GATES[cell]), HP=triton.next_power_of_2(H))
    return dict(common, BLOCK_H=tiles.block_h, BLOCK_K=tiles.block_k)


def gated_forward(cell: int, act: int, xw: torch.Tensor, w_hh: torch.Tensor,
                  b_hh: torch.Tensor | None, h0: torch.Tensor, c0: torch.Tensor | None,
                  lengths: torch.Tensor | None, *, reverse: bool, keep_tape: bool,
                  precision: str, tiles: Tiles, grid_sync: bool):
    """One layer and direction. ``xw`` (T, B, G*H) contiguous; ``h0``/``c0`` (B, H) any float
    dtype. Returns ``y`` (T, B, H) in xw's dtype, ``h_T`` and ``c_T`` (fp32) and a tape."""
    T, B, GH = xw.shape
    H = w_hh.shape[1]
    if step_elements(B, H) > MAX_STEP_ELEMENTS:
        raise ValueError(f"gated_forward: batch {B} x hidden size {H} addresses "
                         f"{step_elements(B, H)} elements per step, more than the kernel's "
                         f"32-bit offsets reach ({MAX_STEP_ELEMENTS}); split the batch")
    dev, dt = xw.device, xw.dtype
    f32 = torch.float32
    y = torch.empty((T, B, H), device=dev, dtype=dt)
    if tiles.resident:       # padded to whole row blocks and HP columns, the padding zero
        hbuf = torch.zeros((3, triton.cdiv(B, tiles.block_b) * tiles.block_b,
                            triton.next_power_of_2(H)), device=dev, dtype=dt)
        hbuf[0, :B, :H].copy_(h0)
    else:
        hbuf = torch.empty((3, B, H), device=dev, dtype=dt)
        hbuf[0].copy_(h0)
    h0f = h0.to(f32).contiguous()
    # LSTM reads c0 at (B, H) offsets: zeros of that shape when not given (a 1-element
    # placeholder serves the cells that never read it)
    c0f = (c0 if c0 is not None else torch.zeros((B, H) if cell == LSTM else (1,), device=dev)
           ).to(f32).contiguous()
    h = torch.empty((B, H), device=dev, dtype=f32)
    c = torch.empty((B, H), device=dev, dtype=f32) if cell == LSTM else h
    if keep_tape:
        gates = torch.empty((T, B, TAPE_GATES[cell] * H), device=dev, dtype=f32)
        ctape = torch.empty((T, B, H), device=dev, dtype=f32) if cell == LSTM else gates
        hprev = torch.empty((T, B, H), device=dev, dtype=dt)
    else:
        gates = ctape = hprev = y                    # never written (KEEP_TAPE is off)
    grid = tiles.grid(B, H)
    split = grid[1] > 1
    consts = _constexprs(cell, act, tiles, precision, grid_sync and split, H)
    kernel, w_arg = gated_fwd_resident_kernel, w_hh
    if not tiles.resident:
        kernel = _gated_fwd_kernel
        consts["W_TRANSPOSED"] = weights_transposed(dt, precision)
        if consts["W_TRANSPOSED"]:     # conflict-free FMA operand reads (see common.py)
            w_arg = w_hh.t().contiguous()
    for t_begin, n in launch_spans(T, grid_sync, split, grid[1]):
        sync = torch.zeros((grid[0],), device=dev, dtype=torch.int32)
        kernel[grid](
            xw, w_arg, b_hh if b_hh is not None else w_hh, h0f, c0f,
            lengths if lengths is not None else sync,
            y, hbuf, h, c, gates, ctape, hprev, sync, T, B, H, t_begin, n,
            REVERSE=reverse, HAS_BIAS=b_hh is not None, HAS_LENGTHS=lengths is not None,
            KEEP_TAPE=keep_tape, **consts)
    tape = None
    if keep_tape:
        tape = GatedTape(cell, act, reverse, precision, tiles, grid_sync, w_hh,
                         b_hh is not None, lengths, c0f if cell == LSTM else h0f, gates, ctape,
                         hprev)
    return y, h, (c if cell == LSTM else None), tape


def gated_backward(tape: GatedTape, dy: torch.Tensor, dhT: torch.Tensor,
                   dcT: torch.Tensor | None, *, tiles: Tiles | None = None,
                   grid_sync: bool | None = None):
    """Returns ``dxw`` (T, B, G*H), ``dh0``, ``dc0`` (fp32, dc0 None unless LSTM),
    ``dW_hh`` and ``db_hh`` (None without bias), the last two in W_hh's dtype. ``tiles`` and
    ``grid_sync`` default to the forward's: the tape is laid out per step, not per tiling, so
    the backward may be cut differently (its best tiling is not the forward's, see
    :mod:`.launch`)."""
    if tiles is None:
        tiles, grid_sync = tape.tiles, tape.grid_sync
    if tiles.resident:
        raise ValueError("gated_backward: resident tiles serve the forward only; pass tiles=")
    T, B, H = dy.shape
    cell, w_hh = tape.cell, tape.w_hh
    dev, dt = dy.device, dy.dtype
    f32 = torch.float32
    GH = GATES[cell] * H
    dxw = torch.empty((T, B, GH), device=dev, dtype=dt)
    dhh = torch.empty((T, B, GH), device=dev, dtype=dt) if cell == GRU else dxw
    dhTf = dhT.to(f32).contiguous()
    dcTf = (dcT if dcT is not None else torch.zeros((1,), device=dev)).to(f32).contiguous()
    dh = torch.empty((B, H), device=dev, dtype=f32)
    dc = torch.empty((B, H), device=dev, dtype=f32) if cell == LSTM else dh
    grid = tiles.grid(B, H)
    split = grid[1] > 1
    consts = _constexprs(cell, tape.act, tiles, tape.precision, bool(grid_sync) and split)
    for t_begin, n in launch_spans(T + 1, bool(grid_sync), split, grid[1]):
        sync = torch.zeros((grid[0],), device=dev, dtype=torch.int32)
        _gated_bwd_kernel[grid](
            dy, w_hh, tape.lengths if tape.lengths is not None else sync, tape.gates,
            tape.ctape, tape.hprev, tape.c0, dhTf, dcTf, dxw, dhh, dh, dc, sync,
            T, B, H, t_begin, n,
            REVERSE=tape.reverse, HAS_LENGTHS=tape.lengths is not None, **consts)
    flat = dhh.reshape(T * B, GH)
    dw = rows_product(flat, tape.hprev.reshape(T * B, H), tape.precision).to(w_hh.dtype)
    db = flat.sum(0, dtype=f32).to(w_hh.dtype) if tape.has_bias else None
    return dxw, dh, (dc if cell == LSTM else None), dw, db


def gated_tape_steps(tape: GatedTape, n: int) -> GatedTape:
    """The tape of the first ``n`` steps (repeated when the sequence is shorter), for timing
    the backward over ``n`` steps; the values do not change its cost."""
    gates = steps_of(tape.gates, n)
    ctape = gates if tape.ctape is tape.gates else steps_of(tape.ctape, n)
    return dataclasses.replace(tape, gates=gates, ctape=ctape, hprev=steps_of(tape.hprev, n))


# ----------------------------------------------------------------------------- reference

def naive_gated(cell: int, act: int, xw, w_hh, b_hh, h0, c0, lengths, *, reverse: bool):
    """Plain torch, one step at a time, straight from DESIGN §2 (for tests; differentiable)."""
    T, B, _ = xw.shape
    H = w_hh.shape[1]
    h, c = h0, c0
    ys = [None] * T
    acts = {0: torch.tanh, 1: torch.sigmoid, 2: torch.relu}
    for s in range(T):
        t = T - 1 - s if reverse else s
        hh = h @ w_hh.t() + (b_hh if b_hh is not None else 0)
        x = xw[t]
        if cell == RNN:
            h_new, c_new = acts[act](x + hh), None
        elif cell == LSTM:
            i, f, g, o = (x + hh).split(H, dim=1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
        else:
            xr, xz, xn = x.split(H, dim=1)
            hr, hz, hn = hh.split(H, dim=1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            h_new, c_new = (1 - z) * n + z * h, None
        if lengths is None:
            valid = torch.ones((B, 1), dtype=torch.bool, device=xw.device)
        else:
            valid = (t < lengths.to(xw.device))[:, None]
        ys[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
        h = torch.where(valid, h_new, h)
        if c_new is not None:
            c = torch.where(valid, c_new, c)
    return torch.stack(ys), h, c
