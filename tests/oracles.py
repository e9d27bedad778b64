"""Independent references for the core layers (DESIGN §6): nothing here imports rnn_gpu code paths
beyond reading a layer's public config and state_dict.

* :func:`torch_reference` runs ``torch.nn.LSTM/GRU/RNN`` in float64 with the layer's weights
  (the state_dict keys are torch.nn's), lengths through ``pack_padded_sequence``.
* :func:`naive_reference` is a deliberately plain float64 torch implementation written straight
  from DESIGN §2: one sequence at a time, one time step at a time, layer by layer and direction
  by direction. It covers every cell (TwoStageRNN is the reason it exists; the others let us
  check the oracle itself against torch.nn) and lengths of 0.

Both return a :class:`Result` with numpy float64 arrays; given ``dy``/``dstate`` they also return
the gradients of ``sum(y * dy) + sum(state * dstate)`` by torch autograd.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'rnn-gpu[test]')")

F64 = torch.float64


@dataclass
class Result:
    y: np.ndarray
    state: tuple[np.ndarray, ...]                 # (h,) or (h, c), in the caller's layout
    dx: np.ndarray | None = None
    dstate0: tuple[np.ndarray, ...] | None = None
    grads: dict[str, np.ndarray] = field(default_factory=dict)


def as_np(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def as_tuple(state: Any) -> tuple:
    """A layer's state (one array, or the LSTM tuple (h, c)) as a tuple of arrays."""
    if state is None:
        return ()
    return tuple(state) if isinstance(state, (tuple, list)) else (state,)


def t64(a: Any, grad: bool = False) -> torch.Tensor:
    t = torch.tensor(np.array(as_np(a), dtype=np.float64))
    return t.requires_grad_(grad)


def _state_shapes(cfg: dict, B: int, unbatched: bool) -> list[tuple[int, ...]]:
    n = cfg["num_layers"] * (2 if cfg["bidirectional"] else 1)
    out = cfg["proj_size"] or cfg["hidden_size"]
    shapes = [(n, B, out)]
    if cfg["cell"] == "LSTM":
        shapes.append((n, B, cfg["hidden_size"]))
    return [(s[0], s[2]) if unbatched else s for s in shapes]


def _leaves(m, x, state, unbatched: bool):
    """float64 leaf tensors for x, each state part (zeros where None) and each parameter."""
    cfg = m.config()
    B = 1 if unbatched else (x.shape[0] if cfg["batch_first"] else x.shape[1])
    xt = t64(x, grad=True)
    parts = as_tuple(state)
    shapes = _state_shapes(cfg, B, unbatched)
    if not parts:
        st = [torch.zeros(s, dtype=F64, requires_grad=True) for s in shapes]
    else:
        st = [t64(p, grad=True) for p in parts]
    params = {k: t64(v, grad=True) for k, v in m.state_dict().items()}
    return cfg, xt, st, params


def _finish(y, final, xt, st, params, dy, dstate) -> Result:
    res = Result(as_np(y).copy(), tuple(as_np(f).copy() for f in final))
    if dy is None:
        return res
    loss = (y * t64(dy)).sum()
    for f, d in zip(final, as_tuple(dstate)):
        loss = loss + (f * t64(d)).sum()
    names = list(params)
    grads = torch.autograd.grad(loss, [xt, *st, *params.values()], allow_unused=True)
    res.dx = _grad_or_zeros(grads[0], xt)
    res.dstate0 = tuple(_grad_or_zeros(g, s) for g, s in zip(grads[1:1 + len(st)], st))
    res.grads = {n: _grad_or_zeros(g, params[n])
                 for n, g in zip(names, grads[1 + len(st):])}
    return res


def _grad_or_zeros(g, like):
    return np.zeros(tuple(like.shape)) if g is None else as_np(g).copy()


# ---------------------------------------------------------------------- torch.nn

def torch_module(m) -> torch.nn.Module:
    """A float64 torch.nn.LSTM/GRU/RNN holding ``m``'s weights (same names, same shapes)."""
    cfg = m.config()
    kwargs = dict(input_size=cfg["input_size"], hidden_size=cfg["hidden_size"],
                  num_layers=cfg["num_layers"], bias=cfg["bias"],
                  batch_first=cfg["batch_first"], bidirectional=cfg["bidirectional"],
                  dtype=F64)
    if cfg["cell"] == "LSTM":
        mod = torch.nn.LSTM(proj_size=cfg["proj_size"], **kwargs)
    elif cfg["cell"] == "GRU":
        mod = torch.nn.GRU(**kwargs)
    elif cfg["cell"] == "RNN":
        mod = torch.nn.RNN(nonlinearity=cfg["nonlinearity"], **kwargs)
    else:
        raise ValueError(f"torch.nn has no {cfg['cell']}")
    sd = {k: torch.tensor(np.asarray(v, dtype=np.float64)) for k, v in m.state_dict().items()}
    mod.load_state_dict(sd, strict=True)
    return mod


