"""Gradients of ``m.backward`` against central finite differences in float64 (an oracle that
shares nothing with torch), and dropout: training-only, reproducible, differentiated right."""

from __future__ import annotations

import numpy as np
import pytest
from oracles import as_tuple, assert_close, naive_reference, ours

import rnn_gpu as rg

EPS = 1e-6

CONFIGS = [
    ("LSTM", {}),
    ("LSTM", {"proj_size": 2}),
    ("GRU", {}),
    ("RNN", {"nonlinearity": "tanh"}),
    ("RNN", {"nonlinearity": "relu"}),
    ("TwoStageRNN", {"f": "tanh", "g": "tanh"}),
    ("TwoStageRNN", {"f": "sigmoid", "g": "relu"}),
    ("TwoStageRNN", {"f": "relu", "g": "sigmoid"}),
]
IDS = [c + "".join(f"-{k}={v}" for k, v in o.items()) for c, o in CONFIGS]


def _loss(y, state, dy, dstate) -> float:
    total = float(np.sum(y * dy))
    for s, d in zip(as_tuple(state), as_tuple(dstate)):
        total += float(np.sum(s * d))
    return total


def _pick(rng, shape, n):
    """n random multi-indices into an array of ``shape`` (fewer if it is small)."""
    size = int(np.prod(shape))
    flat = rng.choice(size, size=min(n, size), replace=False)
    return [np.unravel_index(i, shape) for i in flat]


def _fd(f, arr, idx, eps=EPS) -> float:
    """Central difference of ``f()`` with respect to ``arr[idx]`` (perturbed in place)."""
    old = arr[idx]
    arr[idx] = old + eps
    plus = f()
    arr[idx] = old - eps
    minus = f()
    arr[idx] = old
    return (plus - minus) / (2 * eps)


def _check(analytic, numeric, what, rtol=1e-6):
    assert abs(analytic - numeric) <= rtol * max(1.0, abs(numeric)), (
        f"{what}: backward gives {analytic!r}, finite differences {numeric!r}")


def _check_fd(analytic, f, arr, idx, what):
    """``_check`` against the central difference with EPS; should that disagree, once more with
    EPS/10 before failing: a relu unit whose input sits within EPS of 0 makes the EPS difference
    straddle the kink (rare, but the suite runs thousands of differences). A wrong gradient
    fails both."""
    numeric = _fd(f, arr, idx)
    if abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)):
        return
    _check(analytic, _fd(f, arr, idx, EPS / 10), what, rtol=1e-5)


def _model(cell, opts, rng, **kw):
    return getattr(rg, cell)(3, 4, dtype="float64", seed=int(rng.integers(2**32)),
                             **opts, **kw)


def _inputs(m, rng, T, B):
    x = rng.standard_normal((T, B, m.input_size))
    n = m.num_layers * m.num_directions
    parts = [0.5 * rng.standard_normal((n, B, m.output_size))]
    if isinstance(m, rg.LSTM):
        parts.append(0.5 * rng.standard_normal((n, B, m.hidden_size)))
    return x, parts


def _check_backward(m, x, parts, forward_result, run, rng, picks):
    """backward() of ``forward_result`` against central differences of the scalar loss
    sum(y*dy) + sum(state*dstate), where ``run()`` recomputes (y, state); ``picks`` is how many
    random entries of x, of each initial state and of each parameter to check."""
    y, final, tape = forward_result
    dy = rng.standard_normal(y.shape)
    dstate = tuple(rng.standard_normal(s.shape) for s in as_tuple(final))
    dstate = dstate if isinstance(m, rg.LSTM) else dstate[0]
    dx, dstate0, grads = m.backward(tape, dy, dstate)

    def loss():
        return _loss(*run(), dy, dstate)

    for idx in _pick(rng, x.shape, picks[0]):
        _check_fd(dx[idx], loss, x, idx, f"dx{idx}")
    for k, (p, g) in enumerate(zip(parts, as_tuple(dstate0))):
        for idx in _pick(rng, p.shape, picks[1]):
            _check_fd(g[idx], loss, p, idx, f"dstate0[{k}]{idx}")
    for name, p in m.parameters().items():
        for idx in _pick(rng, p.shape, picks[2]):
            _check_fd(grads[name][idx], loss, p, idx, f"grads[{name!r}]{idx}")


