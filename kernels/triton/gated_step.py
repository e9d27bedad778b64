"""The part of a gated forward step that both forward kernels share (:mod:`.gated`, which streams
W_hh, and :mod:`.gated_resident`, which keeps it in shared memory): the input projection and
bias a step starts from, and everything after the recurrent product."""

from __future__ import annotations

import triton
import triton.language as tl

from .common import activate, sigmoid, tanh


@triton.jit
def xw_plus_bias(xg, b_ptr, cols, col_ok, m2, H, CELL: tl.constexpr, G: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """The step's input projection (and b_hh) of these rows and units, one fp32 tile per gate
    (zeros past G). GRU's n gate keeps W_hn h + b_hn apart: its x is added after the reset
    gate, in :func:`finish_step`."""
    acc0 = tl.load(xg, mask=m2, other=0.0).to(tl.float32)
    acc1 = tl.full((BLOCK_B, BLOCK_H), 0.0, tl.float32)
    acc2 = tl.full((BLOCK_B, BLOCK_H), 0.0, tl.float32)
    acc3 = tl.full((BLOCK_B, BLOCK_H), 0.0, tl.float32)
    if G > 1:
        acc1 = tl.load(xg + H, mask=m2, other=0.0).to(tl.float32)
        if CELL == 1:
            acc2 = tl.load(xg + 2 * H, mask=m2, other=0.0).to(tl.float32)
    if G > 3:
        acc3 = tl.load(xg + 3 * H, mask=m2, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc0 += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if G > 1:
            acc1 += tl.load(b_ptr + H + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            acc2 += tl.load(b_ptr + 2 * H + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if G > 3:
            acc3 += tl.load(b_ptr + 3 * H + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc0, acc1, acc2, acc3


@triton.jit
def finish_step(acc0, acc1, acc2, acc3, xg, s, own, m2, valid, rows, cols, H, h0_ptr, c0_ptr,
                h_ptr, c_ptr, dst, dst_own, y_t, hprev_t, gates_t, ctape_t,
                CELL: tl.constexpr, TG: tl.constexpr, ACT: tl.constexpr,
                KEEP_TAPE: tl.constexpr):
    """The rest of one step for these rows and units, given each gate's pre-activation
    (W_ih x + b_ih + W_hh h_{t-1} + b_hh; GRU's n gate without x): the gate math, the state
    (fp32 in h/c at ``own``, the compute dtype at ``dst + dst_own`` for the next product), y
    and the tape."""
    dtype = dst.dtype.element_ty
    if s == 0:
        h_prev = tl.load(h0_ptr + own, mask=m2, other=0.0)
    else:
        h_prev = tl.load(h_ptr + own, mask=m2, other=0.0)
    if CELL == 0:                                     # RNN
        h_new = activate(acc0, ACT)
        g0 = h_new
    elif CELL == 1:                                   # LSTM
        if s == 0:
            c_prev = tl.load(c0_ptr + own, mask=m2, other=0.0)
        else:
            c_prev = tl.load(c_ptr + own, mask=m2, other=0.0)
        g0 = sigmoid(acc0)
        g1 = sigmoid(acc1)
        g2 = tanh(acc2)
        g3 = sigmoid(acc3)
        c_new = g1 * c_prev + g0 * g2
        h_new = g3 * tanh(c_new)
        c_keep = tl.where(valid[:, None], c_new, c_prev)
        tl.store(c_ptr + own, c_keep, mask=m2)
    else:                                             # GRU
        g0 = sigmoid(acc0)
        g1 = sigmoid(acc1)
        g3 = acc2                                     # W_hn h + b_hn, kept for backward
        g2 = tanh(tl.load(xg + 2 * H, mask=m2, other=0.0).to(tl.float32) + g0 * g3)
        h_new = (1.0 - g1) * g2 + g1 * h_prev
    h_keep = tl.where(valid[:, None], h_new, h_prev)
    tl.store(h_ptr + own, h_keep, mask=m2)
    tl.store(dst + dst_own, h_keep.to(dtype), mask=m2)
    tl.store(y_t + own, tl.where(valid[:, None], h_new, 0.0).to(dtype), mask=m2)
    if KEEP_TAPE:
        tl.store(hprev_t + own, h_prev.to(dtype), mask=m2)
        gt = gates_t + (rows[:, None] * (TG * H) + cols[None, :])
        tl.store(gt, g0, mask=m2)
        if TG > 1:
            tl.store(gt + H, g1, mask=m2)
            tl.store(gt + 2 * H, g2, mask=m2)
            tl.store(gt + 3 * H, g3, mask=m2)
        if CELL == 1:
            tl.store(ctape_t + own, c_keep, mask=m2)


