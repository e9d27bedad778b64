"""rnn_gpu.torch: the torch.nn.Module drop-ins against torch.nn itself (DESIGN §3, §6).

Oracles: torch.nn.LSTM/GRU/RNN on the CPU in float64 with the same weights (both ways: torch's
state_dict into ours and ours into torch's), ``torch.autograd.gradcheck`` in float64, and for
TwoStageRNN a plain torch loop written from DESIGN §2. Fresh random inputs every run; the seed
is printed so that a failure can be replayed.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
import warnings

import numpy as np
import pytest

from rnn_gpu.registry import BackendError

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'rnn-gpu[test]')")
nn = torch.nn
functional_call = torch.func.functional_call
PackedSequence = torch.nn.utils.rnn.PackedSequence
pack_padded_sequence = torch.nn.utils.rnn.pack_padded_sequence

import rnn_gpu.torch as rt  # noqa: E402  (needs torch)

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)

# name -> (torch.nn class, our class, constructor extras)
CELLS = {
    "lstm": (nn.LSTM, rt.LSTM, {}),
    "lstm_proj": (nn.LSTM, rt.LSTM, {"proj_size": 2}),
    "gru": (nn.GRU, rt.GRU, {}),
    "rnn_tanh": (nn.RNN, rt.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNN, rt.RNN, {"nonlinearity": "relu"}),
}


@pytest.fixture(autouse=True)
def _seed(request):
    seed = int(np.random.SeedSequence().entropy % 2**63)
    print(f"{request.node.nodeid}: torch seed {seed}")
    torch.manual_seed(seed)


def _pair(cell: str, source: str = "torch", dtype=F64, **config):
    """(torch.nn module, our module) of the same configuration holding the same weights."""
    ref_cls, our_cls, extra = CELLS[cell]
    kwargs = {**extra, **config}
    ref, ours = ref_cls(dtype=dtype, **kwargs), our_cls(dtype=dtype, **kwargs)
    if source == "torch":
        ours.load_state_dict(ref.state_dict())
    else:
        ref.load_state_dict(ours.state_dict())
    return ref, ours


def _state_like(m, batch: int | None, dtype=F64):
    """A random hx for module ``m`` (None batch: unbatched)."""
    n = m.num_layers * (2 if m.bidirectional else 1)
    lead = (n,) if batch is None else (n, batch)
    h = torch.randn(*lead, m.proj_size or m.hidden_size, dtype=dtype)
    if isinstance(m, (nn.LSTM, rt.LSTM)):
        return h, torch.randn(*lead, m.hidden_size, dtype=dtype)
    return h


def _flat(out) -> list[torch.Tensor]:
    """(y, h) / (y, (h, c)) / PackedSequence outputs -> flat list of tensors."""
    y, state = out
    y = y.data if isinstance(y, PackedSequence) else y
    return [y, *(state if isinstance(state, tuple) else (state,))]


def _leaves(hx) -> list[torch.Tensor]:
    if hx is None:
        return []
    return list(hx) if isinstance(hx, tuple) else [hx]


def _outputs_and_grads(m, inp, hx, x_leaf, weights):
    """Outputs of ``m(inp, hx)`` and the gradients of a fixed random functional of them with
    respect to x, every part of hx and every parameter."""
    outs = _flat(m(inp, hx))
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    wrt = [x_leaf, *_leaves(hx), *m.parameters()]
    return outs, torch.autograd.grad(loss, wrt)


def _compare(ref, ours, inp_fn, hx, **tol):
    """Run both modules on fresh copies of the inputs; outputs and all gradients must agree."""
    tol = tol or TOL
    x_ref, inp_ref = inp_fn()
    x_our, inp_our = inp_fn(x_ref)
    hx_ref = None if hx is None else _clone_state(hx)
    hx_our = None if hx is None else _clone_state(hx)
    outs_ref = _flat(ref(inp_ref, hx_ref))
    weights = [torch.randn_like(o) for o in outs_ref]
    outs_ref, grads_ref = _outputs_and_grads(ref, inp_ref, hx_ref, x_ref, weights)
    outs_our, grads_our = _outputs_and_grads(ours, inp_our, hx_our, x_our, weights)
    for a, b in zip(outs_our, outs_ref):
        torch.testing.assert_close(a, b, **tol)
    names = ["x", *(f"hx[{i}]" for i in range(len(_leaves(hx)))),
             *(n for n, _ in ref.named_parameters())]
    for name, a, b in zip(names, grads_our, grads_ref):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"grad {name}: {m}")
    return outs_our, outs_ref


def _clone_state(hx):
    if isinstance(hx, tuple):
        return tuple(h.clone().requires_grad_() for h in hx)
    return hx.clone().requires_grad_()


# ----------------------------------------------------------------------------- parameters

PARAM_CONFIGS = [
    {},
    {"bidirectional": True},
    {"num_layers": 2},
    {"bias": False},
    {"num_layers": 2, "bidirectional": True, "bias": False},
    {"num_layers": 3, "bidirectional": True},
]


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("config", PARAM_CONFIGS, ids=str)
def test_named_parameters_match_torch_nn(cell, config):
    ref_cls, our_cls, extra = CELLS[cell]
    kwargs = {**extra, **config}
    ref, ours = ref_cls(5, 4, **kwargs), our_cls(5, 4, **kwargs)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == \
        [(n, p.shape) for n, p in ref.named_parameters()]
    assert all(isinstance(p, nn.Parameter) for p in ours.parameters())
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert ours._flat_weights_names == ref._flat_weights_names
    assert [[id(p) for p in ws] for ws in ours.all_weights] == \
        [[id(getattr(ours, n)) for n in ns] for ns in ref._all_weights]
    expected = repr(ref)                        # ours also names a non-default nonlinearity
    if cell == "rnn_relu":
        expected = expected[:-1] + ", nonlinearity='relu')"
    assert repr(ours) == expected


@pytest.mark.parametrize("cell", list(CELLS))
def test_initialisation_is_torch_nn_s(cell):
    """Same torch seed, same weights: the init draws U(-1/sqrt(H), 1/sqrt(H)) in torch.nn's
    parameter order from torch's generator."""
    ref_cls, our_cls, extra = CELLS[cell]
    torch.manual_seed(123)
    ref = ref_cls(3, 7, num_layers=2, bidirectional=True, **extra)
    torch.manual_seed(123)
    ours = our_cls(3, 7, num_layers=2, bidirectional=True, **extra)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), name
    bound = 1 / 7 ** 0.5
    assert all(p.abs().max() <= bound for p in ours.parameters())
    ours.reset_parameters()
    assert not torch.equal(ours.weight_hh_l0, ref.weight_hh_l0)