@pytest.mark.parametrize("cell,opts", CONFIGS, ids=IDS)
def test_backward_matches_finite_differences(cell, opts, rng):
    m = _model(cell, opts, rng, num_layers=2, bidirectional=True)
    T, B = 5, 3
    x, parts = _inputs(m, rng, T, B)
    state = tuple(parts) if cell == "LSTM" else parts[0]
    lengths = np.array([5, 3, 0])
    rng.shuffle(lengths)
    # the loss re-runs the inference path, independently of forward()'s tape
    _check_backward(m, x, parts, m.forward(x, state, lengths=lengths),
                    lambda: m(x, state, lengths=lengths), rng, picks=(6, 5, 2))


@pytest.mark.parametrize("cell,opts", CONFIGS, ids=IDS)
def test_unidirectional_no_state_no_lengths(cell, opts, rng):
    """The plainest call: state=None, dstate=None (zero), unbatched input."""
    m = _model(cell, opts, rng)
    x = rng.standard_normal((4, 3))
    y, final, tape = m.forward(x)
    dy = rng.standard_normal(y.shape)
    dx, dstate0, grads = m.backward(tape, dy)
    assert dx.shape == x.shape
    for s, d in zip(as_tuple(final), as_tuple(dstate0)):
        assert d.shape == s.shape

    def loss():
        return float(np.sum(m(x)[0] * dy))

    for idx in _pick(rng, x.shape, 4):
        _check_fd(dx[idx], loss, x, idx, f"dx{idx}")
    for name, p in m.parameters().items():
        for idx in _pick(rng, p.shape, 2):
            _check_fd(grads[name][idx], loss, p, idx, f"grads[{name!r}]{idx}")


# ---------------------------------------------------------------------- dropout

DROPOUT_CELLS = [("LSTM", {"proj_size": 2}), ("GRU", {}), ("RNN", {"nonlinearity": "relu"}),
                 ("TwoStageRNN", {"f": "sigmoid", "g": "tanh"})]
DROPOUT_IDS = [c for c, _ in DROPOUT_CELLS]


@pytest.mark.parametrize("cell,opts", DROPOUT_CELLS, ids=DROPOUT_IDS)
def test_dropout_backward_matches_finite_differences(cell, opts, rng):
    """With the dropout RNG re-seeded before each forward the masks repeat, so the training
    forward is a deterministic function whose derivative backward must give."""
    m = _model(cell, opts, rng, num_layers=3, bidirectional=True, dropout=0.4)
    assert m.training
    x, parts = _inputs(m, rng, 4, 3)
    state = tuple(parts) if cell == "LSTM" else parts[0]
    lengths = np.array([4, 1, 3])
    mask_seed = int(rng.integers(2**32))

    def forward():
        m._rng = np.random.default_rng(mask_seed)
        return m.forward(x, state, lengths=lengths)

    y, final, tape = forward()
    y_again, _, _ = forward()
    np.testing.assert_array_equal(y, y_again)
    # the masks drop something (comparing y with inference's output can flake for relu)
    assert all((np.asarray(mk) == 0).any() for mk in tape.dropout_masks[1:]), \
        "dropout=0.4 in training dropped nothing"
    _check_backward(m, x, parts, (y, final, tape), lambda: forward()[:2], rng,
                    picks=(5, 3, 1))


