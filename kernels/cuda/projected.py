"""LSTM with a projection (``proj_size`` P > 0) on the cupy backend: W_hr folded into W_hh.

The fold of ``kernels/triton/projected.py`` (see there for the derivation), as cupy-backend
operations: torch.nn.LSTM keeps ``m_t = σ(o) tanh(c_t)`` (H units) and returns ``h_t = W_hr m_t``
(P), and the next step's product is ``W_hh h_t = (W_hh W_hr) m_t``. So the backend runs a plain
LSTM over m with the recurrent weight ``W_eff = W_hh W_hr`` (4H x H) on any of its paths
(graph, persistent, persistent on tensor cores), unchanged, and ``y = m W_hrᵀ`` is one cuBLAS
GEMM over all T·B rows after the loop. What does not fold is moved by three small kernels of
``recurrent.cu``:

* ``add_at_first_step``: ``W_hh h_0`` enters each row at its first step (t = 0; reverse,
  t = length - 1), added to a copy of xw, made only when h_0 is not all zero;
* ``rows_that_stepped``: a row of length 0 keeps h_0 as its final state (and the gradient of
  its final h goes to h_0 directly, not through m);
* ``gather_first_step``: the backward reads the gradient of ``W_hh h_0`` back from dxw.

The cost is the recurrence's: 4·H·H multiply-adds per row and step instead of 4·H·P.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .blocks import copied, from_f32, gemm, i64, pointwise


@dataclass
class ProjectionTape:
    """What the backward needs beside the gated tape (whose ``w_hh`` is ``W_hh W_hr``)."""

    w_hh: Any                   # (4H, P)
    w_hr: Any                   # (P, H)
    h0: Any                     # (B, P)
    m: Any                      # (T, B, H): the LSTM's outputs, zero where a row has ended
    m_final: Any                # (B, H)
    lengths: Any                # (B,) int64 on the device, or None
    reverse: bool
    folded: bool                # whether h_0 W_hhᵀ was added to xw (h_0 not all zero)


def folded_weight(dev, w_hh, w_hr):
    """``W_hh W_hr`` (4H x H) in the compute dtype, accumulated in float32."""
    G, P = w_hh.shape
    H = w_hr.shape[1]
    out = dev.empty((G, H), np.float32, "W_hh W_hr")
    dev.run([gemm(dev, G, H, P, dev.ptr(w_hh), dev.ptr(w_hr), dev.ptr(out))])
    return from_f32(dev, out, "W_hh W_hr")


def fold_initial_state(dev, xw, h0, w_hh, lengths, reverse: bool):
    """``(xw', folded)``: a copy of xw with ``h0 W_hhᵀ`` added at each row's first step, or xw
    itself when h_0 is all zero (one read of h_0 back to the host; saves the T·B·4H copy)."""
    if not dev.any_nonzero(h0):
        return xw, False
    T, B, G = xw.shape
    P = h0.shape[1]
    add = dev.empty((B, G), np.float32, "h0 W_hh^T")
    out = copied(dev, xw, "xw with h0 W_hh^T folded in")
    dev.run([gemm(dev, B, G, P, dev.ptr(h0), dev.ptr(w_hh), dev.ptr(add), trans_b=True),
             pointwise(dev, "add_at_first_step", n=B * G,
                       args=(out, add, lengths, i64(T), i64(B), i64(G), i64(reverse)))])
    return out, True


def rows_that_stepped(dev, stepped, otherwise, lengths, what: str):
    """``stepped`` (B, n) for the rows with a step, ``otherwise`` for the rows of length 0, in
    a new array."""
    B, n = stepped.shape
    out = dev.empty((B, n), dev.dtype, what)
    dev.run([pointwise(dev, "rows_that_stepped", n=B * n,
                       args=(stepped, otherwise, out, lengths, i64(B), i64(n)))])
    return out


def project_outputs(dev, m, m_final, h0, w_hr, lengths):
    """``(y, h_T)``: ``y = m W_hrᵀ`` (T, B, P) and the final h, which is h_0 for the rows
    that never stepped; both in the compute dtype."""
    T, B, H = m.shape
    P = w_hr.shape[0]
    y32 = dev.empty((T, B, P), np.float32, "y = m W_hr^T")
    h32 = dev.empty((B, P), np.float32, "the final m W_hr^T")
    dev.run([gemm(dev, T * B, P, H, dev.ptr(m), dev.ptr(w_hr), dev.ptr(y32), trans_b=True),
             gemm(dev, B, P, H, dev.ptr(m_final), dev.ptr(w_hr), dev.ptr(h32), trans_b=True)])
    y = from_f32(dev, y32, "the output y")
    h_final = rows_that_stepped(dev, from_f32(dev, h32, "the final m W_hr^T"), h0, lengths,
                                "the final h")
    return y, h_final


def gradients_in(dev, tape: ProjectionTape, dy, dh_final):
    """The LSTM's incoming gradients ``(dm, dm_T)`` from ``(dy, dh_T)``. A row of length 0
    needs no mask here: its final h is h_0, not ``W_hr m_T``, but its ``dm_T`` only passes
    through the LSTM's steps (all masked) to the gradient of m_0, which is dropped, and its
    m_T is 0 in ``dW_hr``'s ``dh_Tᵀ m_T``."""
    T, B, P = dy.shape
    H = tape.w_hr.shape[1]
    dm32 = dev.empty((T, B, H), np.float32, "dm = dy W_hr")
    dm_final32 = dev.empty((B, H), np.float32, "dm_T = dh_T W_hr")
    w_hr = dev.ptr(tape.w_hr)
    dev.run([gemm(dev, T * B, H, P, dev.ptr(dy), w_hr, dev.ptr(dm32)),
             gemm(dev, B, H, P, dev.ptr(dh_final), w_hr, dev.ptr(dm_final32))])
    return from_f32(dev, dm32, "dm = dy W_hr"), from_f32(dev, dm_final32, "dm_T = dh_T W_hr")


def gradients_out(dev, tape: ProjectionTape, dy, dh_final, dxw, dw_eff):
    """``(dh_0, dW_hh, dW_hr)`` in the compute dtype from the LSTM's ``dxw'`` and ``dW_eff``:
    ``dW_hh = dW_eff W_hrᵀ + d_firstᵀ h_0``, ``dW_hr = W_hhᵀ dW_eff + dyᵀ m + dh_Tᵀ m_T`` and
    ``dh_0 = d_first W_hh`` (dh_T itself for rows of length 0), where ``d_first`` (B, 4H) is
    dxw' at each row's first step."""
    T, B, P = dy.shape
    G, H = dxw.shape[2], tape.w_hr.shape[1]
    d_first = dev.empty((B, G), dev.dtype, "dxw at each row's first step")
    dh0_32 = dev.empty((B, P), np.float32, "the gradient of h0")
    dw_hh32 = dev.empty((G, P), np.float32, "the gradient of W_hh")
    dw_hr32 = dev.empty((P, H), np.float32, "the gradient of W_hr")
    ptr = dev.ptr
    w_hh, w_hr, eff = ptr(tape.w_hh), ptr(tape.w_hr), ptr(dw_eff)
    ops = [pointwise(dev, "gather_first_step", n=B * G,
                     args=(dxw, d_first, tape.lengths, i64(T), i64(B), i64(G),
                           i64(tape.reverse))),
           gemm(dev, B, P, G, ptr(d_first), w_hh, ptr(dh0_32)),
           gemm(dev, G, P, H, eff, w_hr, ptr(dw_hh32), trans_b=True),
           gemm(dev, P, H, G, w_hh, eff, ptr(dw_hr32), trans_a=True),
           gemm(dev, P, H, T * B, ptr(dy), ptr(tape.m), ptr(dw_hr32), trans_a=True, beta=1),
           gemm(dev, P, H, B, ptr(dh_final), ptr(tape.m_final), ptr(dw_hr32), trans_a=True,
                beta=1)]
    if tape.folded:
        ops.append(gemm(dev, G, P, B, ptr(d_first), ptr(tape.h0), ptr(dw_hh32), trans_a=True,
                        beta=1))
    dev.run(ops)
    dh0 = rows_that_stepped(dev, from_f32(dev, dh0_32, "the gradient of h0"), dh_final,
                            tape.lengths, "the gradient of h0")
    return (dh0, from_f32(dev, dw_hh32, "the gradient of W_hh"),
            from_f32(dev, dw_hr32, "the gradient of W_hr"))