def test_twostage_parameter_names():
    m = rt.TwoStageRNN(3, 4, num_layers=2, bidirectional=True)
    expected = []
    for layer in range(2):
        in_size = 3 if layer == 0 else 8
        for suffix in ("", "_reverse"):
            expected += [(f"weight_ia_l{layer}{suffix}", (4, in_size)),
                         (f"weight_aa_l{layer}{suffix}", (4, 4)),
                         (f"bias_a_l{layer}{suffix}", (4,)),
                         (f"weight_ha_l{layer}{suffix}", (4, 4)),
                         (f"weight_hh_l{layer}{suffix}", (4, 4)),
                         (f"bias_h_l{layer}{suffix}", (4,))]
    assert [(n, tuple(p.shape)) for n, p in m.named_parameters()] == expected
    no_bias = rt.TwoStageRNN(3, 4, bias=False)
    assert list(dict(no_bias.named_parameters())) == ["weight_ia_l0", "weight_aa_l0",
                                                      "weight_ha_l0", "weight_hh_l0"]
    assert repr(rt.TwoStageRNN(3, 4, f="sigmoid")) == "TwoStageRNN(3, 4, f='sigmoid')"


def test_constructor_matches_torch_nn():
    m = rt.RNN(3, 4, 2, "relu", False, True, 0.0, True)         # torch.nn.RNN's positions
    assert (m.num_layers, m.nonlinearity, m.bias, m.batch_first, m.bidirectional) == \
        (2, "relu", False, True, True)
    m = rt.LSTM(3, 4, 1, True, False, 0.0, False, 2, "cpu", F64)
    assert m.proj_size == 2 and m.weight_hr_l0.dtype == F64
    assert rt.GRU(3, 4, dtype=F64).weight_ih_l0.dtype == F64
    assert rt.GRU(3, 4).weight_ih_l0.dtype == torch.get_default_dtype()
    with pytest.raises(ValueError, match="proj_size"):
        rt.LSTM(3, 4, proj_size=4)
    with pytest.raises(ValueError, match="nonlinearity"):
        rt.RNN(3, 4, nonlinearity="gelu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rt.GRU(3, 4, dropout=0.5)
    assert [str(w.message)[:30] for w in caught] == ["dropout option adds dropout af"]
    m.flatten_parameters()                                       # a no-op, for compatibility
    # what torch.nn takes besides bools and floats: bidirectional 0 or 1, a NumPy dropout
    m = rt.GRU(3, 4, 2, bidirectional=1, dropout=np.float32(0.25))
    ref = nn.GRU(3, 4, 2, bidirectional=1, dropout=np.float32(0.25))
    assert (m.bidirectional, m.dropout) == (True, 0.25)
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in ref.named_parameters()]


# ----------------------------------------------------------------------------- vs torch.nn