def torch_reference(m, x, state=None, lengths=None, dy=None, dstate=None) -> Result:
    """Run torch.nn in float64 with ``m``'s weights on ``x`` (in ``m``'s layout).

    ``lengths`` must be >= 1 (torch's packing rejects 0): use :func:`naive_reference` for 0.
    """
    x = as_np(x)
    unbatched = x.ndim == 2
    cfg, xt, st, params = _leaves(m, x, state, unbatched)
    mod = torch_module(m)
    bf = cfg["batch_first"]
    # torch.nn's own parameters must be the leaves we differentiate against.
    with torch.no_grad():
        for name, p in mod.named_parameters():
            p.copy_(params[name])
    params = dict(mod.named_parameters())
    hx = tuple(st) if cfg["cell"] == "LSTM" else st[0]
    if lengths is None:
        y, final = mod(xt, hx)
    else:
        lens = torch.as_tensor(np.atleast_1d(as_np(lengths)).astype(np.int64))
        if lens.numel() and int(lens.min()) < 1:
            raise ValueError("torch_reference: torch.nn cannot pack length 0")
        xb, hb = xt, hx
        if unbatched:                   # torch.nn packs only batched input
            xb = xt.unsqueeze(0 if bf else 1)
            hb = tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
        T = xb.shape[1 if bf else 0]
        packed = torch.nn.utils.rnn.pack_padded_sequence(xb, lens, batch_first=bf,
                                                         enforce_sorted=False)
        out, final = mod(packed, hb)
        y, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=bf, total_length=T)
        if unbatched:
            y = y.squeeze(0 if bf else 1)
            final = (tuple(f.squeeze(1) for f in final) if isinstance(final, tuple)
                     else final.squeeze(1))
    final = tuple(final) if isinstance(final, tuple) else (final,)
    return _finish(y, final, xt, st, params, dy, dstate)


# ---------------------------------------------------------------------- naive, from DESIGN §2

_ACT = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu}


def _lin(w, v, b=None):
    out = w @ v
    return out if b is None else out + b


def _step(cfg: dict, p: dict, x, h, c):
    """One step of one cell on one sequence: vectors in, ``(h, c)`` out (c None but LSTM)."""
    cell = cfg["cell"]
    if cell == "RNN":
        act = _ACT[cfg["nonlinearity"]]
        return act(_lin(p["weight_ih"], x, p.get("bias_ih"))
                   + _lin(p["weight_hh"], h, p.get("bias_hh"))), None
    if cell == "LSTM":
        pre = _lin(p["weight_ih"], x, p.get("bias_ih")) + _lin(p["weight_hh"], h, p.get("bias_hh"))
        i, f, g, o = pre.chunk(4)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if "weight_hr" in p:
            h = p["weight_hr"] @ h
        return h, c
    if cell == "GRU":
        gi = _lin(p["weight_ih"], x, p.get("bias_ih"))
        gh = _lin(p["weight_hh"], h, p.get("bias_hh"))
        ir, iz, in_ = gi.chunk(3)
        hr, hz, hn = gh.chunk(3)
        r = torch.sigmoid(ir + hr)
        z = torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return (1 - z) * n + z * h, None
    if cell == "TwoStageRNN":
        f, g = _ACT[cfg["f"]], _ACT[cfg["g"]]
        a = f(p["weight_ia"] @ x + p["weight_aa"] @ h
              + p.get("bias_a", 0.0))
        h = g(p["weight_ha"] @ a + p["weight_hh"] @ h
              + p.get("bias_h", 0.0))
        return h, None
    raise ValueError(cell)