@pytest.mark.parametrize("cell,opts", DROPOUT_CELLS, ids=DROPOUT_IDS)
def test_dropout_masks_and_reference(cell, opts, rng):
    """The masks are inverted dropout (0 or 1/(1-p)), only between layers, and the result equals
    the naive reference run with the same masks, gradients included."""
    p = 0.3
    m = _model(cell, opts, rng, num_layers=3, dropout=p, bidirectional=True)
    x, parts = _inputs(m, rng, 6, 40)
    state = tuple(parts) if cell == "LSTM" else parts[0]
    lengths = rng.integers(0, 7, size=40)
    y, final, tape = m.forward(x, state, lengths=lengths)
    masks = [None if mk is None else np.asarray(mk) for mk in tape.dropout_masks]
    assert masks[0] is None                     # never on the input
    # The layers run the steps up to the longest sequence only, and so do their masks: all 40
    # lengths below 6 happens in 0.2% of the draws ((6/7)^40), which once made this flaky.
    steps = int(lengths.max())
    for mk in masks[1:]:
        assert mk.shape == (steps, 40, 2 * m.output_size)
        assert set(np.unique(mk)) <= {0.0, 1.0 / (1.0 - p)}
        zeros = float(np.mean(mk == 0))
        assert 0.15 < zeros < 0.45, zeros       # ~p; the bounds are > 5 sigma wide
    dy = rng.standard_normal(y.shape)
    dstate = tuple(rng.standard_normal(s.shape) for s in as_tuple(final))
    dstate = dstate if cell == "LSTM" else dstate[0]
    dx, dstate0, grads = m.backward(tape, dy, dstate)
    # past the longest sequence the reference's masks multiply zeros: any value serves
    masks = [None if mk is None else np.concatenate([mk, np.ones((6 - steps, *mk.shape[1:]))])
             for mk in masks]
    want = naive_reference(m, x[:, :8], tuple(s[:, :8] for s in parts)
                           if cell == "LSTM" else parts[0][:, :8], lengths[:8],
                           dy[:, :8], tuple(d[:, :8] for d in as_tuple(dstate))
                           if cell == "LSTM" else dstate[:, :8],
                           dropout_masks=[None if mk is None else mk[:, :8] for mk in masks])
    np.testing.assert_allclose(y[:, :8], want.y, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dx[:, :8], want.dx, rtol=1e-10, atol=1e-10)
    for a, b in zip(as_tuple(dstate0), want.dstate0):
        np.testing.assert_allclose(a[:, :8], b, rtol=1e-10, atol=1e-10)
    # parameter gradients over the whole batch: reference on all 40 rows
    want_all = naive_reference(m, x, state, lengths, dy, dstate, dropout_masks=masks)
    for k in want_all.grads:
        np.testing.assert_allclose(grads[k], want_all.grads[k], rtol=1e-9, atol=1e-10,
                                   err_msg=k)


@pytest.mark.parametrize("cell,opts", DROPOUT_CELLS, ids=DROPOUT_IDS)
def test_dropout_only_in_training_forward(cell, opts, rng):
    seed = int(rng.integers(2**32))
    m = getattr(rg, cell)(3, 4, num_layers=2, dropout=0.5, dtype="float64", seed=seed, **opts)
    plain = getattr(rg, cell)(3, 4, num_layers=2, dtype="float64", seed=seed, **opts)
    for k, v in plain.parameters().items():
        np.testing.assert_array_equal(v, m.parameters()[k])
    x = rng.standard_normal((5, 6, 3))
    want, want_state = plain(x)
    # inference never applies dropout, in training mode or not, and is repeatable
    for _ in range(2):
        y, s = m(x)
        np.testing.assert_array_equal(y, want)
    # training forward applies it: y is the naive reference's with the tape's masks, which
    # drop something, and each call draws fresh masks. (Comparing the outputs instead flaked
    # about once in 400 runs: with relu and 4 units, dropout could zero the top layer's output
    # in both calls.)
    y1, _, tape1 = m.forward(x)
    _, _, tape2 = m.forward(x)
    mask1, mask2 = (np.asarray(t.dropout_masks[1]) for t in (tape1, tape2))
    assert (mask1 == 0).any() and not np.array_equal(mask1, mask2)
    np.testing.assert_allclose(y1, naive_reference(m, x, dropout_masks=tape1.dropout_masks).y,
                               rtol=1e-10, atol=1e-12)
    # eval() switches it off in forward(), and backward then matches the no-dropout model
    assert m.eval() is m and not m.training
    y3, s3, tape = m.forward(x)
    np.testing.assert_array_equal(y3, want)
    dy = rng.standard_normal(y3.shape)
    got = m.backward(tape, dy)
    ref = plain.backward(plain.forward(x)[2], dy)
    np.testing.assert_array_equal(got[0], ref[0])
    for k in ref[2]:
        np.testing.assert_array_equal(got[2][k], ref[2][k])
    m.train()
    assert m.training
    _, _, tape4 = m.forward(x)
    assert (np.asarray(tape4.dropout_masks[1]) == 0).any()


