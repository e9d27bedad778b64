"""The core layers against independent references (DESIGN §6): torch.nn in float64 with the same
weights, and a naive per-sequence implementation of DESIGN §2 (TwoStageRNN, lengths of 0).

Forward outputs, final states and every gradient of ``m.backward`` (dx, dstate0, each parameter)
are compared, over random configurations (hypothesis) and explicit odd shapes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import (
    Result,
    as_np,
    as_tuple,
    assert_close,
    naive_reference,
    ours,
    reference,
    torch_reference,
)

import rnn_gpu as rg

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'rnn-gpu[test]')")

CELLS = ("LSTM", "GRU", "RNN", "TwoStageRNN")
ACTS = ("tanh", "sigmoid", "relu")


@dataclass
class Case:
    cell: str
    T: int
    B: int
    I: int
    H: int
    num_layers: int = 1
    bidirectional: bool = False
    batch_first: bool = False
    unbatched: bool = False
    bias: bool = True
    proj_size: int = 0
    opts: dict | None = None          # nonlinearity / f, g
    with_state: bool = False
    lengths: str = "none"             # "none" | "full" (1..T) | "zero" (0..T, some 0)
    dtype: str = "float64"
    seed: int | None = None


def build(case: Case, rng: np.random.Generator):
    """The model and random x, state, lengths, dy, dstate for ``case``."""
    cls = getattr(rg, case.cell)
    kwargs = dict(num_layers=case.num_layers, bias=case.bias, batch_first=case.batch_first,
                  bidirectional=case.bidirectional, dtype=case.dtype,
                  seed=int(rng.integers(2**32)), **(case.opts or {}))
    if case.proj_size:
        kwargs["proj_size"] = case.proj_size
    m = cls(case.I, case.H, **kwargs)
    dt = np.dtype(case.dtype)
    T, B = case.T, case.B
    if case.unbatched:
        shape = (T, case.I)
    else:
        shape = (B, T, case.I) if case.batch_first else (T, B, case.I)
    x = rng.standard_normal(shape).astype(dt)
    n = case.num_layers * (2 if case.bidirectional else 1)
    P = case.proj_size or case.H
    sshapes = [(n, P)] if case.unbatched else [(n, B, P)]
    if case.cell == "LSTM":
        sshapes.append((n, case.H) if case.unbatched else (n, B, case.H))
    state = None
    if case.with_state:
        parts = tuple((0.5 * rng.standard_normal(s)).astype(dt) for s in sshapes)
        state = parts if case.cell == "LSTM" else parts[0]
    lengths = None
    Bl = 1 if case.unbatched else B
    if case.lengths == "full":
        lengths = rng.integers(1, T + 1, size=Bl)
    elif case.lengths == "zero":
        lengths = rng.integers(0, T + 1, size=Bl)
        lengths[rng.integers(Bl)] = 0
    y_shape = shape[:-1] + ((2 if case.bidirectional else 1) * P,)
    dy = rng.standard_normal(y_shape).astype(dt)
    dstate = tuple(rng.standard_normal(s).astype(dt) for s in sshapes)
    dstate = dstate if case.cell == "LSTM" else dstate[0]
    return m, x, state, lengths, dy, dstate


@st.composite
def cases(draw, cells=CELLS, dtype="float64", max_T=6, max_B=4, max_H=7):
    cell = draw(st.sampled_from(cells))
    H = draw(st.integers(1, max_H))
    opts, proj = None, 0
    if cell == "RNN":
        opts = {"nonlinearity": draw(st.sampled_from(("tanh", "relu")))}
    elif cell == "TwoStageRNN":
        opts = {"f": draw(st.sampled_from(ACTS)), "g": draw(st.sampled_from(ACTS))}
    elif cell == "LSTM" and H > 1 and draw(st.booleans()):
        proj = draw(st.integers(1, H - 1))
    return Case(cell=cell, T=draw(st.integers(1, max_T)), B=draw(st.integers(1, max_B)),
                I=draw(st.integers(1, 6)), H=H, num_layers=draw(st.integers(1, 3)),
                bidirectional=draw(st.booleans()), batch_first=draw(st.booleans()),
                unbatched=draw(st.booleans()), bias=draw(st.booleans()), proj_size=proj,
                opts=opts, with_state=draw(st.booleans()),
                lengths=draw(st.sampled_from(("none", "full", "zero"))), dtype=dtype,
                seed=draw(st.integers(0, 2**63 - 1)))


def run_case(case: Case, *, rtol=1e-10, atol=1e-10):
    rng = np.random.default_rng(case.seed)
    m, x, state, lengths, dy, dstate = build(case, rng)
    want = reference(m, x, state, lengths, dy, dstate)
    got = ours(m, x, state, lengths, dy, dstate)
    assert_close(got, want, rtol=rtol, atol=atol, what=f"{case}: ")
    inference = ours(m, x, state, lengths)          # the tape-free path of m(x)
    assert_close(inference, Result(want.y, want.state), rtol=rtol, atol=atol,
                 what=f"{case} m(x): ")
    return m, got, want


# ---------------------------------------------------------------------- float64, random configs

@settings(max_examples=150, deadline=None)
@given(cases())
def test_forward_backward_match_reference_float64(case):
    run_case(case)


@settings(max_examples=40, deadline=None)
@given(cases(cells=("LSTM", "GRU", "RNN")))
def test_naive_oracle_agrees_with_torch_nn(case):
    """The naive oracle (the only reference for TwoStageRNN) is itself right where torch.nn
    can check it: same layer/direction/lengths machinery, different cells."""
    if case.lengths == "zero":
        case.lengths = "full"
    rng = np.random.default_rng(case.seed)
    m, x, state, lengths, dy, dstate = build(case, rng)
    a = torch_reference(m, x, state, lengths, dy, dstate)
    b = naive_reference(m, x, state, lengths, dy, dstate)
    assert_close(a, b, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------- explicit shapes

WEIRD = [
    # cell, T, B, I, H, extras
    ("LSTM", 1, 1, 1, 1, {}),
    ("GRU", 1, 1, 1, 1, {}),
    ("RNN", 1, 1, 1, 1, {}),
    ("TwoStageRNN", 1, 1, 1, 1, {}),
    ("LSTM", 1, 3, 2, 5, dict(bidirectional=True, num_layers=2)),
    ("GRU", 4, 1, 1, 3, dict(bidirectional=True, lengths="full")),
    ("LSTM", 3, 2, 4, 63, dict(proj_size=17, bidirectional=True, lengths="full")),
    ("GRU", 3, 2, 63, 63, dict(num_layers=2, lengths="zero")),
    ("RNN", 3, 2, 5, 63, dict(opts={"nonlinearity": "relu"}, bidirectional=True)),
    ("TwoStageRNN", 3, 2, 5, 63, dict(opts={"f": "sigmoid", "g": "relu"}, lengths="full",
                                      bidirectional=True)),
    ("LSTM", 2, 2, 3, 500, dict(lengths="full", with_state=True)),
    ("GRU", 2, 2, 3, 500, dict(bidirectional=True)),
    ("RNN", 2, 2, 3, 500, dict(with_state=True)),
    ("TwoStageRNN", 2, 2, 3, 500, dict(with_state=True, lengths="full")),
]


@pytest.mark.parametrize("cell,T,B,I,H,extra", WEIRD,
                         ids=[f"{c}-T{t}B{b}I{i}H{h}" for c, t, b, i, h, _ in WEIRD])
def test_weird_shapes(cell, T, B, I, H, extra, rng):
    case = Case(cell=cell, T=T, B=B, I=I, H=H, seed=int(rng.integers(2**63)), **extra)
    run_case(case)


@pytest.mark.parametrize("cell", CELLS)
def test_long_sequence_multilayer(cell, rng):
    case = Case(cell=cell, T=25, B=3, I=4, H=6, num_layers=3, bidirectional=True,
                lengths="zero", with_state=True, seed=int(rng.integers(2**63)),
                proj_size=4 if cell == "LSTM" else 0)
    run_case(case)


# ---------------------------------------------------------------------- float32

@pytest.mark.parametrize("cell,opts,proj", [
    ("LSTM", None, 0), ("LSTM", None, 3), ("GRU", None, 0), ("RNN", {"nonlinearity": "tanh"}, 0),
    ("RNN", {"nonlinearity": "relu"}, 0), ("TwoStageRNN", {"f": "tanh", "g": "sigmoid"}, 0),
    ("TwoStageRNN", {"f": "relu", "g": "tanh"}, 0),
])
def test_float32_matches_float64_reference(cell, opts, proj, rng):
    """float32 inputs and weights against the float64 reference on the same (float32) values:
    within 1e-5 of the largest reference value (measured: a few 1e-7)."""
    case = Case(cell=cell, T=12, B=5, I=7, H=33, num_layers=2, bidirectional=True, opts=opts,
                proj_size=proj, with_state=True, lengths="full", dtype="float32",
                seed=int(rng.integers(2**63)))
    r = np.random.default_rng(case.seed)
    m, x, state, lengths, dy, dstate = build(case, r)
    got = ours(m, x, state, lengths, dy, dstate)
    want = reference(m, x, state, lengths, dy, dstate)
    assert got.y.dtype == np.float32 and got.dx.dtype == np.float32
    assert all(s.dtype == np.float32 for s in got.state + got.dstate0)
    assert all(g.dtype == np.float32 for g in got.grads.values())

    def rel(a, b):
        return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))

    for a, b in [(got.y, want.y), *zip(got.state, want.state)]:
        assert rel(a, b) < 1e-5
    for a, b in [(got.dx, want.dx), *zip(got.dstate0, want.dstate0)]:
        assert rel(a, b) < 1e-5
    for k in want.grads:
        assert rel(got.grads[k], want.grads[k]) < 1e-5, k


SMALL_ACTIVATION_CELLS = [("LSTM", None), ("GRU", None), ("RNN", {"nonlinearity": "tanh"}),
                          ("TwoStageRNN", {"f": "tanh", "g": "tanh"})]


def check_small_activations(cell, opts, scale, seed, backend=None, to_input=None,
                            device=None):
    """Inputs of size ``scale`` (no biases, zero state), so that every pre-activation is of
    that size: float32 results against the float64 reference by relative RMS error, with no
    floor on the scale. tanh as 2/(1+e^-2x) - 1 kept only an absolute error of 1's rounding:
    tanh(1e-8) came out 0, and an LSTM fed inputs of 1e-6 was 24% off."""
    case = Case(cell=cell, T=6, B=3, I=4, H=9, opts=opts, bias=False, dtype="float32",
                seed=seed)
    m, x, _, _, dy, dstate = build(case, np.random.default_rng(seed))
    x = (x * scale).astype(np.float32)
    want = reference(m, x, None, None, dy, dstate)
    if device is not None:
        m.to(device)
    if to_input is not None:          # the backend's array kind (torch for Triton)
        x, dy = to_input(x), to_input(dy)
        dstate = (tuple(map(to_input, dstate)) if isinstance(dstate, tuple)
                  else to_input(dstate))
    got = ours(m, x, None, None, dy, dstate, backend=backend)
    pairs = [("y", got.y, want.y), *(("state", a, b) for a, b in zip(got.state, want.state)),
             ("dx", got.dx, want.dx),
             *((f"grad {k}", got.grads[k], want.grads[k]) for k in want.grads)]
    for name, a, b in pairs:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        err = np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b * b))
        assert err < 1e-5, f"{cell} at scale {scale}: {name} off by {err:.1e} (relative RMS)"


@pytest.mark.parametrize("cell,opts", SMALL_ACTIVATION_CELLS)
@pytest.mark.parametrize("scale", [1e-4, 1e-8])
def test_float32_keeps_relative_accuracy_for_small_activations(cell, opts, scale, rng):
    check_small_activations(cell, opts, scale, int(rng.integers(2**63)))


# ---------------------------------------------------------------------- lengths semantics

@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_length_zero_keeps_initial_state_and_outputs_zero(cell, bidirectional, rng):
    """lengths may be 0 (torch's packing refuses it): that sequence's outputs are all zero, its
    final state is its initial state, and its dstate0 is the incoming dstate."""
    case = Case(cell=cell, T=4, B=3, I=3, H=4, num_layers=2, bidirectional=bidirectional,
                with_state=True, lengths="full", seed=int(rng.integers(2**63)))
    m, x, state, lengths, dy, dstate = build(case, rng)
    lengths[1] = 0
    got = ours(m, x, state, lengths, dy, dstate)
    assert np.all(got.y[:, 1] == 0)
    for s0, s in zip(as_tuple(state), got.state):
        np.testing.assert_array_equal(s[:, 1], s0[:, 1])
    for d_in, d_out in zip(as_tuple(dstate), got.dstate0):
        np.testing.assert_allclose(d_out[:, 1], d_in[:, 1], rtol=0, atol=0)
    assert np.all(got.dx[:, 1] == 0)
    # The other sequences are unaffected by the empty one.
    keep = [0, 2]
    sub_state = None if state is None else tuple(s[:, keep] for s in as_tuple(state))
    if sub_state is not None and cell != "LSTM":
        sub_state = sub_state[0]
    sub = ours(m, x[:, keep], sub_state, lengths[keep])
    np.testing.assert_allclose(got.y[:, keep], sub.y, rtol=1e-12, atol=1e-12)
    # And the whole thing agrees with the naive definition, gradients included.
    assert_close(got, naive_reference(m, x, state, lengths, dy, dstate), rtol=1e-10,
                 atol=1e-10)


@pytest.mark.parametrize("cell", CELLS)
def test_full_lengths_equal_no_lengths(cell, rng):
    case = Case(cell=cell, T=5, B=3, I=2, H=4, bidirectional=True, num_layers=2,
                seed=int(rng.integers(2**63)))
    m, x, state, _, dy, dstate = build(case, rng)
    a = ours(m, x, state, None, dy, dstate)
    for lengths in (np.full(3, 5), [5, 5, 5], torch.tensor([5, 5, 5])):
        b = ours(m, x, state, lengths, dy, dstate)
        assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_padding_does_not_leak(rng):
    """Changing x beyond a sequence's length changes nothing, in either direction."""
    case = Case(cell="LSTM", T=6, B=3, I=3, H=4, bidirectional=True, num_layers=2,
                seed=int(rng.integers(2**63)))
    m, x, *_ = build(case, rng)
    lengths = np.array([6, 2, 4])
    y1, (h1, c1) = m(x, lengths=lengths)
    x2 = x.copy()
    x2[2:, 1] = rng.standard_normal(x2[2:, 1].shape) * 100
    x2[4:, 2] = np.nan
    y2, (h2, c2) = m(x2, lengths=lengths)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(h1, h2)
    np.testing.assert_array_equal(c1, c2)


# ---------------------------------------------------------------------- array kinds and layouts

@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_in_torch_out(cell, dtype, rng):
    case = Case(cell=cell, T=4, B=3, I=3, H=5, bidirectional=True, with_state=True,
                lengths="full", dtype=dtype, seed=int(rng.integers(2**63)))
    m, x, state, lengths, dy, dstate = build(case, rng)
    tdt = getattr(torch, dtype)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)     # a leaf that wants grad: fine
    st_t = tuple(torch.from_numpy(s.copy()) for s in as_tuple(state))
    st_t = st_t if cell == "LSTM" else st_t[0]
    y, final, tape = m.forward(xt, st_t, lengths=torch.from_numpy(lengths))
    assert isinstance(y, torch.Tensor) and y.dtype == tdt
    for s in as_tuple(final):
        assert isinstance(s, torch.Tensor) and s.dtype == tdt
    if cell == "LSTM":
        assert isinstance(final, tuple) and len(final) == 2
    dyt = torch.from_numpy(dy.copy())
    ds_t = tuple(torch.from_numpy(d.copy()) for d in as_tuple(dstate))
    dx, d0, grads = m.backward(tape, dyt, ds_t if cell == "LSTM" else ds_t[0])
    assert isinstance(dx, torch.Tensor) and dx.dtype == tdt and dx.shape == xt.shape
    for s in as_tuple(d0):
        assert isinstance(s, torch.Tensor) and s.dtype == tdt
    for k, g in grads.items():       # grads come in the kind of parameters(): NumPy here
        assert isinstance(g, np.ndarray) and g.dtype == np.dtype(dtype), k
        assert g.shape == m.parameters()[k].shape
    ref = ours(m, x, state, lengths, dy, dstate)
    tol = 1e-6 if dtype == "float32" else 1e-12
    got = type(ref)(as_np(y), tuple(as_np(s) for s in as_tuple(final)), as_np(dx),
                    tuple(as_np(s) for s in as_tuple(d0)), {k: as_np(v) for k, v in grads.items()})
    assert_close(got, ref, rtol=tol, atol=tol)
    m2 = getattr(rg, cell)(3, 5, dtype=dtype)
    y2, _ = m2(torch.zeros(2, 3, dtype=tdt))          # unbatched torch too
    assert isinstance(y2, torch.Tensor) and y2.shape == (2, 5)