@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("layers,bidir", [(1, False), (2, True)], ids=["1x1", "2x2"])
@pytest.mark.parametrize("layout", ["time_major", "batch_first", "unbatched"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["hx0", "hx"])
def test_outputs_and_gradients_match_torch_nn(cell, layers, bidir, layout, with_hx):
    T, B, I = 5, 3, 4
    source = "torch" if with_hx else "ours"
    ref, ours = _pair(cell, source, input_size=I, hidden_size=3, num_layers=layers,
                      bidirectional=bidir, batch_first=layout == "batch_first")
    shape = {"time_major": (T, B, I), "batch_first": (B, T, I), "unbatched": (T, I)}[layout]

    def inp(like=None):
        x = (torch.randn(shape, dtype=F64) if like is None else like.detach().clone())
        x.requires_grad_()
        return x, x

    hx = _state_like(ours, None if layout == "unbatched" else B) if with_hx else None
    outs, _ = _compare(ref, ours, inp, hx)
    n = layers * (2 if bidir else 1)
    h_out = ours.proj_size or ours.hidden_size
    assert outs[0].shape == shape[:-1] + ((2 if bidir else 1) * h_out,)
    assert outs[1].shape == ((n, h_out) if layout == "unbatched" else (n, B, h_out))


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
def test_packed_sequence_matches_torch_nn(cell, enforce_sorted, batch_first):
    T, I = 6, 3
    lengths = torch.tensor([6, 4, 4, 1]) if enforce_sorted else torch.tensor([2, 6, 1, 4, 6])
    B = len(lengths)
    ref, ours = _pair(cell, "torch" if enforce_sorted else "ours", input_size=I, hidden_size=3,
                      num_layers=2, bidirectional=True, batch_first=batch_first)
    shape = (B, T, I) if batch_first else (T, B, I)

    def inp(like=None):
        x = torch.randn(shape, dtype=F64) if like is None else like.detach().clone()
        x.requires_grad_()
        return x, pack_padded_sequence(x, lengths, batch_first=batch_first,
                                       enforce_sorted=enforce_sorted)

    hx = _state_like(ours, B)                 # in the caller's (original) batch order
    _compare(ref, ours, inp, hx)
    _compare(ref, ours, inp, None)
    x, packed = inp()
    y_ref, _ = ref(packed)
    y_our, _ = ours(packed)
    assert isinstance(y_our, PackedSequence)
    for field in ("batch_sizes", "sorted_indices", "unsorted_indices"):
        a, b = getattr(y_our, field), getattr(y_ref, field)
        assert (a is None and b is None) or torch.equal(a, b), field


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gradient_through_final_state_only(cell):
    """Only h_n in the loss: autograd hands backward no gradient for y (nor for c_n)."""
    ref, ours = _pair(cell, input_size=2, hidden_size=3, num_layers=2)
    x = torch.randn(4, 2, 2, dtype=F64)
    grads = []
    for m in (ref, ours):
        xx = x.clone().requires_grad_()
        _, state = m(xx)
        h = state[0] if isinstance(state, tuple) else state
        grads.append(torch.autograd.grad(h.pow(2).sum(), [xx, *m.parameters()]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_float32_matches_torch_nn():
    for cell in CELLS:
        ref, ours = _pair(cell, dtype=torch.float32, input_size=6, hidden_size=8, num_layers=2,
                          bidirectional=True)
        x = torch.randn(7, 5, 6)
        y_ref, _ = ref(x)
        y_our, _ = ours(x)
        assert y_our.dtype == torch.float32
        assert (y_our - y_ref).norm() <= 1e-5 * y_ref.norm()
        g_ref = torch.autograd.grad(y_ref.sum(), list(ref.parameters()))
        g_our = torch.autograd.grad(y_our.sum(), list(ours.parameters()))
        for a, b in zip(g_our, g_ref):
            assert a.dtype == torch.float32
            assert (a - b).norm() <= 1e-5 * b.norm() + 1e-7


# ----------------------------------------------------------------------------- gradcheck

GRADCHECK_CELLS = {
    **{k: (v[1], v[2]) for k, v in CELLS.items() if k != "rnn_relu"},
    "twostage": (rt.TwoStageRNN, {}),
    "twostage_sigmoid_tanh": (rt.TwoStageRNN, {"f": "sigmoid", "g": "tanh"}),
}


def _gradcheck(m, make_input, hx, fast_mode=False):
    """gradcheck with respect to the input, every part of hx and every parameter; the
    parameters go in through torch.func.functional_call (the Module reads them per call)."""
    names = [n for n, _ in m.named_parameters()]
    n_state = len(_leaves(hx))

    def f(x, *rest):
        state = rest[:n_state]
        hx_ = None if not state else (tuple(state) if n_state == 2 else state[0])
        out = functional_call(m, dict(zip(names, rest[n_state:])), (make_input(x), hx_))
        return tuple(_flat(out))

    x = torch.randn(3, 2, m.input_size, dtype=F64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    inputs = (x, *(h.requires_grad_() for h in _leaves(hx)), *params)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-6,
                                    fast_mode=fast_mode)


@pytest.mark.parametrize("cell", list(GRADCHECK_CELLS))
@pytest.mark.parametrize("with_hx", [False, True], ids=["hx0", "hx"])
def test_gradcheck(cell, with_hx):
    cls, extra = GRADCHECK_CELLS[cell]
    m = cls(2, 3, num_layers=2, bidirectional=True, dtype=F64, **extra)
    # The full Jacobian with hx; without, gradcheck's fast mode (random projections) keeps
    # the file's runtime modest.
    _gradcheck(m, lambda x: x, _state_like(m, 2) if with_hx else None, fast_mode=not with_hx)


@pytest.mark.parametrize("cell", list(GRADCHECK_CELLS))
def test_gradcheck_packed(cell):
    cls, extra = GRADCHECK_CELLS[cell]
    m = cls(2, 3, bidirectional=True, dtype=F64, **extra)
    lengths = torch.tensor([1, 3])
    _gradcheck(m, lambda x: pack_padded_sequence(x, lengths, enforce_sorted=False),
               _state_like(m, 2))


# ----------------------------------------------------------------------------- TwoStageRNN

_ACT = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu}


def _twostage_reference(m, x, h0=None):
    """DESIGN §2 step by step: a = f(W_ia x + W_aa h + b_a); h = g(W_ha a + W_hh h + b_h).
    x is (T, B, I); returns (y, h_n)."""
    f, g = _ACT[m.f], _ACT[m.g]
    D = 2 if m.bidirectional else 1
    T, B, _ = x.shape
    inp, finals = x, []
    for layer in range(m.num_layers):
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            p = {k: getattr(m, k + sfx, None) for k in ("weight_ia", "weight_aa", "bias_a",
                                                       "weight_ha", "weight_hh", "bias_h")}
            h = torch.zeros(B, m.hidden_size, dtype=x.dtype) if h0 is None else h0[layer * D + d]
            ys = [None] * T
            for t in (range(T - 1, -1, -1) if d else range(T)):
                a = inp[t] @ p["weight_ia"].T + h @ p["weight_aa"].T
                a = f(a + p["bias_a"] if m.bias else a)
                pre = a @ p["weight_ha"].T + h @ p["weight_hh"].T
                h = g(pre + p["bias_h"] if m.bias else pre)
                ys[t] = h
            outs.append(torch.stack(ys))
            finals.append(h)
        inp = torch.cat(outs, dim=2)
    return inp, torch.stack(finals)


@pytest.mark.parametrize("f,g", [("tanh", "tanh"), ("sigmoid", "relu")])
@pytest.mark.parametrize("bias", [True, False])
def test_twostage_matches_reference(f, g, bias):
    m = rt.TwoStageRNN(3, 4, num_layers=2, bidirectional=True, bias=bias, f=f, g=g, dtype=F64)
    x = torch.randn(5, 3, 3, dtype=F64)
    h0 = torch.randn(4, 3, 4, dtype=F64)
    y, h = m(x, h0)
    y_ref, h_ref = _twostage_reference(m, x, h0)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(h, h_ref, **TOL)
    # packed: every sequence as if run alone, truncated to its length
    lengths = torch.tensor([5, 2, 4])
    yp, hp = m(pack_padded_sequence(x, lengths, enforce_sorted=False), h0)
    ys = torch.nn.utils.rnn.pad_packed_sequence(yp)[0]
    for b, n in enumerate(lengths.tolist()):
        y_b, h_b = _twostage_reference(m, x[:n, b:b + 1], h0[:, b:b + 1])
        torch.testing.assert_close(ys[:n, b:b + 1], y_b, **TOL)
        torch.testing.assert_close(hp[:, b:b + 1], h_b, **TOL)


# ----------------------------------------------------------------------------- dropout, modes

def test_dropout_follows_training_mode():
    ref, ours = _pair("lstm", input_size=4, hidden_size=5, num_layers=3, dropout=0.5)
    x = torch.randn(6, 3, 4, dtype=F64)
    ref.eval()
    ours.eval()
    torch.testing.assert_close(ours(x)[0], ref(x)[0], **TOL)
    ours.train()
    y1, y2 = ours(x)[0], ours(x)[0]
    assert not torch.allclose(y1, y2)
    assert not torch.allclose(y1, ref(x)[0])
    with torch.no_grad():                      # no gradient wanted, but still training
        assert not torch.allclose(ours(x)[0], ref(x)[0])
    torch.manual_seed(7)                       # masks come from torch's generator
    y3 = ours(x)[0]
    torch.manual_seed(7)
    torch.testing.assert_close(ours(x)[0], y3, rtol=0, atol=0)
    ours.eval()
    torch.testing.assert_close(ours(x)[0], ref(x)[0], **TOL)


def test_dropout_gradient_on_a_fixed_mask():
    m = rt.GRU(3, 2, num_layers=2, dropout=0.4, dtype=F64)

    def f(x):
        torch.manual_seed(11)                 # the same masks at every evaluation
        return m(x)[0]

    x = torch.randn(3, 2, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- backends

def test_backend_keyword():
    ref, ours = _pair("gru", input_size=3, hidden_size=4)
    x = torch.randn(5, 2, 3, dtype=F64)
    numpy_m = rt.GRU(3, 4, dtype=F64, backend="numpy")
    numpy_m.load_state_dict(ref.state_dict())
    assert "backend='numpy'" in repr(numpy_m)
    torch.testing.assert_close(numpy_m(x)[0], ref(x)[0], **TOL)
    torch.testing.assert_close(ours(x, backend="numpy")[0], ref(x)[0], **TOL)
    with pytest.raises(ValueError, match=r"no_such_backend.*numpy"):
        rt.LSTM(3, 4, backend="no_such_backend")
    with pytest.raises(ValueError, match=r"no_such_backend.*not registered"):
        ours(x, backend="no_such_backend")
    with pytest.raises(TypeError, match="backend"):
        rt.LSTM(3, 4, backend=3)


def test_backend_that_cannot_serve_says_why():
    m = rt.RNN(3, 4, dtype=torch.bfloat16, backend="numpy")
    with pytest.raises(RuntimeError, match="numpy.*bfloat16"):
        m(torch.randn(2, 1, 3, dtype=torch.bfloat16))


# ----------------------------------------------------------------------------- module plumbing

def test_follows_dtype_and_in_place_parameter_changes():
    ref, ours = _pair("lstm", dtype=torch.float32, input_size=3, hidden_size=4)
    ours.double()
    ref.double()
    x = torch.randn(4, 2, 3, dtype=F64)
    torch.testing.assert_close(ours(x)[0], ref(x)[0], **TOL)
    with torch.no_grad():                      # the core computes on the Parameters themselves
        for a, b in zip(ours.parameters(), ref.parameters()):
            a.mul_(0.5)
            b.mul_(0.5)
    torch.testing.assert_close(ours(x)[0], ref(x)[0], **TOL)
    ours.to(torch.float32)
    assert ours(x.float())[0].dtype == torch.float32
    with pytest.raises(TypeError, match="dtype"):
        ours(x)


@pytest.mark.parametrize("name, shape", [("weight_hh_l0", (6, 18)), ("weight_hh_l0", (18, 6, 1)),
                                         ("bias_ih_l0", (1,)), ("bias_hh_l0", (18, 1))])
def test_a_replaced_parameter_of_another_shape_is_named(name, shape):
    """Before: NumPy's matmul or broadcasting error ~20 frames deep, or (18, 6, 1) silently."""
    m = rt.GRU(4, 6)
    setattr(m, name, nn.Parameter(torch.randn(*shape)))
    expected = tuple(getattr(nn.GRU(4, 6), name).shape)
    with pytest.raises(ValueError, match=rf"{name}: expected shape {re.escape(str(expected))}, "
                                         rf"got {re.escape(str(shape))}"):
        m(torch.randn(5, 3, 4))


def test_retain_graph_backward_twice():
    """... and with retain_graph=True the same gradients again (the tape is recomputed, with
    the same dropout masks)."""
    ours = rt.LSTM(3, 4, num_layers=2, dropout=0.5, dtype=F64)
    x = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    y, (h, c) = ours(x)
    loss = (y * torch.randn_like(y)).sum() + c.sum()
    first = torch.autograd.grad(loss, [x, *ours.parameters()], retain_graph=True)
    second = torch.autograd.grad(loss, [x, *ours.parameters()])
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


SECOND_ORDER = r"rnn_gpu.torch.{}: second-order gradients .* are not supported"


def _maml_meta_gradient(m, x, x2):
    """One MAML step: the gradient of the adapted model's loss through the adaptation."""
    params = dict(m.named_parameters())
    g = torch.autograd.grad(m(x)[0].pow(2).sum(), list(params.values()), create_graph=True)
    fast = {k: p - 0.1 * gi for (k, p), gi in zip(params.items(), g)}
    loss = functional_call(m, fast, (x2,))[0].pow(2).sum()
    return torch.autograd.grad(loss, list(params.values()))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_second_order_gradients_raise_instead_of_dropping_terms(cell):
    """torch's once_differentiable raised only for .backward(): autograd.grad(inputs=...)
    pruned its error node, and the MAML meta-gradient came out first-order, a Hessian zero."""
    ref, ours = _pair(cell, input_size=3, hidden_size=4)
    x, x2 = torch.randn(5, 2, 3, dtype=F64), torch.randn(5, 2, 3, dtype=F64)
    _maml_meta_gradient(ref, x, x2)                     # torch.nn can: the oracle of "can"
    message = SECOND_ORDER.format(CELLS[cell][1].__name__)
    with pytest.raises(RuntimeError, match=message):
        _maml_meta_gradient(ours, x, x2)
    xx = x.clone().requires_grad_()
    g, = torch.autograd.grad(ours(xx)[0].pow(2).sum(), xx, create_graph=True)
    with pytest.raises(RuntimeError, match=message):
        torch.autograd.grad(g.sum(), xx)
    with pytest.raises(RuntimeError, match=message):
        torch.autograd.functional.hessian(lambda v: ours(v)[0].pow(2).sum(), x)
    with pytest.raises(RuntimeError, match=message):
        torch.autograd.gradgradcheck(lambda v: ours(v)[0], (xx,))


def test_create_graph_keeps_first_order_gradients_and_second_order_elsewhere():
    """create_graph=True through the layer gives the first-order gradients as without it,
    and second-order terms that do not pass through the layer's backward still work (here
    a gradient penalty on the head's weight), matching torch.nn."""
    ref, ours = _pair("gru", input_size=3, hidden_size=4)
    x = torch.randn(5, 2, 3, dtype=F64)
    results = []
    for rnn in (ref, ours):
        head = nn.Linear(4, 1, dtype=F64)
        with torch.no_grad():
            head.weight.copy_(torch.arange(1.0, 5.0, dtype=F64)[None] / 4)
            head.bias.fill_(0.5)
        loss = head(rnn(x)[0]).pow(2).sum()
        params = [head.weight, *rnn.parameters()]
        grads = torch.autograd.grad(loss, params, create_graph=True)
        penalty, = torch.autograd.grad(grads[0].pow(2).sum(), head.weight)
        results.append((grads, penalty))
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(b, a, **TOL)
    torch.testing.assert_close(results[1][1], results[0][1], **TOL)


def test_no_grad_path_and_errors():
    ours = rt.GRU(3, 4, dtype=F64)
    x = torch.randn(4, 2, 3, dtype=F64)
    with torch.no_grad():
        y, h = ours(x)
    assert y.grad_fn is None and not y.requires_grad
    y, h = ours(x)
    assert y.grad_fn is not None and h.grad_fn is not None
    # a second backward through one call: torch's error without retain_graph ...
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()
    # an input changed in place between forward and backward is caught, as in torch.nn
    xx = x.clone().requires_grad_()
    x2 = xx * 1.0
    y, _ = ours(x2)
    with torch.no_grad():
        x2.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    with pytest.raises(TypeError, match="tuple"):
        rt.LSTM(3, 4, dtype=F64)(x, torch.zeros(1, 2, 4, dtype=F64))


@pytest.mark.parametrize("cls, options, change", [
    ("RNN", {}, lambda y: y.mul_(2.0)),
    ("GRU", {"batch_first": True}, lambda y: torch.relu_(y)),
    ("LSTM", {"bidirectional": True}, lambda y: y[..., 4:].mul_(-1.0)),   # a view of y
    ("TwoStageRNN", {"num_layers": 2}, lambda y: y[-1].zero_()),
])
def test_output_changed_in_place_before_backward_is_refused(cls, options, change):
    """The tape reads h_{t-1} from the layer's output instead of a copy. autograd lets a
    custom Function's output be changed in place (it routes the gradient through the change,
    not knowing that backward reads the output), so the gradients came out wrong, silently;
    the layer's own check (the output's version counter) now refuses, naming y."""
    ours = getattr(rt, cls)(3, 4, dtype=F64, **options)
    x = torch.randn((2, 5, 3) if options.get("batch_first") else (5, 2, 3), dtype=F64)
    y, _ = ours(x)
    change(y)
    with pytest.raises(RuntimeError, match=r"tape: y \(the output of forward\(\); in "
                                           r"rnn_gpu.torch, the layer's output tensor\) was "
                                           r"changed in place"):
        y.sum().backward()
    # changed out of place, or after backward, as torch.nn allows
    y, _ = ours(x)
    (y * 2.0).sum().backward()
    y.mul_(2.0)


def test_output_guard_makes_no_reference_cycle():
    """The tape guards the output tensor, and the output's autograd node holds the tape: a
    strong reference made a cycle, and a forward whose backward never ran (an evaluation
    with grad on) kept its tape until the garbage collector came by."""
    import gc
    import weakref

    m = rt.GRU(3, 4)
    y, h = m(torch.randn(5, 2, 3))
    tape = weakref.ref(y.grad_fn.tape)
    enabled = gc.isenabled()
    gc.disable()
    try:
        del y, h
        assert tape() is None
    finally:
        if enabled:
            gc.enable()


def test_packed_output_changed_in_place_is_fine():
    """A PackedSequence's data is gathered from y (a copy): changing it in place changes
    nothing the backward reads, and the gradient follows the change as torch.nn's does."""
    ours = rt.GRU(3, 4, dtype=F64)
    ref = torch.nn.GRU(3, 4, dtype=F64)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 3, dtype=F64)
    grads = []
    for m in (ours, ref):
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3]))
        out, _ = m(packed)
        out.data.mul_(3.0)
        out.data.sum().backward()
        grads.append(m.weight_hh_l0.grad)
    torch.testing.assert_close(grads[0], grads[1], **TOL)