def test_dropout_reproducible_with_seed(rng):
    seed = int(rng.integers(2**32))
    x = rng.standard_normal((4, 5, 3))
    a = rg.GRU(3, 4, num_layers=3, dropout=0.5, seed=seed, dtype="float64")
    b = rg.GRU(3, 4, num_layers=3, dropout=0.5, seed=seed, dtype="float64")
    c = rg.GRU(3, 4, num_layers=3, dropout=0.5, seed=seed + 1, dtype="float64")
    c.load_state_dict(a.state_dict())
    ya, yb, yc = a.forward(x)[0], b.forward(x)[0], c.forward(x)[0]
    np.testing.assert_array_equal(ya, yb)
    assert not np.allclose(ya, yc)


def test_dropout_single_layer_is_a_no_op(rng):
    """As torch.nn: dropout acts between layers, so one layer has none (and a warning says
    so)."""
    with pytest.warns(UserWarning, match="dropout=0.5 does nothing with num_layers=1"):
        m = rg.LSTM(3, 4, dropout=0.5, dtype="float64", seed=int(rng.integers(2**32)))
    x = rng.standard_normal((4, 2, 3))
    np.testing.assert_array_equal(m.forward(x)[0], m(x)[0])


def test_dropout_one_drops_every_input_between_layers(rng):
    """p = 1 (allowed, as in torch.nn): layer 2 sees zeros, so its output ignores x."""
    m = rg.RNN(3, 4, num_layers=2, dropout=1.0, dtype="float64", seed=int(rng.integers(2**32)))
    x1, x2 = rng.standard_normal((4, 2, 3)), rng.standard_normal((4, 2, 3))
    y1, _, tape = m.forward(x1)
    y2 = m.forward(x2)[0]
    np.testing.assert_array_equal(y1, y2)
    assert np.isfinite(y1).all()
    dx = m.backward(tape, np.ones_like(y1))[0]
    np.testing.assert_array_equal(dx, np.zeros_like(dx))
    assert not np.allclose(m(x1)[0], m(x2)[0]), "inference applies no dropout"


def test_gradients_with_torch_gradcheck(rng):
    """torch.autograd.gradcheck on a torch.autograd.Function wrapping forward/backward."""
    import torch

    m = rg.TwoStageRNN(2, 3, num_layers=2, bidirectional=True, f="sigmoid", g="tanh",
                       dtype="float64", seed=int(rng.integers(2**32)))
    lengths = np.array([3, 1])

    class Wrapped(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, h0):
            ctx.save_for_backward(x, h0)
            y, h = m(x.detach(), h0.detach(), lengths=lengths)
            return y, h

        @staticmethod
        def backward(ctx, dy, dh):
            # gradcheck calls backward once per output entry; a tape is good for one backward
            x, h0 = ctx.saved_tensors
            _, _, tape = m.forward(x.detach(), h0.detach(), lengths=lengths)
            dx, dh0, _ = m.backward(tape, dy.contiguous(), dh.contiguous())
            return dx, dh0

    x = torch.from_numpy(rng.standard_normal((3, 2, 2))).requires_grad_(True)
    h0 = torch.from_numpy(rng.standard_normal((4, 2, 3))).requires_grad_(True)
    assert torch.autograd.gradcheck(Wrapped.apply, (x, h0), eps=1e-6, atol=1e-7)


def test_finite_difference_check_can_fail(rng):
    """Guard for the harness itself: a wrong gradient is caught."""
    m = _model("GRU", {}, rng)
    x = rng.standard_normal((3, 2, 3))
    y, _, tape = m.forward(x)
    dy = rng.standard_normal(y.shape)
    dx, _, _ = m.backward(tape, dy)
    idx = (1, 1, 2)
    numeric = _fd(lambda: float(np.sum(m(x)[0] * dy)), x, idx)
    _check(dx[idx], numeric, "dx")
    with pytest.raises(AssertionError):
        _check(dx[idx] + 1e-5 * max(1.0, abs(dx[idx])), numeric, "dx")
    with pytest.raises(AssertionError):
        _check_fd(dx[idx] + 1e-4 * max(1.0, abs(dx[idx])), lambda: float(np.sum(m(x)[0] * dy)),
                  x, idx, "dx")