@pytest.mark.parametrize("cell", CELLS)
def test_numpy_in_numpy_out(cell, rng):
    case = Case(cell=cell, T=3, B=2, I=3, H=4, dtype="float32", seed=int(rng.integers(2**63)))
    m, x, state, lengths, dy, dstate = build(case, rng)
    y, final, tape = m.forward(x)
    assert type(y) is np.ndarray and y.dtype == np.float32
    assert all(type(s) is np.ndarray for s in as_tuple(final))
    dx, d0, grads = m.backward(tape, dy)
    assert type(dx) is np.ndarray and dx.dtype == np.float32
    assert all(type(s) is np.ndarray for s in as_tuple(d0))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("layout", ["batch_first", "unbatched"])
def test_layouts_agree_with_time_major(cell, layout, rng):
    """batch_first and unbatched inputs give the time-major results, transposed / sliced."""
    seed = int(rng.integers(2**32))
    kw = dict(num_layers=2, bidirectional=True, dtype="float64", seed=seed)
    m_tm = getattr(rg, cell)(3, 4, **kw)
    T, B = 5, 3
    x = rng.standard_normal((T, B, 3))
    lengths = np.array([5, 3, 1])
    y, final = m_tm(x, lengths=lengths)
    if layout == "batch_first":
        m_bf = getattr(rg, cell)(3, 4, batch_first=True, **kw)
        y2, final2 = m_bf(np.ascontiguousarray(x.transpose(1, 0, 2)), lengths=lengths)
        np.testing.assert_allclose(y2, y.transpose(1, 0, 2), rtol=1e-12, atol=1e-12)
        for a, b in zip(as_tuple(final2), as_tuple(final)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    else:
        for b in range(B):
            y2, final2 = m_tm(np.ascontiguousarray(x[:, b]), lengths=int(lengths[b]))
            assert y2.shape == (T, 8)
            np.testing.assert_allclose(y2, y[:, b], rtol=1e-12, atol=1e-12)
            for s2, s in zip(as_tuple(final2), as_tuple(final)):
                assert s2.shape == (4, 4)
                np.testing.assert_allclose(s2, s[:, b], rtol=1e-12, atol=1e-12)


def _snapshot(*arrays):
    return [None if a is None else (a.clone() if isinstance(a, torch.Tensor) else a.copy())
            for a in arrays]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("variant", ["transposed", "negative_strides", "readonly",
                                     "memmap", "torch_transposed"])
def test_noncontiguous_and_readonly_inputs(cell, variant, rng, tmp_path):
    """Strided views and read-only arrays give the contiguous copy's results, and nothing the
    caller passed in (x, state, lengths, dy, dstate) or the weights is modified."""
    case = Case(cell=cell, T=5, B=4, I=3, H=4, bidirectional=True, num_layers=2,
                with_state=True, lengths="full", seed=int(rng.integers(2**63)),
                proj_size=2 if cell == "LSTM" else 0)
    m, x, state, lengths, dy, dstate = build(case, rng)
    want = ours(m, x, state, lengths, dy, dstate)

    def strided(a):
        if variant == "transposed":            # a (T, B, ·) view of a (B, T, ·) array
            return np.ascontiguousarray(a.swapaxes(0, 1)).swapaxes(0, 1)
        if variant == "negative_strides":
            return np.ascontiguousarray(a[::-1, ::-1])[::-1, ::-1]
        if variant == "readonly":
            b = a.copy()
            b.flags.writeable = False
            return b
        if variant == "memmap":                 # read-only, as `rnn-gpu run` reads .npy files
            path = tmp_path / f"a{len(list(tmp_path.iterdir()))}.npy"
            np.save(path, a)
            return np.load(path, mmap_mode="r")
        return torch.from_numpy(np.ascontiguousarray(a.swapaxes(0, 1))).transpose(0, 1)

    xs, dys = strided(x), strided(dy)
    ss = tuple(strided(s) for s in as_tuple(state))
    dss = tuple(strided(s) for s in as_tuple(dstate))
    if variant not in ("readonly", "memmap"):
        assert not (xs.is_contiguous() if isinstance(xs, torch.Tensor)
                    else xs.flags.c_contiguous)
    if cell != "LSTM":
        ss, dss = ss[0], dss[0]
    lens = lengths.copy()
    if variant in ("readonly", "memmap"):
        lens.flags.writeable = False
    before = _snapshot(xs, dys, *as_tuple(ss), *as_tuple(dss), lens)
    params_before = {k: v.copy() for k, v in m.parameters().items()}
    got = ours(m, xs, ss, lens, dys, dss)
    assert_close(got, want, rtol=1e-13, atol=1e-13)
    after = [xs, dys, *as_tuple(ss), *as_tuple(dss), lens]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(as_np(a), as_np(b))
    for k, v in m.parameters().items():
        np.testing.assert_array_equal(v, params_before[k])


@pytest.mark.parametrize("cell", CELLS)
def test_inputs_not_modified_contiguous(cell, rng):
    """The plain contiguous case too (no defensive copy on the way in to hide a write)."""
    case = Case(cell=cell, T=4, B=3, I=3, H=4, with_state=True, lengths="full",
                seed=int(rng.integers(2**63)))
    m, x, state, lengths, dy, dstate = build(case, rng)
    for kind in ("numpy", "torch"):
        conv = (lambda a: a) if kind == "numpy" else torch.from_numpy
        xs, dys = conv(x.copy()), conv(dy.copy())
        ss = tuple(conv(s.copy()) for s in as_tuple(state))
        dss = tuple(conv(s.copy()) for s in as_tuple(dstate))
        ss, dss = (ss, dss) if cell == "LSTM" else (ss[0], dss[0])
        ours(m, xs, ss, lengths, dys, dss)
        np.testing.assert_array_equal(as_np(xs), x)
        np.testing.assert_array_equal(as_np(dys), dy)
        for a, b in zip(as_tuple(ss), as_tuple(state)):
            np.testing.assert_array_equal(as_np(a), b)
        for a, b in zip(as_tuple(dss), as_tuple(dstate)):
            np.testing.assert_array_equal(as_np(a), b)


# ---------------------------------------------------------------------- NaN / Inf

@pytest.mark.parametrize("cell", CELLS)
def test_nan_propagates(cell, rng):
    case = Case(cell=cell, T=5, B=3, I=3, H=4, seed=int(rng.integers(2**63)),
                opts={"f": "relu", "g": "tanh"} if cell == "TwoStageRNN" else None)
    m, x, *_ = build(case, rng)
    x[2, 1, 0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        y, final = m(x)
        y_t, final_t, tape = m.forward(x)
    np.testing.assert_array_equal(y, y_t)
    assert np.isnan(y[2:, 1]).all(), "NaN must reach every later output of that sequence"
    assert np.isfinite(y[:2]).all() and np.isfinite(y[:, [0, 2]]).all()
    assert np.isnan(as_tuple(final)[0][:, 1]).all()
    assert np.isfinite(as_tuple(final)[0][:, [0, 2]]).all()
    want = reference(m, x)
    assert_close(ours(m, x), want, rtol=1e-10, atol=1e-10, equal_nan=True)
    with warnings.catch_warnings():                 # backward runs too; other rows stay clean
        warnings.simplefilter("ignore", RuntimeWarning)
        dx, _, grads = m.backward(tape, np.ones_like(y_t))
    assert np.isnan(dx[:, 1]).any()
    assert np.isfinite(dx[:, [0, 2]]).all()


@pytest.mark.parametrize("cell", CELLS)
def test_inf_propagates_like_reference(cell, rng):
    case = Case(cell=cell, T=4, B=3, I=3, H=4, bidirectional=True, seed=int(rng.integers(2**63)),
                opts={"nonlinearity": "relu"} if cell == "RNN" else None)
    m, x, *_ = build(case, rng)
    x[1, 0, 1] = np.inf
    x[2, 2, 0] = -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = ours(m, x)
    want = reference(m, x)
    assert_close(got, want, rtol=1e-10, atol=1e-10, equal_nan=True)
    np.testing.assert_allclose(got.y[:, 1], reference(m, x[:, 1:2]).y[:, 0], rtol=1e-10,
                               atol=1e-10)


# ---------------------------------------------------------------------- empty T or B

@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("T,B", [(0, 3), (4, 0), (0, 0)])
@pytest.mark.parametrize("with_state", [False, True])
def test_empty_sequence_or_batch(cell, T, B, with_state, rng):
    """T=0 or B=0: empty output of the right shape, final state = initial state (zeros if none
    given), backward gives an empty dx, dstate0 = dstate and zero parameter gradients."""
    case = Case(cell=cell, T=T, B=B, I=3, H=4, num_layers=2, bidirectional=True,
                with_state=with_state, seed=int(rng.integers(2**63)),
                proj_size=2 if cell == "LSTM" else 0)
    m, x, state, _, dy, dstate = build(case, rng)
    P = 2 if cell == "LSTM" else 4
    for lengths in (None, np.zeros(B, dtype=np.int64)):
        y, final, tape = m.forward(x, state, lengths=lengths)
        assert y.shape == (T, B, 2 * P) and y.dtype == np.float64
        y_inf, _ = m(x, state, lengths=lengths)
        assert y_inf.shape == (T, B, 2 * P)
        finals = as_tuple(final)
        assert finals[0].shape == (4, B, P)
        if cell == "LSTM":
            assert finals[1].shape == (4, B, 4)
        for i, s in enumerate(finals):
            want = as_tuple(state)[i] if with_state else np.zeros_like(s)
            np.testing.assert_array_equal(s, want)
        dx, d0, grads = m.backward(tape, dy, dstate)
        assert dx.shape == x.shape
        assert not np.any(dx)
        for a, b in zip(as_tuple(d0), as_tuple(dstate)):
            np.testing.assert_array_equal(a, b)
        assert set(grads) == set(m.parameters())
        for k, g in grads.items():
            assert g.shape == m.parameters()[k].shape and not np.any(g), k
    if B > 0:
        # against the naive definition too (which loops over nothing)
        assert_close(ours(m, x, state, None, dy, dstate),
                     naive_reference(m, x, state, None, dy, dstate), rtol=0, atol=0)


@pytest.mark.parametrize("cell", CELLS)
def test_empty_torch_input(cell):
    m = getattr(rg, cell)(3, 4, bidirectional=True)
    y, final, tape = m.forward(torch.zeros(0, 2, 3))
    assert isinstance(y, torch.Tensor) and y.shape == (0, 2, 8) and y.dtype == torch.float32
    assert all(isinstance(s, torch.Tensor) and s.shape[1] == 2 for s in as_tuple(final))
    dx, _, _ = m.backward(tape, torch.zeros(0, 2, 8))
    assert isinstance(dx, torch.Tensor) and dx.shape == (0, 2, 3)


# ---------------------------------------------------------------------- bias=False, defaults

@pytest.mark.parametrize("cell", CELLS)
def test_bias_false_has_no_bias_parameters(cell, rng):
    m = getattr(rg, cell)(3, 4, bias=False, dtype="float64", seed=int(rng.integers(2**32)))
    assert not any("bias" in k for k in m.parameters())
    m_b = getattr(rg, cell)(3, 4, dtype="float64")
    assert any("bias" in k for k in m_b.parameters())
    run_case(Case(cell=cell, T=3, B=2, I=3, H=4, bias=False, lengths="zero",
                  seed=int(rng.integers(2**63))))


@pytest.mark.parametrize("cell", ("LSTM", "GRU", "RNN"))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_parameter_names_and_shapes_match_torch(cell, bidirectional):
    kw = dict(num_layers=2, bidirectional=bidirectional)
    if cell == "LSTM":
        kw["proj_size"] = 3
    m = getattr(rg, cell)(5, 7, **kw)
    t = getattr(torch.nn, cell)(5, 7, **kw)
    assert list(m.parameters()) == [k for k, _ in t.named_parameters()]
    for k, p in t.named_parameters():
        assert m.parameters()[k].shape == tuple(p.shape), k


def test_twostage_parameter_names():
    m = rg.TwoStageRNN(3, 4, num_layers=2, bidirectional=True)
    base = {"weight_ia": (4, 3), "weight_aa": (4, 4), "bias_a": (4,), "weight_ha": (4, 4),
            "weight_hh": (4, 4), "bias_h": (4,)}
    for k, shape in base.items():
        assert m.parameters()[f"{k}_l0"].shape == shape
        assert m.parameters()[f"{k}_l0_reverse"].shape == shape
    assert m.parameters()["weight_ia_l1"].shape == (4, 8)
    assert len(m.parameters()) == 24


def test_initialisation_bounds_and_seed(rng):
    seed = int(rng.integers(2**32))
    a, b = rg.LSTM(3, 16, seed=seed), rg.LSTM(3, 16, seed=seed)
    c = rg.LSTM(3, 16, seed=seed + 1)
    for k in a.parameters():
        np.testing.assert_array_equal(a.parameters()[k], b.parameters()[k])
        assert np.abs(a.parameters()[k]).max() <= 0.25
    assert any(not np.array_equal(a.parameters()[k], c.parameters()[k]) for k in a.parameters())


def test_explicit_backend_and_use_backend_same_result(rng):
    case = Case(cell="GRU", T=3, B=2, I=3, H=4, seed=int(rng.integers(2**63)))
    m, x, *_ = build(case, rng)
    y0, _ = m(x)
    y1, _ = m(x, backend="numpy")
    with rg.use_backend("numpy"):
        y2, _ = m(x)
    np.testing.assert_array_equal(y0, y1)
    np.testing.assert_array_equal(y0, y2)


def test_load_state_dict_from_torch_module(rng):
    """Weights move from torch.nn unchanged (torch tensors accepted)."""
    t = torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2, dtype=torch.float64)
    m = rg.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2, dtype="float64")
    m.load_state_dict(t.state_dict())
    x = rng.standard_normal((4, 2, 3))
    with torch.no_grad():
        yt, (ht, ct) = t(torch.from_numpy(x))
    y, (h, c) = m(x)
    np.testing.assert_allclose(y, yt.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(h, ht.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(c, ct.numpy(), rtol=1e-10, atol=1e-12)


def test_load_state_dict_copies_the_callers_arrays():
    """Training in place after a load changes neither the torch module it came from nor
    another layer loaded from the same dict (NumPy arrays and CPU tensors both)."""
    t = torch.nn.GRU(3, 4)
    before = {k: v.detach().clone() for k, v in t.state_dict().items()}
    m = rg.GRU(3, 4)
    m.load_state_dict(t.state_dict())
    for p in m.parameters().values():
        p -= 1.0                                    # the README's SGD step
    for k, v in t.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    sd = rg.GRU(3, 4, seed=1).state_dict()
    a, b = rg.GRU(3, 4), rg.GRU(3, 4)
    a.load_state_dict(sd)
    b.load_state_dict(sd)
    for p in a.parameters().values():
        p *= 0.0
    for k, v in b.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])


