"""Bad arguments get clear errors: each message names the argument and says what was expected
and what was received."""

from __future__ import annotations

import numpy as np
import pytest

import rnn_gpu as rg
from rnn_gpu.registry import BackendError

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'rnn-gpu[test]')")

F32 = np.float32


@pytest.fixture
def x():
    return np.zeros((5, 2, 3), F32)


@pytest.fixture
def lstm():
    return rg.LSTM(3, 4)


@pytest.fixture
def gru():
    return rg.GRU(3, 4)


# ---------------------------------------------------------------------- x

@pytest.mark.parametrize("shape", [(3,), (1, 2, 5, 3), ()])
def test_wrong_ndim(lstm, shape):
    with pytest.raises(ValueError, match=r"x: expected a 3-D array .* got shape " +
                       rf"\({', '.join(map(str, shape))}"):
        lstm(np.zeros(shape, F32))


def test_wrong_ndim_mentions_batch_first_layout():
    m = rg.GRU(3, 4, batch_first=True)
    with pytest.raises(ValueError, match=r"x: expected a 3-D array \(B, T, input_size\)"):
        m(np.zeros(3, F32))


@pytest.mark.parametrize("shape", [(5, 2, 4), (5, 2, 1), (5, 4)])
def test_wrong_input_size(lstm, shape):
    with pytest.raises(ValueError, match=rf"x: expected last dimension input_size=3, got shape "
                       rf"\({shape[0]}, {shape[1]}"):
        lstm(np.zeros(shape, F32))


def test_dtype_mismatch_float64_into_float32(lstm, x):
    with pytest.raises(TypeError, match=r"x: expected dtype float32 \(the model's dtype\), "
                       r"got float64.*dtype='float64'"):
        lstm(x.astype(np.float64))
    with pytest.raises(TypeError, match=r"x: expected dtype float32.*got float64"):
        lstm(torch.zeros(5, 2, 3, dtype=torch.float64))


def test_dtype_mismatch_float32_into_float64(x):
    with pytest.raises(TypeError, match=r"x: expected dtype float64 .*got float32"):
        rg.RNN(3, 4, dtype="float64")(x)


@pytest.mark.parametrize("make", [lambda: np.zeros((5, 2, 3), np.int64),
                                  lambda: np.zeros((5, 2, 3), bool),
                                  lambda: torch.zeros(5, 2, 3, dtype=torch.int32)])
def test_integer_input(lstm, make):
    with pytest.raises(TypeError, match=r"x: expected dtype float32 .*got (int|bool).*"
                       r"floating-point"):
        lstm(make())


def test_integer_input_does_not_suggest_an_integer_model(lstm):
    with pytest.raises(TypeError) as info:
        lstm(np.zeros((5, 2, 3), np.int64))
    assert "dtype='int64'" not in str(info.value)


@pytest.mark.parametrize("value", [[[0.0, 1.0, 2.0]], None, "abc", 3.0])
def test_not_an_array(lstm, value):
    with pytest.raises(TypeError, match=r"x: expected a NumPy array, CuPy array or torch tensor,"
                       r" got (list|NoneType|str|float)"):
        lstm(value)


# ---------------------------------------------------------------------- state

def test_state_wrong_shape(gru, x):
    with pytest.raises(ValueError, match=r"state: expected shape \(1, 2, 4\), got \(1, 3, 4\)"):
        gru(x, np.zeros((1, 3, 4), F32))
    with pytest.raises(ValueError, match=r"state: expected shape \(1, 2, 4\), got \(2, 4\)"):
        gru(x, np.zeros((2, 4), F32))


def test_state_wrong_shape_bidirectional_multilayer(x):
    m = rg.RNN(3, 4, num_layers=2, bidirectional=True)
    with pytest.raises(ValueError, match=r"state: expected shape \(4, 2, 4\), got \(2, 2, 4\)"):
        m(x, np.zeros((2, 2, 4), F32))


def test_state_unbatched_shape():
    m = rg.GRU(3, 4)
    with pytest.raises(ValueError, match=r"state: expected shape \(1, 4\), got \(1, 1, 4\)"):
        m(np.zeros((5, 3), F32), np.zeros((1, 1, 4), F32))