def test_float32_gradients_close_to_float64(rng):
    seed = int(rng.integers(2**32))
    m64 = rg.LSTM(3, 8, num_layers=2, bidirectional=True, dtype="float64", seed=seed)
    m32 = rg.LSTM(3, 8, num_layers=2, bidirectional=True, dtype="float32")
    m32.load_state_dict(m64.state_dict())
    m64.load_state_dict(m32.state_dict())            # same (float32-representable) weights
    x = rng.standard_normal((6, 4, 3)).astype(np.float32)
    dy = rng.standard_normal((6, 4, 16)).astype(np.float32)
    a = ours(m32, x, dy=dy)
    b = ours(m64, x.astype(np.float64), dy=dy.astype(np.float64))
    assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_assert_close_scales_only_the_weight_gradients_tolerance():
    """Guard for tests/oracles.py: a weight gradient's absolute tolerance is its array's
    largest magnitude times atol (a T*B-long sum errs by its terms' sizes); every other field
    stays element-wise, and an error above the scaled bound still fails."""
    from oracles import Result

    grads = {"weight_ih_l0": np.array([20.0, -0.1])}
    want = Result(np.array([20.0, -0.1]), (np.zeros(1),), np.zeros(1), (np.zeros(1),), grads)

    def got(dy=0.0, dw=0.0):
        return Result(want.y + [0.0, dy], want.state, want.dx, want.dstate0,
                      {"weight_ih_l0": grads["weight_ih_l0"] + [0.0, dw]})

    assert_close(got(dw=3e-4), want, rtol=2e-5, atol=2e-5)        # under 2e-5 * 20
    with pytest.raises(AssertionError, match=r"weight_ih_l0.*atol x 20"):
        assert_close(got(dw=5e-4), want, rtol=2e-5, atol=2e-5)
    with pytest.raises(AssertionError, match="y"):                  # y: not scaled
        assert_close(got(dy=3e-4), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN", "TwoStageRNN"])
@pytest.mark.parametrize("lengths", [None, [5, 2, 0, 4]])
def test_backward_without_the_input_gradient_gives_the_same_other_gradients(cell, lengths,
                                                                           rng):
    """input_grad=False: dx is None (not computed: the first layer's dxw @ W_ih), every other
    gradient as with it, over two bidirectional layers with dropout, whole or in segments."""
    kwargs = dict(num_layers=2, bidirectional=True, dropout=0.3, seed=4, dtype="float64")
    x = rng.standard_normal((5, 4, 3))
    dys = rng.standard_normal((5, 4, 2 * 6))
    results = []
    for input_grad in (True, False):
        m = getattr(rg, cell)(3, 6, **kwargs)
        y, final, tape = m.forward(x, lengths=lengths)
        dstate = tuple(np.ones_like(s) for s in as_tuple(final))
        results.append(m.backward(tape, dys, dstate if cell == "LSTM" else dstate[0],
                                  input_grad=input_grad))
    (dx, ds, grads), (no_dx, ds2, grads2) = results
    assert dx is not None and dx.shape == x.shape and no_dx is None
    for a, b in zip(as_tuple(ds), as_tuple(ds2)):
        np.testing.assert_array_equal(a, b)
    assert grads.keys() == grads2.keys()
    for name in grads:
        np.testing.assert_array_equal(grads[name], grads2[name], err_msg=name)


def test_input_grad_must_be_a_bool(rng):
    m = rg.GRU(3, 4)
    _, _, tape = m.forward(rng.standard_normal((2, 1, 3)).astype("float32"))
    with pytest.raises(TypeError, match="input_grad"):
        m.backward(tape, np.zeros((2, 1, 4), "float32"), input_grad="no")
