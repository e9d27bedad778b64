"""Fused recurrence of the seed's TwoStageRNN: kernels, launcher, reference.

One step is two dependent products (DESIGN §2):
``a_t = f(xw_t + W_aa h_{t-1})``, then ``h_t = g(W_ha a_t + W_hh h_{t-1} + b_h)``.
Both run in one launch for the whole sequence, tiled as in :mod:`.gated` (rows of the batch
by units of H). Each step has two phases with a barrier after each: phase A writes this
program's units of ``a_t`` to ``abuf``, phase B needs all of ``a_t``. Phases are numbered
``p = 2s + {0, 1}`` so that a launch can also run one phase at a time (the interpreter's
barrier-free split mode, see :func:`rnn_gpu.kernels.triton.launch_spans`).

Backward, iteration i handles step s = T-1-i: phase A adds the recurrent gradient of step s+1
(``dpre_a @ W_aa + dpre_h @ W_hh``) and forms ``dpre_h = (dh + dy_t) g'(h_t)``; phase B forms
``dpre_a = (dpre_hᵀ W_ha) f'(a_t)``, which is ``dxw``. Weight gradients are GEMMs afterwards.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import launch_spans, rows_product, steps_of
from .common import (
    activate,
    activation_grad,
    cooperative,
    program_rows,
    row_block_dot,
    step_and_next,
    step_barrier,
    time_index,
    valid_rows,
    weights_transposed,
)
from .gated import Tiles


@triton.jit(do_not_specialize=["T", "B", "p_begin", "n_phases"])
def _twostage_fwd_kernel(
    xw_ptr, waa_ptr, wha_ptr, whh_ptr, b_ptr, h0_ptr, len_ptr,
    y_ptr, hbuf_ptr, abuf_ptr, h_ptr, atape_ptr, htape_ptr, hprev_ptr, sync_ptr,
    T, B, H, p_begin, n_phases,
    F: tl.constexpr, G: tl.constexpr, REVERSE: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, KEEP_TAPE: tl.constexpr, GRID_SYNC: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr, UNITS: tl.constexpr, W_TRANSPOSED: tl.constexpr = False,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_split = tl.num_programs(1)
    dtype = y_ptr.dtype.element_ty
    rows, row_ok, rows64, lens, unit_end = program_rows(B, H, len_ptr, HAS_LENGTHS, BLOCK_B,
                                                        UNITS)
    BH = B.to(tl.int64) * H
    h_rows = rows64 * H
    # W (unit j, k) at j*H + k as stored, or at k*H + j when the weights come transposed (the
    # float32 FMA products' layout, common.weights_transposed)
    if W_TRANSPOSED:
        stride_wk, stride_wj = H, 1
    else:
        stride_wk, stride_wj = 1, H
    for q in range(n_phases):
        p = p_begin + q
        s = p // 2
        t = time_index(s, T, REVERSE)
        src = hbuf_ptr + tl.where(s == 0, 0, 1 + (s + 1) % 2) * BH
        s_rows = (t.to(tl.int64) * B + rows64) * H
        for j0 in range(pid_h * UNITS, unit_end, BLOCK_H):
            cols = j0 + tl.arange(0, BLOCK_H)
            col_ok = cols < unit_end
            m2 = row_ok[:, None] & col_ok[None, :]
            own = h_rows[:, None] + cols[None, :]
            if p % 2 == 0:                                   # phase A: a_t
                acc = tl.load(xw_ptr + s_rows[:, None] + cols[None, :], mask=m2,
                              other=0.0).to(tl.float32)
                acc = row_block_dot(acc, src, h_rows, row_ok, H, waa_ptr, stride_wk, stride_wj,
                                    cols, col_ok, BLOCK_K, PRECISION)
                a = activate(acc, F)
                tl.store(abuf_ptr + own, a.to(dtype), mask=m2)
                if KEEP_TAPE:
                    tl.store(atape_ptr + s_rows[:, None] + cols[None, :], a, mask=m2)
            else:                                            # phase B: h_t
                acc = tl.full((BLOCK_B, BLOCK_H), 0.0, tl.float32)
                if HAS_BIAS:
                    acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                acc = row_block_dot(acc, abuf_ptr, h_rows, row_ok, H, wha_ptr, stride_wk,
                                    stride_wj, cols, col_ok, BLOCK_K, PRECISION)
                acc = row_block_dot(acc, src, h_rows, row_ok, H, whh_ptr, stride_wk,
                                    stride_wj, cols, col_ok, BLOCK_K, PRECISION)
                h_new = activate(acc, G)
                if s == 0:
                    h_prev = tl.load(h0_ptr + own, mask=m2, other=0.0)
                else:
                    h_prev = tl.load(h_ptr + own, mask=m2, other=0.0)
                valid = valid_rows(row_ok, t, lens, HAS_LENGTHS)
                h_keep = tl.where(valid[:, None], h_new, h_prev)
                tl.store(h_ptr + own, h_keep, mask=m2)
                tl.store(hbuf_ptr + (1 + s % 2) * BH + own, h_keep.to(dtype), mask=m2)
                tl.store(y_ptr + s_rows[:, None] + cols[None, :],
                         tl.where(valid[:, None], h_new, 0.0).to(dtype), mask=m2)
                if KEEP_TAPE:
                    tl.store(htape_ptr + s_rows[:, None] + cols[None, :], h_new, mask=m2)
                    tl.store(hprev_ptr + s_rows[:, None] + cols[None, :], h_prev.to(dtype),
                             mask=m2)
        step_barrier(sync_ptr + pid_b, (q + 1) * n_split, GRID_SYNC)


@triton.jit(do_not_specialize=["T", "B", "p_begin", "n_phases"])
def _twostage_bwd_kernel(
    dy_ptr, waa_ptr, wha_ptr, whh_ptr, len_ptr, atape_ptr, htape_ptr, dhT_ptr,
    dxw_ptr, dph_ptr, dh_ptr, sync_ptr,
    T, B, H, p_begin, n_phases,
    F: tl.constexpr, G: tl.constexpr, REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    GRID_SYNC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, UNITS: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_split = tl.num_programs(1)
    dtype = dxw_ptr.dtype.element_ty
    rows, row_ok, rows64, lens, unit_end = program_rows(B, H, len_ptr, HAS_LENGTHS, BLOCK_B,
                                                        UNITS)
    h_rows = rows64 * H
    for q in range(n_phases):
        p = p_begin + q
        i = p // 2
        s = T - 1 - i
        t, t_next, valid, valid_next = step_and_next(s, T, row_ok, lens, REVERSE, HAS_LENGTHS)
        s_rows = (t.to(tl.int64) * B + rows64) * H
        next_rows = (t_next.to(tl.int64) * B + rows64) * H
        for j0 in range(pid_h * UNITS, unit_end, BLOCK_H):
            cols = j0 + tl.arange(0, BLOCK_H)
            col_ok = cols < unit_end
            m2 = row_ok[:, None] & col_ok[None, :]
            vm = valid[:, None] & m2
            own = h_rows[:, None] + cols[None, :]
            if p % 2 == 0:                                   # phase A: dh, dpre_h
                if i == 0:
                    dh = tl.load(dhT_ptr + own, mask=m2, other=0.0)
                else:
                    dh = tl.load(dh_ptr + own, mask=m2, other=0.0)
                    rec = tl.full((BLOCK_B, BLOCK_H), 0.0, tl.float32)
                    rec = row_block_dot(rec, dxw_ptr, next_rows, row_ok, H, waa_ptr, H, 1, cols,
                                        col_ok, BLOCK_K, PRECISION)
                    rec = row_block_dot(rec, dph_ptr, next_rows, row_ok, H, whh_ptr, H, 1, cols,
                                        col_ok, BLOCK_K, PRECISION)
                    dh += tl.where(valid_next[:, None], rec, 0.0)
                if i < T:
                    dh_new = dh + tl.load(dy_ptr + s_rows[:, None] + cols[None, :], mask=m2,
                                          other=0.0).to(tl.float32)
                    hn = tl.load(htape_ptr + s_rows[:, None] + cols[None, :], mask=m2, other=0.0)
                    dph = tl.where(vm, dh_new * activation_grad(hn, G), 0.0)
                    tl.store(dph_ptr + s_rows[:, None] + cols[None, :], dph.to(dtype), mask=m2)
                    tl.store(dh_ptr + own, tl.where(valid[:, None], 0.0, dh), mask=m2)
                else:
                    tl.store(dh_ptr + own, dh, mask=m2)
            else:                                            # phase B: dpre_a = dxw
                da = tl.full((BLOCK_B, BLOCK_H), 0.0, tl.float32)
                da = row_block_dot(da, dph_ptr, s_rows, row_ok, H, wha_ptr, H, 1, cols, col_ok,
                                   BLOCK_K, PRECISION)
                a = tl.load(atape_ptr + s_rows[:, None] + cols[None, :], mask=m2, other=0.0)
                dpa = tl.where(vm, da * activation_grad(a, F), 0.0)
                tl.store(dxw_ptr + s_rows[:, None] + cols[None, :], dpa.to(dtype), mask=m2)
        if i < T:
            step_barrier(sync_ptr + pid_b, (q + 1) * n_split, GRID_SYNC)


@dataclass
class TwoStageTape:
    acts: tuple[int, int]
    reverse: bool
    precision: str
    tiles: Tiles
    grid_sync: bool
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor]     # W_aa, W_ha, W_hh
    has_bias: bool
    lengths: torch.Tensor | None
    atape: torch.Tensor
    htape: torch.Tensor
    hprev: torch.Tensor


def _consts(acts, tiles: Tiles, precision: str, grid_sync: bool):
    return dict(F=acts[0], G=acts[1], GRID_SYNC=grid_sync, PRECISION=precision,
                BLOCK_B=tiles.block_b, BLOCK_H=tiles.block_h, BLOCK_K=tiles.block_k,
                UNITS=tiles.units, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
                launch_cooperative_grid=cooperative(grid_sync))


def twostage_forward(acts: tuple[int, int], xw, w_aa, w_ha, w_hh, b_h, h0, lengths, *,
                     reverse: bool, keep_tape: bool, precision: str, tiles: Tiles,
                     grid_sync: bool):
    """``xw`` (T, B, H) = ``W_ia x + b_a``; returns ``y``, ``h_T`` (fp32) and a tape."""
    T, B, H = xw.shape
    dev, dt = xw.device, xw.dtype
    f32 = torch.float32
    y = torch.empty((T, B, H), device=dev, dtype=dt)
    hbuf = torch.empty((3, B, H), device=dev, dtype=dt)
    hbuf[0].copy_(h0)
    abuf = torch.empty((B, H), device=dev, dtype=dt)
    h0f = h0.to(f32).contiguous()
    h = torch.empty((B, H), device=dev, dtype=f32)
    if keep_tape:
        atape = torch.empty((T, B, H), device=dev, dtype=f32)
        htape = torch.empty((T, B, H), device=dev, dtype=f32)
        hprev = torch.empty((T, B, H), device=dev, dtype=dt)
    else:
        atape = htape = hprev = y
    grid = tiles.grid(B, H)
    split = grid[1] > 1
    consts = _consts(acts, tiles, precision, grid_sync and split)
    transposed = weights_transposed(dt, precision)
    ws = [w.t().contiguous() if transposed else w for w in (w_aa, w_ha, w_hh)]
    for p_begin, n in launch_spans(2 * T, grid_sync, split, grid[1]):
        sync = torch.zeros((grid[0],), device=dev, dtype=torch.int32)
        _twostage_fwd_kernel[grid](
            xw, *ws, b_h if b_h is not None else w_hh, h0f,
            lengths if lengths is not None else sync, y, hbuf, abuf, h, atape, htape, hprev,
            sync, T, B, H, p_begin, n, REVERSE=reverse, HAS_BIAS=b_h is not None,
            HAS_LENGTHS=lengths is not None, KEEP_TAPE=keep_tape, W_TRANSPOSED=transposed,
            **consts)
    tape = None
    if keep_tape:
        tape = TwoStageTape(acts, reverse, precision, tiles, grid_sync, (w_aa, w_ha, w_hh),
                            b_h is not None, lengths, atape, htape, hprev)
    return y, h, tape


def twostage_backward(tape: TwoStageTape, dy, dhT, *, tiles: Tiles | None = None,
                      grid_sync: bool | None = None):
    """Returns ``dxw``, ``dh0`` (fp32) and ``(dW_aa, dW_ha, dW_hh, db_h)`` (db_h None without
    bias), the weight gradients in the weights' dtype. ``tiles``/``grid_sync`` default to the
    forward's (see :func:`.gated.gated_backward`)."""
    if tiles is None:
        tiles, grid_sync = tape.tiles, tape.grid_sync
    T, B, H = dy.shape
    dev, dt = dy.device, dy.dtype
    f32 = torch.float32
    w_aa, w_ha, w_hh = tape.weights
    dxw = torch.empty((T, B, H), device=dev, dtype=dt)
    dph = torch.empty((T, B, H), device=dev, dtype=dt)
    dh = torch.empty((B, H), device=dev, dtype=f32)
    grid = tiles.grid(B, H)
    split = grid[1] > 1
    consts = _consts(tape.acts, tiles, tape.precision, bool(grid_sync) and split)
    for p_begin, n in launch_spans(2 * T + 1, bool(grid_sync), split, grid[1]):
        sync = torch.zeros((grid[0],), device=dev, dtype=torch.int32)
        _twostage_bwd_kernel[grid](
            dy, w_aa, w_ha, w_hh, tape.lengths if tape.lengths is not None else sync,
            tape.atape, tape.htape, dhT.to(f32).contiguous(), dxw, dph, dh, sync,
            T, B, H, p_begin, n, REVERSE=tape.reverse, HAS_LENGTHS=tape.lengths is not None,
            **consts)
    hprev = tape.hprev.reshape(T * B, H)
    dpa, dph2 = dxw.reshape(T * B, H), dph.reshape(T * B, H)
    wdt = w_hh.dtype
    p = tape.precision
    grads = (rows_product(dpa, hprev, p).to(wdt),
             rows_product(dph2, tape.atape.reshape(T * B, H).to(dt), p).to(wdt),
             rows_product(dph2, hprev, p).to(wdt),
             dph2.sum(0, dtype=f32).to(wdt) if tape.has_bias else None)
    return dxw, dh, grads