def test_state_wrong_kind(gru, x):
    with pytest.raises(TypeError, match=r"state: expected a numpy array like the input, got a "
                       r"torch array"):
        gru(x, torch.zeros(1, 2, 4))
    with pytest.raises(TypeError, match=r"state: expected a torch array like the input, got a "
                       r"numpy array"):
        gru(torch.from_numpy(x), np.zeros((1, 2, 4), F32))


def test_state_or_input_on_another_device(gru, x):
    """Issue 4's "tensors on different devices", on the CPU: torch's meta device stands in for
    another device (on a card the same check names cuda:0 and cpu)."""
    t = torch.from_numpy(x)
    with pytest.raises(ValueError, match=r"state: expected an array on cpu like the input, "
                       r"got one on meta"):
        gru(t, torch.zeros(1, 2, 4, device="meta"))
    with pytest.raises(ValueError, match=r"x: the input is on meta.* but GRU's weights are on "
                       r"cpu; move x to cpu"):         # model.to('meta') is no fix: it refuses
        gru(t.to("meta"))
    lstm = rg.LSTM(3, 4)
    _, _, tape = lstm.forward(t)
    with pytest.raises(ValueError, match=r"dy: expected an array on cpu like the input, got one "
                       r"on meta"):
        lstm.backward(tape, torch.zeros(5, 2, 4, device="meta"))


def test_state_wrong_dtype(gru, x):
    with pytest.raises(TypeError, match=r"state: expected dtype float32 like the input, got "
                       r"float64"):
        gru(x, np.zeros((1, 2, 4)))


def test_state_not_an_array(gru, x):
    with pytest.raises(TypeError, match=r"state: expected a NumPy array.*got str"):
        gru(x, "h0")


def test_gru_state_tuple_of_two(gru, x):
    h = np.zeros((1, 2, 4), F32)
    with pytest.raises(TypeError, match=r"state: GRU expects one array h, got a tuple of 2"):
        gru(x, (h, h))


def test_lstm_state_not_a_tuple(lstm, x):
    with pytest.raises(TypeError, match=r"state: LSTM expects a tuple \(h, c\), got ndarray"):
        lstm(x, np.zeros((1, 2, 4), F32))
    h = np.zeros((1, 2, 4), F32)
    with pytest.raises(TypeError, match=r"state: LSTM expects a tuple \(h, c\), got a tuple "
                       r"of 3"):
        lstm(x, (h, h, h))


def test_lstm_cell_state_wrong_shape(x):
    m = rg.LSTM(3, 4, proj_size=2)
    h, c = np.zeros((1, 2, 2), F32), np.zeros((1, 2, 4), F32)
    m(x, (h, c))                                   # the right shapes work
    with pytest.raises(ValueError, match=r"state\[0\] \(h\): expected shape \(1, 2, 2\), got "
                       r"\(1, 2, 4\)"):
        m(x, (c, c))
    with pytest.raises(ValueError, match=r"state\[1\] \(c\): expected shape \(1, 2, 4\), got "
                       r"\(1, 2, 2\)"):
        m(x, (h, h))


# ---------------------------------------------------------------------- lengths

@pytest.mark.parametrize("lengths,shape", [([1, 2, 3], r"\(3,\)"), ([[1, 2]], r"\(1, 2\)"),
                                           (np.array(3), r"\(\)"), ([], r"\(0,\)")])
def test_lengths_wrong_shape(lstm, x, lengths, shape):
    with pytest.raises(ValueError, match=rf"lengths: expected shape \(2,\) .*got {shape}"):
        lstm(x, lengths=lengths)


@pytest.mark.parametrize("lengths,bad", [
    ([-1, 2], r"\[-1\]"), ([6, 2], r"\[6\]"), ([2, 100], r"\[100\]"),
    # as given: a uint64 2**64 - 1 was reported as [-1], after the cast to int64
    (np.array([2**64 - 1, 3], np.uint64), r"\[18446744073709551615\]")])
def test_lengths_out_of_range(lstm, x, lengths, bad):
    with pytest.raises(ValueError, match=rf"lengths: expected every length in \[0, T=5\], got "
                       rf"{bad}"):
        lstm(x, lengths=lengths)


