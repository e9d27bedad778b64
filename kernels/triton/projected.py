"""LSTM with a projection (``proj_size`` P > 0) on the gated kernels, W_hr folded into W_hh.

torch.nn.LSTM with a projection keeps ``m_t = σ(o) tanh(c_t)`` (H units) and returns
``h_t = W_hr m_t`` (P); the next step's product is ``W_hh h_t = (W_hh W_hr) m_t``. So the
recurrence is a plain LSTM over m with the recurrent weight ``W_eff = W_hh W_hr`` (4H x H): the
gated kernels (:mod:`.gated`) run it unchanged, forward and backward, and ``y = m W_hrᵀ`` is one
GEMM over all T·B rows after the loop. Two things do not fold:

* h_0 enters a row's first step as ``W_hh h_0``, which is added to xw there (t = 0 forward;
  reverse, t = length - 1, the step a packed sequence starts from); the kernel's own m_0 is 0.
  The addition needs a copy of xw, made only when h_0 is not all zero.
* a row of length 0 never steps: its final state is h_0 itself, not ``W_hr m_0``.

The cost is in the recurrence: ``4·H·H`` multiply-adds per row and step instead of ``4·H·P``,
H/P times as many (4x at the common P = H/4); the projection ``W_hr m_t`` (P·H) becomes one GEMM
after the loop instead of a product per step. What this buys is that every option of
torch.nn.LSTM runs on the GPU through the tuned kernels, with autograd, instead of being declined
(the rnn_gpu.torch drop-in had no GPU backend for it).

Gradients, with ``g`` the kernel's gradients for (xw', W_eff) and ``F`` the fold of h_0:
``dW_hh = g_W W_hrᵀ + Σ_b g_xw'[t0_b, b]ᵀ h0_b``, ``dW_hr = W_hhᵀ g_W + dyᵀ m + dh_Tᵀ m_T``,
``dh_0 = g_xw'[t0] W_hh`` (plus dh_T itself for rows of length 0), ``dxw = g_xw'``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rnn_gpu._matmul import matmul


@dataclass
class ProjectionTape:
    """What the backward needs beside the gated kernel's own tape."""

    w_hh: torch.Tensor          # (4H, P)
    w_hr: torch.Tensor          # (P, H)
    h0: torch.Tensor            # (B, P), the caller's dtype
    m: torch.Tensor             # (T, B, H): the kernel's outputs, zero where a row has ended
    m_final: torch.Tensor       # (B, H) fp32
    first: torch.Tensor         # (B,) int64: each row's first step (t0)
    stepped: torch.Tensor       # (B, 1) bool: rows with at least one step
    folded: bool                # whether h_0 was added to xw (not all zero)
    precision: str


def folded_weight(w_hh: torch.Tensor, w_hr: torch.Tensor, precision: str) -> torch.Tensor:
    """``W_hh W_hr`` (4H x H) in W_hh's dtype, multiplied in float32."""
    return matmul(w_hh.float(), w_hr.float(), precision).to(w_hh.dtype).contiguous()


def first_steps(T: int, B: int, lengths: torch.Tensor | None, reverse: bool,
                device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t0, stepped)``: the time step each row starts from (0 for a row that never steps,
    harmless: that step is masked for it) and which rows step at all."""
    if lengths is None:
        t0 = torch.full((B,), T - 1 if reverse else 0, dtype=torch.int64, device=device)
        return t0, torch.ones((B, 1), dtype=torch.bool, device=device)
    lens = lengths.to(device=device, dtype=torch.int64)
    t0 = (lens - 1).clamp(min=0) if reverse else torch.zeros_like(lens)
    return t0, (lens > 0)[:, None]


def fold_initial_state(xw: torch.Tensor, h0: torch.Tensor, w_hh: torch.Tensor,
                       t0: torch.Tensor, precision: str) -> tuple[torch.Tensor, bool]:
    """``xw`` with ``h0 W_hhᵀ`` added at each row's first step (a copy; ``xw`` itself is left
    alone), or ``xw`` unchanged when h0 is all zero. Returns ``(xw', folded)``."""
    if not bool(h0.any()):                      # one sync; saves a copy of xw (T·B·4H)
        return xw, False
    rows = torch.arange(xw.shape[1], device=xw.device)
    out = xw.clone()
    out[t0, rows] = (xw[t0, rows].float()
                     + matmul(h0.float(), w_hh.float().t(), precision)).to(xw.dtype)
    return out, True


def project_outputs(m: torch.Tensor, m_final: torch.Tensor, h0: torch.Tensor,
                    w_hr: torch.Tensor, stepped: torch.Tensor,
                    precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, h_T)``: ``y = m W_hrᵀ`` (T, B, P) in m's dtype, and the final h, which is h_0 for
    the rows that never stepped."""
    T, B, H = m.shape
    y = matmul(m.reshape(T * B, H), w_hr.t(), precision).reshape(T, B, -1)
    h_final = matmul(m_final, w_hr.float().t(), precision)
    return y, torch.where(stepped, h_final, h0.float())


def gradients_in(tape: ProjectionTape, dy: torch.Tensor,
                 dh_final: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's incoming gradients: ``(dm, dm_T)`` from ``(dy, dh_T)``. A row of length 0
    needs no mask: its final h is h_0, but its ``dm_T`` only passes through the kernel's masked
    steps to the gradient of m_0, which is dropped (m_0 is the constant 0), and its m_T is 0 in
    ``dW_hr``'s ``dh_Tᵀ m_T``."""
    T, B, P = dy.shape
    dm = matmul(dy.reshape(T * B, P), tape.w_hr.to(dy.dtype), tape.precision)
    dm_final = matmul(dh_final.float(), tape.w_hr.float(), tape.precision)
    return dm.reshape(T, B, -1), dm_final


def gradients_out(tape: ProjectionTape, dy: torch.Tensor, dh_final: torch.Tensor,
                  dxw: torch.Tensor, dw_eff: torch.Tensor):
    """``(dh0, dW_hh, dW_hr)`` (fp32) from the kernel's ``dxw'`` and ``dW_eff``."""
    T, B, P = dy.shape
    p = tape.precision
    w_hh, w_hr = tape.w_hh.float(), tape.w_hr.float()
    dw_eff = dw_eff.float()
    rows = torch.arange(B, device=dxw.device)
    d_first = dxw[tape.first, rows].float()                        # (B, 4H): d(h0 W_hhᵀ)
    dh0 = matmul(d_first, w_hh, p)
    dh0 = torch.where(tape.stepped, dh0, dh_final.float())
    dw_hh = matmul(dw_eff, w_hr.t(), p)
    if tape.folded:
        dw_hh += matmul(d_first.t(), tape.h0.float(), p)
    dw_hr = matmul(w_hh.t(), dw_eff, p)
    dw_hr += matmul(dy.reshape(T * B, P).t(), tape.m.reshape(T * B, -1), p).float()
    dw_hr += matmul(dh_final.float().t(), tape.m_final, p)
    return dh0, dw_hh, dw_hr