def naive_forward(cfg: dict, params: dict, x, h0, c0, lengths, dropout_masks=None):
    """Time-major batched ``x`` (T, B, I); ``h0``/``c0`` (L*D, B, ·) (c0 None but LSTM);
    ``lengths`` a list of B ints in [0, T]; ``dropout_masks[layer]`` (T, B, in) or None,
    multiplied into layer ``layer``'s input. Returns ``y, h_n, c_n``."""
    T, B = x.shape[0], x.shape[1]
    L, D = cfg["num_layers"], 2 if cfg["bidirectional"] else 1
    P = cfg["proj_size"] or cfg["hidden_size"]
    lstm = cfg["cell"] == "LSTM"
    inp = x
    h_n, c_n = [], []
    for layer in range(L):
        if dropout_masks is not None and dropout_masks[layer] is not None:
            inp = inp * dropout_masks[layer]
        outs = []
        for d in range(D):
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            p = {k[: -len(suffix)]: v for k, v in params.items() if k.endswith(suffix)}
            k = layer * D + d
            cols, hs, cs = [], [], []
            for b in range(B):
                h = h0[k, b]
                c = c0[k, b] if lstm else None
                ys = [torch.zeros(P, dtype=F64) for _ in range(T)]
                n = int(lengths[b])
                order = range(n - 1, -1, -1) if d == 1 else range(n)
                for t in order:
                    h, c = _step(cfg, p, inp[t, b], h, c)
                    ys[t] = h
                cols.append(torch.stack(ys) if T else torch.zeros(0, P, dtype=F64))
                hs.append(h)
                cs.append(c)
            outs.append(torch.stack(cols, dim=1) if B else torch.zeros(T, 0, P, dtype=F64))
            h_n.append(torch.stack(hs) if B else h0[k])
            if lstm:
                c_n.append(torch.stack(cs) if B else c0[k])
        inp = torch.cat(outs, dim=2)
    return inp, torch.stack(h_n), (torch.stack(c_n) if lstm else None)


def naive_reference(m, x, state=None, lengths=None, dy=None, dstate=None,
                    dropout_masks=None) -> Result:
    """The naive implementation on ``x`` in ``m``'s layout (batch_first / unbatched handled
    by plain transposes here); lengths may be 0. ``dropout_masks`` are time-major
    (T, B, in) per layer, as in the layer's tape."""
    x = as_np(x)
    unbatched = x.ndim == 2
    cfg, xt, st, params = _leaves(m, x, state, unbatched)
    bf = cfg["batch_first"]
    if unbatched:
        x3 = xt.unsqueeze(1)
        st3 = [s.unsqueeze(1) for s in st]
    else:
        x3 = xt.transpose(0, 1) if bf else xt
        st3 = st
    T, B = x3.shape[0], x3.shape[1]
    lens = [T] * B if lengths is None else [int(v) for v in np.atleast_1d(as_np(lengths))]
    masks = None
    if dropout_masks is not None:
        masks = [None if mk is None else t64(mk) for mk in dropout_masks]
    y, h_n, c_n = naive_forward(cfg, params, x3, st3[0], st3[1] if len(st3) > 1 else None,
                                lens, masks)
    if unbatched:
        y, h_n = y[:, 0], h_n[:, 0]
        c_n = None if c_n is None else c_n[:, 0]
    elif bf:
        y = y.transpose(0, 1)
    final = (h_n,) if c_n is None else (h_n, c_n)
    return _finish(y, final, xt, st, params, dy, dstate)


def in_dtype(m, dtype: str):
    """The same layer (config and weights) built in ``dtype`` (float16, bfloat16: the weights
    rounded to it)."""
    import rnn_gpu as rg

    config = m.config()
    layer = getattr(rg, config.pop("cell"))(**{**config, "dtype": dtype})
    layer.load_state_dict(m.state_dict())
    return layer


def reference(m, x, state=None, lengths=None, dy=None, dstate=None) -> Result:
    """torch.nn where it applies (LSTM/GRU/RNN, T, B >= 1, lengths >= 1), else the naive
    implementation."""
    x = as_np(x)
    if x.ndim == 2:
        T, B = x.shape[0], 1
    else:
        T, B = (x.shape[1], x.shape[0]) if m.batch_first else (x.shape[0], x.shape[1])
    lens = None if lengths is None else np.atleast_1d(as_np(lengths))
    if (m.config()["cell"] != "TwoStageRNN" and T > 0 and B > 0
            and (lens is None or lens.min() >= 1)):
        return torch_reference(m, x, state, lengths, dy, dstate)
    return naive_reference(m, x, state, lengths, dy, dstate)


# ---------------------------------------------------------------------- the code under test