def test_lengths_out_of_range_torch(lstm, x):
    with pytest.raises(ValueError, match=r"lengths: expected every length in \[0, T=5\]"):
        lstm(torch.from_numpy(x), lengths=torch.tensor([3, -2]))


@pytest.mark.parametrize("lengths", [[2.5, 2], np.array([np.nan, 2.0]), ["a", "b"],
                                     np.array([True, False])])
def test_lengths_not_integers(lstm, x, lengths):
    with pytest.raises(TypeError, match=r"lengths: expected integers.*dtype"):
        lstm(x, lengths=lengths)


@pytest.mark.parametrize("lengths, bad", [
    (np.array([3.0, np.inf]), r"lengths\[1\] = inf"),
    (np.array([np.nan, 2.0]), r"lengths\[0\] = nan"),
    (np.array([3.0, 2.5]), r"lengths\[1\] = 2.5")])
def test_lengths_not_integers_name_the_first_bad_one(lstm, x, lengths, bad):
    with pytest.raises(TypeError, match=rf"lengths: expected integers, got dtype float64 with "
                                        rf"{bad}"):
        lstm(x, lengths=lengths)



def test_masked_input_is_refused(lstm, x):
    """Its mask would have been ignored, silently."""
    with pytest.raises(TypeError, match=r"x: expected a plain array, got a NumPy masked array, "
                                        r"whose mask would be ignored; pass x.filled\(0\)"):
        lstm(np.ma.masked_array(x, mask=x > 0))


def test_lengths_as_text_is_not_reported_as_a_shape(lstm, x):
    with pytest.raises(TypeError, match=r"lengths: expected integers \(one per sequence, B=2\), "
                                        r"got str 'ab' \(dtype <U2\)"):
        lstm(x, lengths="ab")


@pytest.mark.parametrize("make, hint", [
    (lambda: np.zeros((5, 2, 3), ">f4"), r"not in this machine's order; x.astype\('float32'\)"),
    (lambda: torch.zeros(5, 2, 3, dtype=torch.int64), r"x.to\(torch.float32\)"),
    (lambda: torch.zeros(5, 2, 3, dtype=torch.float64), r"cast it \(x.to\(torch.float32\)\)")])
def test_dtype_hints_fit_the_array(lstm, make, hint):
    with pytest.raises(TypeError, match=hint):
        lstm(make())


def test_lengths_checked_in_forward_too(lstm, x):
    with pytest.raises(ValueError, match=r"lengths: expected every length"):
        lstm.forward(x, lengths=[0, 9])


# ---------------------------------------------------------------------- backends

def test_unknown_backend_argument(lstm, x):
    with pytest.raises(ValueError, match=r"backend 'nope' \(chosen by backend=\) is not "
                       r"registered; registered backends are \[.*'numpy'.*\]"):
        lstm(x, backend="nope")


def test_backend_argument_not_a_string(lstm, x):
    with pytest.raises(TypeError, match=r"backend: expected a backend name \(str\), got 3"):
        lstm(x, backend=3)


def test_unknown_backend_use_backend(lstm, x):
    with pytest.raises(ValueError, match=r"backend: unknown name 'nope'; registered backends "
                       r"are \[.*'numpy'.*\]"), rg.use_backend("nope"):
        lstm(x)