# ---------------------------------------------------------------------- threaded batch blocks

@pytest.mark.parametrize("cell", CELLS)
def test_large_batch_split_across_threads(cell, rng, monkeypatch):
    """Batches of more than 64 rows per thread run in row blocks on several threads (NumPy
    backend); the blocks must not interfere (lengths differ across block boundaries)."""
    monkeypatch.setenv("RNN_GPU_NUM_THREADS", "3")
    B = 200                                          # 3 blocks: rows 0-65, 66-132, 133-199
    case = Case(cell=cell, T=3, B=B, I=2, H=3, bidirectional=True, with_state=True,
                lengths="full", seed=int(rng.integers(2**63)),
                proj_size=2 if cell == "LSTM" else 0)
    m, x, state, lengths, dy, dstate = build(case, rng)
    got = ours(m, x, state, lengths, dy, dstate)
    if cell == "TwoStageRNN":                        # the naive oracle on a few rows per block
        rows = [0, 65, 66, 132, 133, 199]
        sub_state = tuple(s[:, rows] for s in as_tuple(state))
        want = naive_reference(m, x[:, rows], sub_state[0], lengths[rows], dy[:, rows],
                               dstate[:, rows])
        np.testing.assert_allclose(got.y[:, rows], want.y, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(got.dx[:, rows], want.dx, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(got.dstate0[0][:, rows], want.dstate0[0], rtol=1e-10,
                                   atol=1e-10)
    else:
        assert_close(got, reference(m, x, state, lengths, dy, dstate), rtol=1e-10, atol=1e-10)
    monkeypatch.setenv("RNN_GPU_NUM_THREADS", "1")
    single = ours(m, x, state, lengths, dy, dstate)
    assert_close(got, single, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- steps past every length

@pytest.mark.parametrize("lengths", [[5, 2, 4], [0, 0, 0]], ids=["longest-5-of-9", "all-0"])
def test_steps_past_the_longest_sequence_are_not_run(lengths, rng):
    """With every length below T, the layer runs only up to the longest (the backend is asked
    for those steps), and y, the states, dx and every gradient still equal torch.nn's on the
    packed sequence, padded back to T: zeros past the lengths."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    T, B, I, H = 9, 3, 4, 6
    ref = torch.nn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=3, batch_first=True,
                        dtype=torch.float64)
    m = rg.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=3, batch_first=True,
                dtype="float64")
    m.load_state_dict(ref.state_dict())
    x = rng.standard_normal((B, T, I))
    dy = rng.standard_normal((B, T, 6))
    seen = []
    real = rg.backends.get("numpy").forward_layer

    def recording(problem, *args, **kwargs):
        seen.append(problem.seq_len)
        return real(problem, *args, **kwargs)

    rg.backends.get("numpy").forward_layer = recording
    try:
        y, (h, c), tape = m.forward(x, lengths=lengths, backend="numpy")
    finally:
        del rg.backends.get("numpy").forward_layer
    # 2 layers x 2 directions, each over steps [0, longest) (in one call, or in segments)
    assert sum(seen) == 4 * max(lengths) and y.shape == (B, T, 6)
    dx, _, grads = m.backward(tape, dy)
    if max(lengths) == 0:
        assert not seen and not y.any() and not dx.any()
        assert all(not g.any() for g in grads.values())
        return
    xt = torch.from_numpy(x).requires_grad_()
    packed = pack_padded_sequence(xt, torch.tensor(lengths), batch_first=True,
                                  enforce_sorted=False)
    out, (h_ref, c_ref) = ref(packed)
    y_ref, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
    (y_ref * torch.from_numpy(dy)).sum().backward()
    np.testing.assert_allclose(y, y_ref.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(h, h_ref.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(c, c_ref.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    for name, p in ref.named_parameters():
        np.testing.assert_allclose(grads[name], p.grad.numpy(), rtol=1e-9, atol=1e-12)