def ours(m, x, state=None, lengths=None, dy=None, dstate=None, backend=None) -> Result:
    """Run ``m`` (forward + backward when dy is given) and return numpy results."""
    if dy is None:
        y, final = m(x, state, lengths=lengths, backend=backend)
        return Result(as_np(y), tuple(as_np(f) for f in as_tuple(final)))
    y, final, tape = m.forward(x, state, lengths=lengths, backend=backend)
    dx, dstate0, grads = m.backward(tape, dy, dstate)
    return Result(as_np(y), tuple(as_np(f) for f in as_tuple(final)), as_np(dx),
                  tuple(as_np(g) for g in as_tuple(dstate0)),
                  {k: as_np(v) for k, v in grads.items()})


def assert_close(got: Result, want: Result, *, rtol: float, atol: float, what: str = "",
                 equal_nan: bool = False) -> None:
    """Compare every field present in ``want``, element by element: ``|got - want| <= atol +
    rtol |want|``, except that a weight gradient's ``atol`` is scaled by its array's largest
    magnitude (at least 1).

    Why the weight gradients differ: each element is a sum over all T*B steps and rows, and
    its rounding error is bounded by the sum of its terms' magnitudes, not by the element
    itself; an element where large terms cancel to ~0.1 carries the error of the array's
    large elements. Float32 itself reaches the edge of an unscaled bound there: GRU
    48x64x64->256 in IEEE float32 on the interpreter came to 0.99 of ``2e-5 + 2e-5 |want|``
    in one element of ``weight_ih`` (2.9e-7 of the array's largest gradient), and tf32x3
    (4x float32's unit roundoff in the products) went over it by 1.2-1.3x in one element of
    ~50 000 on an H200 (run 7, docs/performance.md). Scaled by the array, float32 and tf32x3
    stay near 0.01 of the bound and a one-pass TF32 GEMM (2^-11 relative) still fails it by
    10-15x (GRU 8x16x16->64; tests/test_matmul.py), as would any missing or wrong term."""
    def check(a, b, name, scaled=False):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape, f"{what}{name}: shape {a.shape} != expected {b.shape}"
        scale = max(1.0, float(np.nanmax(np.abs(b), initial=0.0))) if scaled else 1.0
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale, equal_nan=equal_nan,
                                   err_msg=f"{what}{name}" + (f" (atol x {scale:.3g}, the "
                                   "array's largest magnitude)" if scale != 1.0 else ""))

    check(got.y, want.y, "y")
    assert len(got.state) == len(want.state), f"{what}state structure"
    for i, (a, b) in enumerate(zip(got.state, want.state)):
        check(a, b, f"state[{i}]")
    if want.dx is not None:
        check(got.dx, want.dx, "dx")
        assert len(got.dstate0) == len(want.dstate0)
        for i, (a, b) in enumerate(zip(got.dstate0, want.dstate0)):
            check(a, b, f"dstate0[{i}]")
        assert set(got.grads) == set(want.grads), f"{what}grad names"
        for k in want.grads:
            check(got.grads[k], want.grads[k], f"grads[{k!r}]", scaled=True)


def assert_close_rms(got: Result, want: Result, *, tol: float, what: str = "") -> None:
    """Half-precision comparison (DESIGN §6): every field's relative RMS error
    ``||got - want|| / ||want||`` at most ``tol``. Element-wise bounds do not fit fp16/bf16:
    a gradient summed over T*B rounded terms (a bias gradient) carries an absolute error that
    grows with sqrt(T*B) while single elements of it may be small."""
    def check(a, b, name):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        assert a.shape == b.shape, f"{what}{name}: shape {a.shape} != expected {b.shape}"
        assert np.isfinite(a).all(), f"{what}{name}: not finite"
        scale = max(float(np.sqrt(np.mean(b * b))), 1e-3) if b.size else 1.0
        err = float(np.sqrt(np.mean((a - b) ** 2))) / scale if b.size else 0.0
        assert err <= tol, f"{what}{name}: relative RMS error {err:.2e} > {tol:.0e}"

    check(got.y, want.y, "y")
    for i, (a, b) in enumerate(zip(got.state, want.state)):
        check(a, b, f"state[{i}]")
    if want.dx is not None:
        check(got.dx, want.dx, "dx")
        for i, (a, b) in enumerate(zip(got.dstate0, want.dstate0)):
            check(a, b, f"dstate0[{i}]")
        assert set(got.grads) == set(want.grads), f"{what}grad names"
        for k in want.grads:
            check(got.grads[k], want.grads[k], f"grads[{k!r}]")