def test_unknown_backend_environment(lstm, x, monkeypatch):
    monkeypatch.setenv("RNN_GPU_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"backend 'nope' \(chosen by the environment variable "
                       r"RNN_GPU_BACKEND\) is not registered"):
        lstm(x)
    # the call's backend= comes first
    y, _ = lstm(x, backend="numpy")
    assert y.shape == (5, 2, 4)


def test_backend_cannot_serve_dtype():
    m = rg.GRU(3, 4, dtype="float16")
    with pytest.raises(BackendError, match=r"numpy: the numpy backend computes in float32 and "
                       r"float64, not float16"):
        m(np.zeros((2, 1, 3), np.float16))
    with pytest.raises(BackendError, match=r"backend 'numpy' \(chosen by backend=\) cannot "
                       r"serve .*float16"):
        m(np.zeros((2, 1, 3), np.float16), backend="numpy")


# ---------------------------------------------------------------------- constructors

@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(hidden_size=0), ValueError, r"hidden_size: expected an int >= 1, got 0"),
    (dict(hidden_size=-3), ValueError, r"hidden_size: expected an int >= 1, got -3"),
    (dict(hidden_size=2.5), TypeError, r"hidden_size: expected an int >= 1, got 2.5"),
    (dict(hidden_size=True), TypeError, r"hidden_size: expected an int >= 1, got True"),
    (dict(input_size=0), ValueError, r"input_size: expected an int >= 1, got 0"),
    (dict(num_layers=0), ValueError, r"num_layers: expected an int >= 1, got 0"),
    (dict(proj_size=4), ValueError, r"proj_size: expected less than hidden_size=4, got 4"),
    (dict(proj_size=9), ValueError, r"proj_size: expected less than hidden_size=4, got 9"),
    (dict(proj_size=-1), ValueError, r"proj_size: expected an int >= 0, got -1"),
    (dict(dropout=1.5), ValueError, r"dropout: expected a float in \[0, 1\], got 1.5"),
    (dict(dropout=-0.1), ValueError, r"dropout: expected a float in \[0, 1\], got -0.1"),
    (dict(dropout="0.2"), ValueError, r"dropout: expected a float in \[0, 1\], got '0.2'"),
    (dict(dtype="int8"), ValueError, r"dtype: expected one of \(.*'float32'.*\), got 'int8'"),
    (dict(dtype=np.int32), ValueError, r"dtype: expected one of .*got <class 'numpy.int32'>"),
    (dict(bias="yes"), TypeError, r"bias: expected a bool, got 'yes'"),
    (dict(batch_first=1), TypeError, r"batch_first: expected a bool, got 1"),
    (dict(bidirectional=2), TypeError, r"bidirectional: expected a bool, got 2"),
    (dict(bidirectional=None), TypeError, r"bidirectional: expected a bool, got None"),
    (dict(seed="abc"), TypeError, r"seed: expected None or an int >= 0, got 'abc'"),
    (dict(seed=1.5), TypeError, r"seed: expected None or an int >= 0, got 1.5"),
    (dict(seed=-1), ValueError, r"seed: expected None or an int >= 0, got -1"),
])
def test_constructor_errors(kwargs, exc, pattern):
    args = dict(input_size=3, hidden_size=4)
    args.update(kwargs)
    with pytest.raises(exc, match=pattern):
        rg.LSTM(**args)


@pytest.mark.parametrize("cls", [rg.GRU, rg.RNN, rg.TwoStageRNN])
def test_proj_size_only_for_lstm(cls):
    with pytest.raises(ValueError, match=rf"proj_size: only LSTM supports a projection, got "
                       rf"proj_size=2 for {cls.__name__}"):
        cls(3, 4, proj_size=2)


def test_rnn_nonlinearity():
    with pytest.raises(ValueError, match=r"nonlinearity: expected one of \('tanh', 'relu'\), "
                       r"got 'sigmoid'"):
        rg.RNN(3, 4, nonlinearity="sigmoid")


@pytest.mark.parametrize("which", ["f", "g"])
def test_twostage_activation(which):
    with pytest.raises(ValueError, match=rf"{which}: expected one of \('tanh', 'sigmoid', "
                       rf"'relu'\), got 'gelu'"):
        rg.TwoStageRNN(3, 4, **{which: "gelu"})


def test_unknown_keyword():
    with pytest.raises(TypeError, match="nonlinearity"):
        rg.LSTM(3, 4, nonlinearity="tanh")


# ---------------------------------------------------------------------- load_state_dict

def test_load_state_dict_missing_key(lstm):
    sd = lstm.state_dict()
    del sd["bias_hh_l0"]
    with pytest.raises(KeyError, match=r"missing keys \['bias_hh_l0'\], unexpected keys \[\]"):
        lstm.load_state_dict(sd)


def test_load_state_dict_unexpected_key(lstm):
    sd = lstm.state_dict()
    sd["weight_hh_l1"] = np.zeros((16, 4), F32)
    with pytest.raises(KeyError, match=r"missing keys \[\], unexpected keys \['weight_hh_l1'\]"):
        lstm.load_state_dict(sd)