def test_pickle_deepcopy_and_state_dict_round_trip():
    ours = rt.LSTM(3, 4, num_layers=2, proj_size=2, dtype=F64)
    x = torch.randn(5, 2, 3, dtype=F64)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(ours, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
    clone = copy.deepcopy(ours)
    fresh = rt.LSTM(3, 4, num_layers=2, proj_size=2, dtype=F64)
    fresh.load_state_dict(ours.state_dict())
    y = ours(x)[0]
    for other in (loaded, clone, fresh):
        torch.testing.assert_close(other(x)[0], y, rtol=0, atol=0)


def test_autocast_without_a_half_precision_backend_runs_in_float32():
    """Mixed-precision code (torch.autocast) used to fail on the bfloat16 activations a Linear
    hands the LSTM under autocast. Where no backend computes in the autocast dtype (the NumPy
    backend here) the drop-in runs in its parameters' dtype, as autocast leaves an op without
    a low-precision kernel, and the gradients flow back through the casts."""
    torch.manual_seed(0)
    lin, m = nn.Linear(5, 3), rt.LSTM(3, 4)
    x = torch.randn(6, 2, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x)
        assert h.dtype == torch.bfloat16
        y, (hn, cn) = m(h)
        packed = pack_padded_sequence(h, torch.tensor([6, 3]))
        yp, _ = m(packed)
    assert y.dtype == hn.dtype == yp.data.dtype == torch.float32
    y_plain, _ = m(h.detach().float())
    torch.testing.assert_close(y, y_plain, rtol=0, atol=0)
    y.sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    assert m.weight_hh_l0.grad.dtype == torch.float32
    m64 = rt.GRU(3, 4).double()                    # float64 weights: autocast leaves them alone
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y64, _ = m64(torch.randn(2, 1, 3, dtype=torch.float64))
    assert y64.dtype == torch.float64


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_half_precision_module_on_the_cpu_runs_as_torch_nn_does(monkeypatch, cell, low):
    """m.half() on the CPU: torch.nn runs it, and no CPU backend computes in half precision,
    so float32 stands in and the results come back in the module's dtype. Oracle: torch.nn in
    float32 on the same (rounded) weights and input, within half precision's rounding of the
    outputs; the gradients reach the half parameters in their dtype."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ref, ours = _pair(cell, dtype=torch.float32, input_size=3, hidden_size=4, num_layers=2,
                      bidirectional=True)
    ours.to(low)
    ref.load_state_dict({k: v.to(low).float() for k, v in ours.state_dict().items()})
    x = torch.randn(5, 2, 3).to(low)
    packed = pack_padded_sequence(x, torch.tensor([5, 3]))
    y, state = ours(x)
    y_ref, state_ref = ref(x.float())
    assert y.dtype == low and ours(packed)[0].data.dtype == low
    tol = dict(rtol=0, atol=1e-2 if low == torch.bfloat16 else 2e-3)
    torch.testing.assert_close(y.float(), y_ref, **tol)
    h = state[0] if cell == "lstm" else state
    assert h.dtype == low
    y.float().sum().backward()
    y_ref.sum().backward()
    grad = ours.weight_hh_l0.grad
    assert grad.dtype == low
    torch.testing.assert_close(grad.float(), ref.weight_hh_l0.grad,
                               rtol=2e-2, atol=5e-2 if low == torch.bfloat16 else 1e-2)
    with pytest.raises(BackendError, match="cannot serve"):
        ours(x, backend="numpy")             # named explicitly: its own error stands


@pytest.mark.parametrize("cell, kwargs", [
    ("LSTM", dict(num_layers=2, bidirectional=True, proj_size=2)), ("GRU", dict(batch_first=True)),
    ("RNN", dict(nonlinearity="relu")), ("TwoStageRNN", dict(num_layers=2))])
def test_meta_device_gives_torch_nn_shapes_without_computing(cell, kwargs):
    """On the meta device (shape inference, FLOP counting, deferred init) the drop-ins return
    empty results of torch.nn's shapes; TwoStageRNN's are an RNN's."""
    m = getattr(rt, cell)(3, 5, device="meta", **kwargs)
    ref_cls = nn.RNN if cell == "TwoStageRNN" else getattr(nn, cell)
    ref = ref_cls(3, 5, device="meta", **kwargs)
    for x in (torch.empty(7, 2, 3, device="meta"), torch.empty(7, 3, device="meta")):
        got = torch.utils._pytree.tree_leaves(m(x))
        want = torch.utils._pytree.tree_leaves(ref(x))
        assert [t.shape for t in got] == [t.shape for t in want]
        assert all(t.device.type == "meta" for t in got)


@pytest.mark.parametrize("bad, error", [
    (lambda m, x: m(torch.empty(7, 2, 4, device="meta")), r"x: expected last dimension "
                                                           r"input_size=3"),
    (lambda m, x: m(torch.empty(7, 2, 3, 1, device="meta")), "x: expected a 3-D array"),
    (lambda m, x: m(x.double()), "x: expected dtype float32"),
    (lambda m, x: m(x, (torch.empty(3, 9, 5, device="meta"),) * 2),
     r"hx\[0\] \(h\): expected shape \(2, 2, 5\), got \(3, 9, 5\)"),
    (lambda m, x: rt.LSTM(3, 5)(x), "x: the input is on meta:0 but LSTM's weights are on cpu"),
])
def test_meta_device_checks_the_call_as_a_real_one(bad, error):
    """A meta run (shape inference) answered shapes for a wrong input size, a 4-D input, a
    float64 input, a wrong hx and a meta input to a CPU module, each of which torch.nn refuses:
    the bug a meta run is there to find passed."""
    m = rt.LSTM(3, 5, num_layers=2, device="meta")
    with pytest.raises((ValueError, TypeError), match=error):
        bad(m, torch.empty(7, 2, 3, device="meta"))


@pytest.mark.parametrize("attr, value", [("bidirectional", True), ("num_layers", 2),
                                         ("hidden_size", 8), ("mode", "RNN_RELU"),
                                         ("nonlinearity", "relu"), ("proj_size", 1)])
def test_configuration_set_after_construction_is_refused(attr, value):
    """``m.mode = "RNN_RELU"`` switches torch.nn.RNN to relu, and ``m.bidirectional = True``
    makes its next call fail; ours kept running the configuration it was built with,
    silently. batch_first and dropout, which are read at every call, stay settable."""
    m = rt.RNN(3, 4)
    before = getattr(m, attr, None)
    with pytest.raises(AttributeError, match=rf"{attr} of RNN is fixed when it is built"):
        setattr(m, attr, value)
    assert getattr(m, attr, None) == before
    x = torch.randn(5, 2, 3)
    m.batch_first = True
    assert m(x)[0].shape == (5, 2, 4)                      # (B, T, H) now
    assert (m.mode, m.nonlinearity, rt.LSTM(3, 4).mode, rt.GRU(3, 4).mode) == (
        "RNN_TANH", "tanh", "LSTM", "GRU")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's
def test_fake_tensors_and_forward_mode_ad_say_they_cannot():
    """FakeTensorMode failed with ".numpy() is not supported for tensor subclasses" deep in
    the core; forward-mode AD with torch's generic note on custom Functions' jvp."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    m = rt.GRU(4, 6)
    with pytest.raises(NotImplementedError, match=r"FakeTensorMode: rnn_gpu.torch.GRU .*meta "
                                                  r"device"), FakeTensorMode():
        m(torch.randn(3, 2, 4))
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), pytest.raises(NotImplementedError, match=r"forward-mode AD .*"
                                          r"rnn_gpu.torch.GRU's fused op has no forward-mode "
                                          r"rule; .* torch.nn.GRU has one"):
        m(fwAD.make_dual(torch.randn(3, 2, 4), torch.randn(3, 2, 4)))


def test_fx_symbolic_trace_says_to_keep_the_layer_a_leaf():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rt.GRU(4, 6)

        def forward(self, x):
            return self.rnn(x)[0]

    with pytest.raises(TypeError, match=r"torch.fx.symbolic_trace: rnn_gpu.torch.GRU .* keep "
                                        r"it a leaf module"):
        torch.fx.symbolic_trace(Model())

    class Leaves(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, rt.GRU) or super().is_leaf_module(m, qualname)

    graph = Leaves().trace(Model())
    assert any(node.op == "call_module" and node.target == "rnn" for node in graph.nodes)


def test_inference_tensor_input_to_a_trained_layer_fails_as_in_torch_nn():
    """Our fingerprint read the inference tensor's version counter and failed with "Inference
    tensors do not track version counter"; torch.nn's own message says what to do."""
    with torch.inference_mode():
        x = torch.randn(3, 2, 4)
    for m in (nn.GRU(4, 6), rt.GRU(4, 6)):
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
            m(x)


@pytest.mark.parametrize("hooks", ["save_on_cpu", "checkpoint"])
def test_saved_tensor_hooks_reach_the_layers_activations(hooks):
    """The tape sat outside save_for_backward, so checkpoint(use_reentrant=False),
    save_on_cpu and other saved-tensor hooks never saw it: a GRU(64, 256, 2) kept its 83 MB
    of activations under checkpoint. Under such hooks the node keeps only its inputs (which
    the hooks pack) and backward recomputes the tape; the gradients are unchanged."""
    from torch.utils.checkpoint import checkpoint

    m = rt.GRU(4, 6, num_layers=2, dropout=0.3, dtype=F64)
    m.train()
    x = torch.randn(5, 3, 4, dtype=F64, requires_grad=True)

    def loss(inp):
        torch.manual_seed(7)                               # the same dropout masks each time
        return m(inp)[0].square().sum()

    want = torch.autograd.grad(loss(x), [x, *m.parameters()])
    torch.manual_seed(7)
    assert m(x)[0].grad_fn.tape is not None                # kept without hooks
    if hooks == "save_on_cpu":
        with torch.autograd.graph.save_on_cpu():
            torch.manual_seed(7)
            y = m(x)[0]
        assert y.grad_fn.tape is None
        got = torch.autograd.grad(y.square().sum(), [x, *m.parameters()])
    else:
        got = torch.autograd.grad(checkpoint(loss, x, use_reentrant=False),
                                  [x, *m.parameters()])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


def test_gru_and_rnn_refuse_proj_size_as_torch_nn_does():
    for cls in (rt.GRU, rt.RNN):
        with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
            cls(3, 4, proj_size=2)
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
        rt.GRU(3, 4, 1, True, False, 0.0, False, 2)                 # 8th, as in torch.nn
    assert [p.shape for p in rt.LSTM(3, 4, 2)._flat_weights] == [
        p.shape for p in nn.LSTM(3, 4, 2)._flat_weights]


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_torch_compile_of_a_model_around_the_drop_in(compile_backend):
    """``torch.compile(model)`` with our GRU inside: the recurrence is one graph break (run
    eagerly, autograd included) and the rest compiles; outputs and every gradient equal the
    same model with torch.nn.GRU, uncompiled, in float64."""
    torch._dynamo.reset()

    class Tagger(nn.Module):
        def __init__(self, rnn):
            super().__init__()
            self.rnn, self.head = rnn, nn.Linear(2 * 6, 3, dtype=F64)

        def forward(self, x):
            y, h = self.rnn(x)
            return torch.tanh(self.head(y)).sum(-1), h

    ours = Tagger(rt.GRU(4, 6, num_layers=2, bidirectional=True, dtype=F64))
    theirs = copy.deepcopy(ours)
    theirs.rnn = nn.GRU(4, 6, num_layers=2, bidirectional=True, dtype=F64)
    theirs.rnn.load_state_dict(ours.rnn.state_dict())
    graphs = []                     # what dynamo captured: only the code around the layer

    def recording(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(compile_backend)(gm, example_inputs)

    compiled = torch.compile(ours, backend=recording)
    for T, B in ((5, 3), (7, 2)):                        # a second shape: no stale trace
        x = torch.randn(T, B, 4, dtype=F64, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        (out, h), (want, want_h) = compiled(x), theirs(x2)
        torch.testing.assert_close(out, want, **TOL)
        torch.testing.assert_close(h, want_h, **TOL)
        (out.square().sum() + h.sum()).backward()
        (want.square().sum() + want_h.sum()).backward()
        torch.testing.assert_close(x.grad, x2.grad, **TOL)
        for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)
        ours.zero_grad()
        theirs.zero_grad()
    # traced rather than skipped, the layer's own Python gave 26 graphs here (and 314 frames)
    assert 1 <= len(graphs) <= 4, [len(g.graph.nodes) for g in graphs]


def test_torch_compile_fullgraph_names_the_graph_break():
    torch._dynamo.reset()
    compiled = torch.compile(rt.GRU(4, 6), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="rnn_gpu's recurrent layers run their fused kernels "
                                        "outside the graph"):
        compiled(torch.randn(3, 2, 4))


@pytest.mark.skipif(not hasattr(torch.compiler, "is_exporting"), reason="torch < 2.5")
@pytest.mark.parametrize("layer, instead", [(rt.GRU, "export the model with torch.nn.GRU"),
                                            (rt.TwoStageRNN, "use torch.compile")])
def test_torch_export_says_it_cannot_and_what_to_do_instead(layer, instead):
    """Traced by torch.export (fake tensors), the core failed deep inside with ".numpy() is
    not supported for tensor subclasses"."""
    with pytest.raises(NotImplementedError, match=rf"torch.export: rnn_gpu.torch."
                       rf"{layer.__name__} runs its fused kernels outside torch's graph and "
                       rf"cannot be exported; {instead}"):
        torch.export.export(layer(4, 6), (torch.randn(3, 2, 4),))


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")   # torch's own
@pytest.mark.parametrize("transform, message", [
    (lambda m, x: torch.jit.trace(m, (x,)), r"torch.jit.trace: rnn_gpu.torch.GRU runs its "
                                            r"fused kernels outside torch's graph"),
    (lambda m, x: torch.func.vmap(lambda xx: m(xx)[0])(x[None].expand(3, -1, -1, -1)),
     r"torch.func transforms \(vmap, grad, jvp, jacrev, ...\): rnn_gpu.torch.GRU's fused op"),
    (lambda m, x: torch.func.grad(lambda xx: m(xx)[0].sum())(x), r"torch.func transforms"),
])
def test_tracing_and_func_transforms_say_they_cannot(transform, message):
    """Where torch's own errors were "unordered_map::at" and a note on setup_context."""
    with pytest.raises(NotImplementedError, match=message):
        transform(rt.GRU(4, 6), torch.randn(3, 2, 4))


def test_the_numpy_backend_follows_torchs_thread_count(monkeypatch):
    """torch.set_num_threads(1) (DataLoader workers, one process a core) held for torch.nn but
    not for the drop-ins, whose NumPy backend took every usable core."""
    import rnn_gpu.backends.numpy as nb

    seen = []
    real_plan = nb._plan

    def recording(*args, **kwargs):
        seen.append(nb.num_threads())
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(nb, "_plan", recording)
    monkeypatch.delenv("RNN_GPU_NUM_THREADS", raising=False)
    monkeypatch.setattr(nb.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    before = torch.get_num_threads()
    m, x = rt.GRU(4, 6), torch.randn(3, 2, 4, requires_grad=True)
    try:
        torch.set_num_threads(1)
        m(x)[0].sum().backward()                       # forward and backward
        with torch.no_grad():
            m(x)                                       # inference
        assert seen and set(seen) == {1}, seen
        torch.set_num_threads(3)
        seen.clear()
        m(x)[0].sum().backward()
        assert set(seen) == {3}, seen
    finally:
        torch.set_num_threads(before)
    seen.clear()
    import rnn_gpu as rg

    rg.GRU(4, 6)(np.zeros((3, 2, 4), "float32"))        # the core API: every usable core
    assert seen == [8], seen


@pytest.mark.parametrize("cell", ["lstm", "lstm_proj", "gru", "rnn_tanh", "twostage"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_zero_steps_are_refused_and_an_empty_batch_taken_as_by_torch_nn(cell, batch_first,
                                                                         device):
    """torch.nn's RNNs raise for T = 0 (batched or not, either layout, B = 0 or not; on the
    meta device too) and take B = 0 with T >= 1; the drop-ins took T = 0 and returned empty
    outputs, so code tried on them failed on torch.nn. TwoStageRNN is held to an RNN's rule."""
    kwargs = dict(num_layers=2, bidirectional=True, batch_first=batch_first, device=device)
    if cell == "twostage":
        ref, ours = nn.RNN(3, 4, **kwargs), rt.TwoStageRNN(3, 4, **kwargs)
    else:
        ref_cls, our_cls, extra = CELLS[cell]
        ref, ours = ref_cls(3, 4, **extra, **kwargs), our_cls(3, 4, **extra, **kwargs)
    cases = {(0, 3): True}                          # shape -> refused; unbatched T = 0
    for t, b in [(0, 2), (0, 0), (5, 0)]:
        cases[(b, t, 3) if batch_first else (t, b, 3)] = t == 0
    for shape, refused in cases.items():
        x = torch.randn(*shape, device=device, requires_grad=device == "cpu")
        with pytest.raises(RuntimeError, match="sequence length to be larger than 0") \
                if refused else contextlib.nullcontext():
            want = ref(x)
        if refused:
            with pytest.raises(ValueError, match=re.escape(
                    f"input: expected at least one time step (T in dimension "
                    f"{1 if batch_first and len(shape) == 3 else 0}")):
                ours(x)
            continue
        got = ours(x)
        assert [t.shape for t in torch.utils._pytree.tree_leaves(got)] == \
            [t.shape for t in torch.utils._pytree.tree_leaves(want)]
        if device == "cpu":                          # B = 0 trains: empty and zero gradients
            sum(t.sum() for t in torch.utils._pytree.tree_leaves(got)).backward()
            assert x.grad.shape == x.shape
            assert all(p.grad is not None and not p.grad.any() for p in ours.parameters())


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_data_input_skips_its_gradient_and_nothing_else(cell, monkeypatch):
    """x that requires no gradient (data, as in most training): the core backward is asked
    for no dx, and the parameters' and hx's gradients are those of a run whose x does."""
    from rnn_gpu import layers

    asked = []
    real = layers.RecurrentLayer.backward

    def spy(self, *args, **kwargs):
        asked.append(kwargs.get("input_grad", True))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(layers.RecurrentLayer, "backward", spy)
    torch.manual_seed(0)
    m = getattr(rt, cell)(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64)
    x, h = torch.randn(4, 2, 3, dtype=torch.float64), torch.randn(4, 2, 5, dtype=torch.float64)
    grads = []
    for needs_x in (True, False):
        m.zero_grad()
        xi = x.clone().requires_grad_(needs_x)
        hx = h.clone().requires_grad_(True)
        y, _ = m(xi, (hx, torch.zeros_like(hx)) if cell == "LSTM" else hx)
        y.square().sum().backward()
        assert (xi.grad is not None) == needs_x
        grads.append([hx.grad] + [p.grad.clone() for p in m.parameters()])
    assert asked == [True, False]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
