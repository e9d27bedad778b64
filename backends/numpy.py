"""NumPy backend: the fused recurrence of every cell, forward and backward, on the CPU.

The fallback for everyone without a GPU, so it is written for speed within NumPy's means:

* the input projection arrives hoisted (one GEMM in the layer code); each step does exactly one
  recurrent GEMM (``np.matmul(..., out=)`` into a preallocated buffer) and in-place ufuncs;
* the batch is split into row blocks, one per core, each carried through all time steps by its
  own thread (the CPU twin of the GPU kernels' batch tiling). NumPy releases the GIL inside
  ufuncs and BLAS, and BLAS is pinned to one thread meanwhile so the blocks do not fight over
  cores. Below ``_MIN_ROWS_PER_THREAD`` rows a block costs more in Python overhead than it saves;
* the backward pass runs the step in reverse time and leaves the weight gradients to one large
  GEMM each after the loop.

Equations: :mod:`rnn_gpu.backend_api`. Tape arrays are indexed by time ``t`` (not by processing
order), so the same code serves both directions.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from rnn_gpu.backend_api import Backend, Problem, Tape

# Threads pay off once each block has enough rows to amortise ~20 Python-level ufunc calls per
# step (~1 us each): measured on a 2-core EPYC VM, 2 threads gained nothing at B=32 and ~1.6x on
# the elementwise work at B=1024.
_MIN_ROWS_PER_THREAD = 64
_pool: ThreadPoolExecutor | None = None


def _thread_count(batch: int) -> int:
    env = os.environ.get("RNN_GPU_NUM_THREADS")
    cores = int(env) if env and env.isdigit() and int(env) > 0 else (os.cpu_count() or 1)
    return max(1, min(cores, batch // _MIN_ROWS_PER_THREAD))


def _run_blocks(fn, batch: int, threads: int) -> None:
    """Call ``fn(slice)`` for ``threads`` contiguous row blocks of the batch, in parallel."""
    if threads <= 1:
        fn(slice(0, batch))
        return
    global _pool
    if _pool is None or _pool._max_workers < threads:
        _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rnn_gpu_numpy")
    bounds = [batch * i // threads for i in range(threads + 1)]
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        futures = [_pool.submit(fn, slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
        for f in futures:
            f.result()


# ----------------------------------------------------------------------------- activations
# In place, any float dtype. Sigmoid through exp: one transcendental pass plus three cheap ones;
# exp(-x) overflows to inf for x < -88 (float32), and 1/(1+inf) = 0 is the right limit.

def _sigmoid_(x: np.ndarray) -> np.ndarray:
    np.negative(x, out=x)
    with np.errstate(over="ignore"):
        np.exp(x, out=x)
    x += 1.0
    np.reciprocal(x, out=x)
    return x


def _tanh_(x: np.ndarray) -> np.ndarray:
    return np.tanh(x, out=x)


def _relu_(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0, out=x)


_ACT = {"sigmoid": _sigmoid_, "tanh": _tanh_, "relu": _relu_}


def _act_grad_(dy: np.ndarray, y: np.ndarray, act: str) -> np.ndarray:
    """``dy *= act'(pre)`` written through the activation's output ``y``."""
    if act == "tanh":
        dy *= 1.0 - y * y
    elif act == "sigmoid":
        dy *= y * (1.0 - y)
    else:
        dy *= y > 0
    return dy


# ----------------------------------------------------------------------------- helpers

class _Steps:
    """Time order and validity masks for one direction."""

    def __init__(self, T: int, lengths: np.ndarray | None, reverse: bool):
        self.order = range(T - 1, -1, -1) if reverse else range(T)
        if lengths is None:
            self.valid = None
        else:
            self.valid = np.arange(T)[:, None] < lengths[None, :]            # (T, B)
            self.full = self.valid.all(axis=1)                              # (T,)

    def invalid_rows(self, t: int, rows: slice) -> np.ndarray | None:
        """(b, 1) bool mask of rows that are past their length at step t, or None if none."""
        if self.valid is None or self.full[t]:
            return None
        v = self.valid[t, rows]
        return None if v.all() else ~v[:, None]


def _emit(y_t: np.ndarray, h: np.ndarray, invalid: np.ndarray | None) -> None:
    np.copyto(y_t, h)
    if invalid is not None:
        np.copyto(y_t, 0.0, where=invalid)


def _keep(new: np.ndarray, old: np.ndarray, invalid: np.ndarray | None) -> None:
    if invalid is not None:
        np.copyto(new, old, where=invalid)


def _t(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)


# ----------------------------------------------------------------------------- cells
# Each cell: forward(xw, w, state, steps, rows, out) fills out["y"][:, rows] and the tape arrays
# for those rows; backward(tape, dy, dstate, rows, grads) fills grads for those rows.
# Weight gradients are left to one GEMM after the loops (_finish_grads).


def _lstm_forward(xw, w, state, steps: _Steps, rows: slice, out: dict[str, np.ndarray]):
    H = w["weight_hh"].shape[0] // 4
    whh_t, whr_t = w["_weight_hh_t"], w.get("_weight_hr_t")
    h, c = state[0][rows].copy(), state[1][rows].copy()
    b = h.shape[0]
    tape = "gates" in out
    gates = np.empty((b, 4 * H), xw.dtype)
    c_new, tc, m = (np.empty((b, H), xw.dtype) for _ in range(3))
    h_new = np.empty_like(h)
    for t in steps.order:
        invalid = steps.invalid_rows(t, rows)
        g = out["gates"][t, rows] if tape else gates
        np.matmul(h, whh_t, out=g)
        g += xw[t, rows]
        _sigmoid_(g[:, : 2 * H])
        _tanh_(g[:, 2 * H: 3 * H])
        _sigmoid_(g[:, 3 * H:])
        np.multiply(g[:, H: 2 * H], c, out=c_new)
        np.multiply(g[:, :H], g[:, 2 * H: 3 * H], out=tc)
        c_new += tc
        np.tanh(c_new, out=tc)
        if tape:
            out["hprev"][t, rows] = h
            out["cprev"][t, rows] = c
            out["tanh_c"][t, rows] = tc
        if whr_t is None:
            np.multiply(g[:, 3 * H:], tc, out=h_new)
        else:
            np.multiply(g[:, 3 * H:], tc, out=m)
            np.matmul(m, whr_t, out=h_new)
        _keep(h_new, h, invalid)
        _keep(c_new, c, invalid)
        _emit(out["y"][t, rows], h_new, invalid)
        h, h_new = h_new, h
        c, c_new = c_new, c
    out["h"][rows] = h
    out["c"][rows] = c


def _lstm_backward(tape: dict, dy, dstate, steps: _Steps, rows: slice, grads: dict):
    w = tape["w"]
    H = w["weight_hh"].shape[0] // 4
    whh, whr = w["weight_hh"], w.get("weight_hr")
    dh, dc = dstate[0][rows].copy(), dstate[1][rows].copy()
    dxw = grads["dxw"]
    for t in reversed(steps.order):
        invalid = steps.invalid_rows(t, rows)
        g = tape["gates"][t, rows]
        i, f, gg, o = g[:, :H], g[:, H: 2 * H], g[:, 2 * H: 3 * H], g[:, 3 * H:]
        tc = tape["tanh_c"][t, rows]
        dh_t = dh + dy[t, rows] if invalid is None else dh + np.where(invalid, 0.0, dy[t, rows])
        if whr is not None:
            grads["dh_out"][t, rows] = dh_t if invalid is None else np.where(invalid, 0.0, dh_t)
            dm = dh_t @ whr
        else:
            dm = dh_t
        d = dxw[t, rows]
        dc_t = dc + dm * o * (1.0 - tc * tc)
        np.multiply(dm, tc, out=d[:, 3 * H:])
        _act_grad_(d[:, 3 * H:], o, "sigmoid")
        np.multiply(dc_t, gg, out=d[:, :H])
        _act_grad_(d[:, :H], i, "sigmoid")
        np.multiply(dc_t, tape["cprev"][t, rows], out=d[:, H: 2 * H])
        _act_grad_(d[:, H: 2 * H], f, "sigmoid")
        np.multiply(dc_t, i, out=d[:, 2 * H: 3 * H])
        _act_grad_(d[:, 2 * H: 3 * H], gg, "tanh")
        dc_prev = dc_t * f
        dh_prev = d @ whh
        if invalid is not None:
            np.copyto(d, 0.0, where=invalid)
            np.copyto(dh_prev, dh_t, where=invalid)
            np.copyto(dc_prev, dc, where=invalid)
        dh, dc = dh_prev, dc_prev
    grads["dh0"][rows] = dh
    grads["dc0"][rows] = dc


def _gru_forward(xw, w, state, steps: _Steps, rows: slice, out: dict[str, np.ndarray]):
    H = w["weight_hh"].shape[0] // 3
    whh_t, b_hn = w["_weight_hh_t"], w.get("_bias_hn")
    h = state[0][rows].copy()
    b = h.shape[0]
    tape = "gates" in out
    hh = np.empty((b, 3 * H), xw.dtype)
    gates = np.empty((b, 3 * H), xw.dtype)
    h_new = np.empty_like(h)
    for t in steps.order:
        invalid = steps.invalid_rows(t, rows)
        x = xw[t, rows]
        np.matmul(h, whh_t, out=hh)
        if b_hn is not None:
            hh[:, 2 * H:] += b_hn
        g = out["gates"][t, rows] if tape else gates
        np.add(hh[:, : 2 * H], x[:, : 2 * H], out=g[:, : 2 * H])
        _sigmoid_(g[:, : 2 * H])
        r, z, n = g[:, :H], g[:, H: 2 * H], g[:, 2 * H:]
        np.multiply(r, hh[:, 2 * H:], out=n)
        n += x[:, 2 * H:]
        _tanh_(n)
        # h' = (1 - z) n + z h = n + z (h - n)
        np.subtract(h, n, out=h_new)
        h_new *= z
        h_new += n
        if tape:
            out["hprev"][t, rows] = h
            out["hh_n"][t, rows] = hh[:, 2 * H:]
        _keep(h_new, h, invalid)
        _emit(out["y"][t, rows], h_new, invalid)
        h, h_new = h_new, h
    out["h"][rows] = h


def _gru_backward(tape: dict, dy, dstate, steps: _Steps, rows: slice, grads: dict):
    w = tape["w"]
    H = w["weight_hh"].shape[0] // 3
    whh = w["weight_hh"]
    dh = dstate[0][rows].copy()
    dxw, drec = grads["dxw"], grads["drec"]
    for t in reversed(steps.order):
        invalid = steps.invalid_rows(t, rows)
        g = tape["gates"][t, rows]
        r, z, n = g[:, :H], g[:, H: 2 * H], g[:, 2 * H:]
        hprev = tape["hprev"][t, rows]
        dh_t = dh + dy[t, rows] if invalid is None else dh + np.where(invalid, 0.0, dy[t, rows])
        d, dr_ = dxw[t, rows], drec[t, rows]
        np.multiply(dh_t, 1.0 - z, out=d[:, 2 * H:])
        _act_grad_(d[:, 2 * H:], n, "tanh")                       # dn_pre
        np.multiply(d[:, 2 * H:], tape["hh_n"][t, rows], out=d[:, :H])
        _act_grad_(d[:, :H], r, "sigmoid")                         # dr_pre
        np.multiply(dh_t, hprev - n, out=d[:, H: 2 * H])
        _act_grad_(d[:, H: 2 * H], z, "sigmoid")                   # dz_pre
        dr_[:, : 2 * H] = d[:, : 2 * H]
        np.multiply(d[:, 2 * H:], r, out=dr_[:, 2 * H:])            # d(W_hn h + b_hn)
        dh_prev = dh_t * z
        dh_prev += dr_ @ whh
        if invalid is not None:
            np.copyto(d, 0.0, where=invalid)
            np.copyto(dr_, 0.0, where=invalid)
            np.copyto(dh_prev, dh_t, where=invalid)
        dh = dh_prev
    grads["dh0"][rows] = dh


def _rnn_forward(xw, w, state, steps: _Steps, rows: slice, out: dict[str, np.ndarray]):
    act = _ACT[w["_activations"][0]]
    whh_t = w["_weight_hh_t"]
    h = state[0][rows].copy()
    tape = "hnew" in out
    h_new = np.empty_like(h)
    for t in steps.order:
        invalid = steps.invalid_rows(t, rows)
        hn = out["hnew"][t, rows] if tape else h_new
        np.matmul(h, whh_t, out=hn)
        hn += xw[t, rows]
        act(hn)
        if tape:
            out["hprev"][t, rows] = h
        # Rows past their length keep h; in the tape that is harmless, since backward zeroes
        # their gradient before it reads hnew.
        _keep(hn, h, invalid)
        _emit(out["y"][t, rows], hn, invalid)
        if tape:
            h = hn
        else:
            h, h_new = hn, h
    out["h"][rows] = h


def _rnn_backward(tape: dict, dy, dstate, steps: _Steps, rows: slice, grads: dict):
    w = tape["w"]
    act = w["_activations"][0]
    whh = w["weight_hh"]
    dh = dstate[0][rows].copy()
    dxw = grads["dxw"]
    for t in reversed(steps.order):
        invalid = steps.invalid_rows(t, rows)
        dh_t = dh + dy[t, rows] if invalid is None else dh + np.where(invalid, 0.0, dy[t, rows])
        d = dxw[t, rows]
        np.copyto(d, dh_t)
        _act_grad_(d, tape["hnew"][t, rows], act)
        dh_prev = d @ whh
        if invalid is not None:
            np.copyto(d, 0.0, where=invalid)
            np.copyto(dh_prev, dh_t, where=invalid)
        dh = dh_prev
    grads["dh0"][rows] = dh


def _twostage_forward(xw, w, state, steps: _Steps, rows: slice, out: dict[str, np.ndarray]):
    f_name, g_name = w["_activations"]
    f_act, g_act = _ACT[f_name], _ACT[g_name]
    H = w["weight_hh"].shape[0]
    # [W_aa; W_hh] h in one GEMM: both stages read h_{t-1}.
    w_rec_t, wha_t, b_h = w["_weight_rec_t"], w["_weight_ha_t"], w.get("bias_h")
    h = state[0][rows].copy()
    b = h.shape[0]
    tape = "a" in out
    rec = np.empty((b, 2 * H), xw.dtype)
    a_buf, hn_buf = np.empty((b, H), xw.dtype), np.empty((b, H), xw.dtype)
    for t in steps.order:
        invalid = steps.invalid_rows(t, rows)
        np.matmul(h, w_rec_t, out=rec)
        a = out["a"][t, rows] if tape else a_buf
        np.add(rec[:, :H], xw[t, rows], out=a)
        f_act(a)
        hn = out["hnew"][t, rows] if tape else hn_buf
        np.matmul(a, wha_t, out=hn)
        hn += rec[:, H:]
        if b_h is not None:
            hn += b_h
        g_act(hn)
        if tape:
            out["hprev"][t, rows] = h
        _keep(hn, h, invalid)
        _emit(out["y"][t, rows], hn, invalid)
        if tape:
            h = hn
        else:
            h, hn_buf = hn, h
    out["h"][rows] = h


def _twostage_backward(tape: dict, dy, dstate, steps: _Steps, rows: slice, grads: dict):
    w = tape["w"]
    f_name, g_name = w["_activations"]
    H = w["weight_hh"].shape[0]
    w_rec, wha = w["_weight_rec"], w["weight_ha"]
    dh = dstate[0][rows].copy()
    dxw, dhp_all = grads["dxw"], grads["dh_pre"]
    both = np.empty((dh.shape[0], 2 * H), dh.dtype)
    for t in reversed(steps.order):
        invalid = steps.invalid_rows(t, rows)
        dh_t = dh + dy[t, rows] if invalid is None else dh + np.where(invalid, 0.0, dy[t, rows])
        dhp = dhp_all[t, rows]
        np.copyto(dhp, dh_t)
        _act_grad_(dhp, tape["hnew"][t, rows], g_name)
        dap = dxw[t, rows]
        np.matmul(dhp, wha, out=dap)
        _act_grad_(dap, tape["a"][t, rows], f_name)
        both[:, :H], both[:, H:] = dap, dhp
        dh_prev = both @ w_rec
        if invalid is not None:
            np.copyto(dap, 0.0, where=invalid)
            np.copyto(dhp, 0.0, where=invalid)
            np.copyto(dh_prev, dh_t, where=invalid)
        dh = dh_prev
    grads["dh0"][rows] = dh


# ----------------------------------------------------------------------------- the backend

def _prepare_weights(problem: Problem, xw: np.ndarray, weights: dict[str, Any]) -> dict:
    """Transposed copies for the per-step GEMMs; fold additive recurrent biases into xw."""
    w = {k: np.asarray(v) for k, v in weights.items()}
    w["_activations"] = problem.activations
    cell = problem.cell
    if cell == "twostage":
        w["_weight_rec"] = np.concatenate([w["weight_aa"], w["weight_hh"]], axis=0)   # (2H, H)
        w["_weight_rec_t"] = _t(w["_weight_rec"])
        w["_weight_ha_t"] = _t(w["weight_ha"])
        return w
    w["_weight_hh_t"] = _t(w["weight_hh"])
    if "weight_hr" in w:
        w["_weight_hr_t"] = _t(w["weight_hr"])
    b_hh = w.get("bias_hh")
    if b_hh is not None:
        if cell == "gru":
            # b_hn sits inside r * (W_hn h + b_hn): only the r and z parts are additive.
            H = b_hh.shape[0] // 3
            xw[..., : 2 * H] += b_hh[: 2 * H]
            w["_bias_hn"] = b_hh[2 * H:]
        else:
            xw += b_hh
    return w


_FORWARD = {"lstm": _lstm_forward, "gru": _gru_forward, "rnn": _rnn_forward,
            "twostage": _twostage_forward}
_BACKWARD = {"lstm": _lstm_backward, "gru": _gru_backward, "rnn": _rnn_backward,
             "twostage": _twostage_backward}


def _tape_shapes(problem: Problem, T: int, B: int) -> dict[str, tuple[int, ...]]:
    H, P = problem.hidden_size, problem.output_size
    return {
        "lstm": {"gates": (T, B, 4 * H), "hprev": (T, B, P), "cprev": (T, B, H),
                 "tanh_c": (T, B, H)},
        "gru": {"gates": (T, B, 3 * H), "hprev": (T, B, H), "hh_n": (T, B, H)},
        "rnn": {"hnew": (T, B, H), "hprev": (T, B, H)},
        "twostage": {"a": (T, B, H), "hnew": (T, B, H), "hprev": (T, B, H)},
    }[problem.cell]


class NumpyBackend(Backend):
    """Fused recurrence in NumPy: CPU, float32 and float64, every cell and option."""

    name = "numpy"
    priority = 0
    array_kind = "numpy"

    def unavailable_reason(self) -> str | None:
        return None

    def not_supported_reasons(self, problem: Problem) -> list[str]:
        reasons = []
        if problem.device != "cpu":
            reasons.append(f"the numpy backend runs on the CPU, but the input is on "
                           f"{problem.device} (move it to the CPU or choose a GPU backend)")
        if problem.dtype not in ("float32", "float64"):
            reasons.append(f"the numpy backend computes in float32 and float64, not "
                           f"{problem.dtype}")
        if problem.cell not in _FORWARD:
            reasons.append(f"the numpy backend has no cell {problem.cell!r}")
        return reasons

    def forward(self, problem, xw, weights, state, lengths, *, reverse, keep_tape):
        T, B = xw.shape[:2]
        xw = np.array(xw, copy=True) if not xw.flags.writeable else xw
        w = _prepare_weights(problem, xw, weights)
        steps = _Steps(T, lengths, reverse)
        dt = xw.dtype
        out: dict[str, np.ndarray] = {
            "y": np.empty((T, B, problem.output_size), dt),
            "h": np.empty((B, problem.output_size), dt),
        }
        if problem.cell == "lstm":
            out["c"] = np.empty((B, problem.hidden_size), dt)
        if keep_tape:
            out.update({k: np.empty(s, dt) for k, s in _tape_shapes(problem, T, B).items()})
        state = tuple(np.asarray(s, dtype=dt) for s in state)
        cell_forward = _FORWARD[problem.cell]
        _run_blocks(lambda rows: cell_forward(xw, w, state, steps, rows, out), B,
                    _thread_count(B))
        final = (out["h"], out["c"]) if problem.cell == "lstm" else (out["h"],)
        tape = None
        if keep_tape:
            data = {k: v for k, v in out.items() if k not in ("y", "h", "c")}
            data.update(w=w, steps=steps)
            tape = Tape(self.name, problem, reverse, data)
        return out["y"], final, tape

    def backward(self, tape, dy, dstate):
        problem, data = tape.problem, tape.data
        w, steps = data["w"], data["steps"]
        dy = np.asarray(dy)
        T, B = dy.shape[:2]
        H, P = problem.hidden_size, problem.output_size
        dt = data["hprev"].dtype
        gates = {"lstm": 4, "gru": 3, "rnn": 1, "twostage": 1}[problem.cell]
        grads: dict[str, np.ndarray] = {"dxw": np.empty((T, B, gates * H), dt),
                                        "dh0": np.empty((B, P), dt)}
        if problem.cell == "lstm":
            grads["dc0"] = np.empty((B, H), dt)
            if "weight_hr" in w:
                grads["dh_out"] = np.empty((T, B, P), dt)
        if problem.cell == "gru":
            grads["drec"] = np.empty((T, B, 3 * H), dt)
        if problem.cell == "twostage":
            grads["dh_pre"] = np.empty((T, B, H), dt)
        dstate = tuple(np.asarray(s, dtype=dt) for s in dstate)
        cell_backward = _BACKWARD[problem.cell]
        _run_blocks(lambda rows: cell_backward(data, dy, dstate, steps, rows, grads), B,
                    _thread_count(B))
        return grads["dxw"], self._dstate0(problem, grads), self._weight_grads(problem, data,
                                                                                grads)

    @staticmethod
    def _dstate0(problem: Problem, grads: dict) -> tuple:
        return (grads["dh0"], grads["dc0"]) if problem.cell == "lstm" else (grads["dh0"],)

    @staticmethod
    def _weight_grads(problem: Problem, data: dict, grads: dict) -> dict[str, np.ndarray]:
        """The weight gradients: one large GEMM each over all T*B rows."""
        w = data["w"]

        def outer(d, x):
            return d.reshape(-1, d.shape[-1]).T @ x.reshape(-1, x.shape[-1])

        def total(d):
            return d.reshape(-1, d.shape[-1]).sum(axis=0)

        cell, dxw, hprev = problem.cell, grads["dxw"], data["hprev"]
        out: dict[str, np.ndarray] = {}
        if cell == "twostage":
            dhp = grads["dh_pre"]
            out["weight_aa"] = outer(dxw, hprev)
            out["weight_ha"] = outer(dhp, data["a"])
            out["weight_hh"] = outer(dhp, hprev)
            if "bias_h" in w:
                out["bias_h"] = total(dhp)
            return out
        drec = grads["drec"] if cell == "gru" else dxw
        out["weight_hh"] = outer(drec, hprev)
        if "bias_hh" in w:
            out["bias_hh"] = total(drec)
        if "weight_hr" in w:
            gates = data["gates"]
            H = problem.hidden_size
            m = gates[..., 3 * H:] * data["tanh_c"]          # sigma(o) * tanh(c), before W_hr
            out["weight_hr"] = outer(grads["dh_out"], m)
        return out