def test_load_state_dict_wrong_shape(lstm):
    before = lstm.state_dict()
    sd = lstm.state_dict()
    sd["weight_hh_l0"] = np.zeros((16, 5), F32)
    with pytest.raises(ValueError, match=r"state_dict\['weight_hh_l0'\]: expected shape "
                       r"\(16, 4\), got \(16, 5\)"):
        lstm.load_state_dict(sd)
    sd["weight_hh_l0"] = torch.zeros(4, 16)
    with pytest.raises(ValueError, match=r"state_dict\['weight_hh_l0'\]: expected shape "
                       r"\(16, 4\), got \(4, 16\)"):
        lstm.load_state_dict(sd)
    for k, v in lstm.state_dict().items():      # a failed load leaves the weights alone
        np.testing.assert_array_equal(v, before[k])


def test_load_state_dict_bad_values(lstm):
    sd = lstm.state_dict()
    sd["bias_ih_l0"] = np.zeros(16, np.int64)
    with pytest.raises(TypeError, match=r"state_dict\['bias_ih_l0'\]: expected a floating "
                       r"dtype, got int64"):
        lstm.load_state_dict(sd)
    sd["bias_ih_l0"] = [0.0] * 16
    with pytest.raises(TypeError, match=r"state_dict\['bias_ih_l0'\]: expected an array or "
                       r"tensor, got list"):
        lstm.load_state_dict(sd)
    with pytest.raises(TypeError, match=r"state_dict: expected a mapping"):
        lstm.load_state_dict([("bias_ih_l0", np.zeros(16))])


# ---------------------------------------------------------------------- backward

def test_backward_wrong_dy_shape(lstm, x):
    _, _, tape = lstm.forward(x)
    with pytest.raises(ValueError, match=r"dy: expected shape \(5, 2, 4\), got \(5, 2, 5\)"):
        lstm.backward(tape, np.zeros((5, 2, 5), F32))
    with pytest.raises(ValueError, match=r"dy: expected shape \(5, 2, 4\), got \(2, 5, 4\)"):
        lstm.backward(tape, np.zeros((2, 5, 4), F32))
    # the failed calls did not consume the tape
    dx, _, _ = lstm.backward(tape, np.zeros((5, 2, 4), F32))
    assert dx.shape == x.shape


def test_backward_wrong_dy_dtype_and_kind(lstm, x):
    _, _, tape = lstm.forward(x)
    with pytest.raises(TypeError, match=r"dy: expected dtype float32 like the input, got "
                       r"float64"):
        lstm.backward(tape, np.zeros((5, 2, 4)))
    with pytest.raises(TypeError, match=r"dy: expected a numpy array like the input, got a "
                       r"torch array"):
        lstm.backward(tape, torch.zeros(5, 2, 4))


def test_backward_wrong_dstate(lstm, x):
    _, _, tape = lstm.forward(x)
    dy = np.zeros((5, 2, 4), F32)
    h = np.zeros((1, 2, 4), F32)
    with pytest.raises(ValueError, match=r"dstate\[1\] \(c\): expected shape \(1, 2, 4\), got "
                       r"\(1, 3, 4\)"):
        lstm.backward(tape, dy, (h, np.zeros((1, 3, 4), F32)))
    with pytest.raises(TypeError, match=r"dstate: LSTM expects a tuple \(h, c\)"):
        lstm.backward(tape, dy, h)


def test_backward_tape_used_twice(lstm, x):
    _, _, tape = lstm.forward(x)
    dy = np.zeros((5, 2, 4), F32)
    lstm.backward(tape, dy)
    with pytest.raises(RuntimeError, match=r"tape: this tape was already used by backward\(\); "
                       r"run forward\(\) again"):
        lstm.backward(tape, dy)


def test_backward_not_a_tape(lstm):
    with pytest.raises(TypeError, match=r"tape: expected the tape returned by LSTM.forward, got "
                       r"tuple"):
        lstm.backward((), np.zeros((5, 2, 4), F32))


def test_backward_tape_of_another_layer(lstm, x):
    other = rg.GRU(3, 4)
    _, _, tape = lstm.forward(x)
    with pytest.raises(ValueError, match=r"tape: expected a tape from this layer's forward\(\)"):
        other.backward(tape, np.zeros((5, 2, 4), F32))