def twostage_tape_steps(tape: TwoStageTape, n: int) -> TwoStageTape:
    """The tape of the first ``n`` steps (see :func:`.gated.gated_tape_steps`)."""
    return dataclasses.replace(tape, atape=steps_of(tape.atape, n),
                               htape=steps_of(tape.htape, n), hprev=steps_of(tape.hprev, n))


def naive_twostage(acts: tuple[int, int], xw, w_aa, w_ha, w_hh, b_h, h0, lengths, *,
                   reverse: bool):
    """Plain torch, one step at a time, straight from DESIGN §2 (for tests; differentiable)."""
    fns = {0: torch.tanh, 1: torch.sigmoid, 2: torch.relu}
    f, g = fns[acts[0]], fns[acts[1]]
    T, B, _ = xw.shape
    h = h0
    ys = [None] * T
    for s in range(T):
        t = T - 1 - s if reverse else s
        a = f(xw[t] + h @ w_aa.t())
        h_new = g(a @ w_ha.t() + h @ w_hh.t() + (b_h if b_h is not None else 0))
        valid = (torch.ones((B, 1), dtype=torch.bool, device=xw.device) if lengths is None
                 else (t < lengths.to(xw.device))[:, None])
        ys[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
        h = torch.where(valid, h_new, h)
    return torch.stack(ys), h