def _change(a):
    if isinstance(a, torch.Tensor):
        a.mul_(2.0) if a.is_floating_point() else a.sub_(1)
    else:
        a[...] = a * 2 if a.dtype.kind == "f" else a - 1


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
@pytest.mark.parametrize("what, message", [
    ("x", r"x \(the input of forward\(\)\)"),
    ("h0", r"the initial state's h_0"),
    ("lengths", r"lengths"),
    ("weight_hh_l0", r"parameter 'weight_hh_l0'"),
    ("weight_ih_l0", r"parameter 'weight_ih_l0'"),
    ("bias_hh_l0", r"parameter 'bias_hh_l0'"),
])
def test_backward_refuses_a_tape_whose_arrays_changed_in_place(kind, cell, what, message):
    """The tape refers to x, the state, lengths and the parameters rather than copying them;
    changed in place between forward and backward (an optimizer step before backward, a
    reused input buffer), they gave gradients for values the forward never saw."""
    m = getattr(rg, cell)(3, 4, dtype="float64")
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    h0, lengths = np.full((1, 2, 4), 0.5), np.array([5, 3])
    if kind == "torch":          # checked by version counter (the CPU parameters are NumPy)
        x, h0, lengths = torch.from_numpy(x), torch.from_numpy(h0), torch.from_numpy(lengths)
    state = (h0, h0 * 0 + 0.25) if cell == "LSTM" else h0
    arrays = {"x": x, "h0": h0, "lengths": lengths, **m.parameters()}
    y, _, tape = m.forward(x, state, lengths=lengths)
    dy = y * 0 + 1
    _change(arrays[what])
    with pytest.raises(RuntimeError, match=rf"tape: {message} was changed in place after "
                                           rf"forward\(\)"):
        m.backward(tape, dy)
    _change(arrays[what])                              # a fresh forward with it is fine
    y, _, tape = m.forward(x, state, lengths=lengths)
    m.backward(tape, dy)


def _scale_(a, index=...):
    if isinstance(a, torch.Tensor):
        a[index].mul_(-2.0)
    else:
        a[index] *= -2.0


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("cell, options, lengths, change", [
    ("RNN", {"nonlinearity": "relu"}, None, lambda y: _scale_(y)),
    ("RNN", {}, None,                                                        # an in-place relu
     lambda y: torch.relu_(y) if isinstance(y, torch.Tensor) else np.maximum(y, 0, out=y)),
    ("GRU", {"batch_first": True}, None, lambda y: _scale_(y, (1, 2))),       # (B, T, H)
    ("LSTM", {"bidirectional": True}, None, lambda y: _scale_(y, (..., slice(2, 4)))),
    ("LSTM", {"num_layers": 2, "proj_size": 2, "dropout": 0.5}, None,
     lambda y: _scale_(y, (0, 0, 1))),
    # a padded step past a sequence's end (zeros): the reverse direction reads it
    ("TwoStageRNN", {"bidirectional": True}, [5, 3], lambda y: y[4, 1].__setitem__(..., 1.0)),
    ("GRU", {}, [4, 2], lambda y: y[3, 1].__setitem__(..., 1.0)),
    ("GRU", {"unbatched": True}, None, lambda y: _scale_(y, 2)),               # (T, H)
])
def test_backward_refuses_a_tape_whose_output_changed_in_place(kind, cell, options, lengths,
                                                                change):
    """The tape reads h_{t-1} (and h_t) from y instead of keeping a copy; y is the caller's,
    and changed in place between forward and backward it gave wrong gradients, silently. In
    every layout the caller gets: batch_first and unbatched views, a bidirectional half, the
    zeros past a sequence's length."""
    options = dict(options)
    unbatched = options.pop("unbatched", False)
    m = getattr(rg, cell)(3, 6 if options.get("proj_size") else 2, dtype="float64", seed=0,
                          **options)
    rng = np.random.default_rng(0)
    shape = (5, 3) if unbatched else ((2, 5, 3) if options.get("batch_first") else (5, 2, 3))
    x = rng.standard_normal(shape)
    if kind == "torch":
        x = torch.from_numpy(x)
    y, _, tape = m.forward(x, lengths=lengths)
    dy = y * 0 + 1
    change(y)
    with pytest.raises(RuntimeError, match=r"tape: y \(the output of forward\(\).* was "
                                           r"changed in place after forward\(\)"):
        m.backward(tape, dy)
    y, _, tape = m.forward(x, lengths=lengths)            # a fresh forward is fine
    m.backward(tape, dy)


def test_bit_sum_fingerprint_sees_a_change():
    """The CuPy arrays' fingerprint, computed here with NumPy, which has the same API."""
    from rnn_gpu._fingerprint import bit_sum

    a = np.arange(12, dtype=np.float16).reshape(3, 4)[:, ::2]        # not contiguous
    before = bit_sum(a)
    assert bit_sum(a.copy()) == before
    a[1, 1] = 7.5
    assert bit_sum(a) != before


def test_device_fingerprints_are_compared_with_one_copy(monkeypatch):
    """CuPy arrays' branch of first_changed, with NumPy standing in for CuPy: every device
    comparison goes to the host in one stacked copy, and the first changed array is named."""
    import sys
    import types

    from rnn_gpu import _fingerprint

    copies = []

    class Stacked(np.ndarray):
        def get(self):
            copies.append(len(self))
            return np.asarray(self)

    fake = types.SimpleNamespace(stack=lambda xs: np.stack(xs).view(Stacked))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(_fingerprint, "kind_of", lambda a: "cupy")
    arrays = {name: np.arange(6.0) for name in ("a", "b", "c")}
    entries = [(name, a, _fingerprint.fingerprint(a)) for name, a in arrays.items()]
    assert _fingerprint.first_changed(entries) is None
    arrays["b"][2] = -1.0
    arrays["c"][0] = 9.0
    assert _fingerprint.first_changed(entries) == "b"
    assert copies == [3, 3]


def test_switches_take_bools_only(lstm):
    """"no" was taken as True, silently."""
    with pytest.raises(TypeError, match=r"mode: expected a bool, got 'no'"):
        lstm.train("no")
    assert lstm.training
    with pytest.raises(TypeError, match=r"enabled: expected a bool, got 'yes'"):
        rg.allow_tf32("yes")
    with pytest.raises(ValueError, match=r"seed: expected None or an int >= 0, got -3"):
        rg.Readout(3, 4, seed=-3)


def test_inference_call_has_no_tape(lstm, x):
    out = lstm(x)
    assert len(out) == 2


# ---------------------------------------------------------------------- devices

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", 0, "CUDA"])
def test_to_cuda_without_gpu(lstm, device):
    before = lstm.state_dict()
    with pytest.raises(RuntimeError, match=r"no CUDA device is available"):
        lstm.to(device)
    assert lstm.device == "cpu"
    y, _ = lstm(np.zeros((2, 1, 3), F32))          # still usable
    for k, v in lstm.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    assert y.shape == (2, 1, 4)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu", "", None, "cpu:0:0"])
def test_to_garbage_device(lstm, device):
    with pytest.raises(ValueError, match=r"device: expected 'cpu', 'cuda' or 'cuda:N', got "):
        lstm.to(device)


def test_to_cpu_is_a_no_op(lstm):
    assert lstm.to("cpu") is lstm
    assert lstm.to("CPU") is lstm and lstm.device == "cpu"


def test_a_tensor_that_requires_grad_gets_a_warning_pointing_to_the_drop_ins(lstm):
    """The NumPy-style layers run outside autograd: a user who expected a grad_fn is told
    where to find one. No warning under no_grad, for a detached tensor, or from the drop-ins
    (whose autograd Function calls the layer with grad mode off)."""
    import warnings

    from rnn_gpu.torch import LSTM

    x = torch.randn(5, 2, 3, requires_grad=True)
    with pytest.warns(UserWarning, match=r"rnn_gpu.LSTM runs outside torch's autograd.*"
                                         r"rnn_gpu.torch.LSTM"):
        lstm(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            lstm(x)
        lstm(x.detach())
        y, _ = LSTM(3, 4)(x)
        y.sum().backward()
