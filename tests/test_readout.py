"""Readout: softmax(W_yo h + b_y) and its cross-entropy, against torch.nn.Linear + softmax /
torch.nn.functional.cross_entropy in float64."""

from __future__ import annotations

import numpy as np
import pytest

import rnn_gpu as rg

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'rnn-gpu[test]')")
F = torch.nn.functional


def _torch_linear(r: rg.Readout) -> torch.nn.Linear:
    lin = torch.nn.Linear(r.hidden_size, r.num_classes, bias=r.bias, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(r.parameters()["weight"].astype(np.float64)))
        if r.bias:
            lin.bias.copy_(torch.from_numpy(r.parameters()["bias"].astype(np.float64)))
    return lin


@pytest.mark.parametrize("shape", [(5,), (4, 5), (3, 2, 5), (0, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_probabilities_match_torch_softmax(shape, bias, rng):
    r = rg.Readout(5, 7, bias=bias, dtype="float64", seed=int(rng.integers(2**32)))
    h = rng.standard_normal(shape)
    p = r(h)
    assert p.shape == shape[:-1] + (7,) and p.dtype == np.float64
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=0, atol=1e-12)
    assert np.all(p >= 0)
    want = torch.softmax(_torch_linear(r)(torch.from_numpy(h)), dim=-1).detach().numpy()
    np.testing.assert_allclose(p, want, rtol=1e-12, atol=1e-15)
    logits = r.logits(h)
    want_logits = _torch_linear(r)(torch.from_numpy(h)).detach().numpy()
    np.testing.assert_allclose(logits, want_logits, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(r.log_probs(h), np.log(want), rtol=1e-10, atol=1e-12)


def test_float32(rng):
    r = rg.Readout(6, 4, seed=int(rng.integers(2**32)))
    h = rng.standard_normal((10, 6)).astype(np.float32)
    p = r(h)
    assert p.dtype == np.float32
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)
    want = torch.softmax(_torch_linear(r)(torch.from_numpy(h.astype(np.float64))), -1)
    np.testing.assert_allclose(p, want.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_torch_input_accepted(rng):
    r = rg.Readout(3, 2, dtype="float64", seed=int(rng.integers(2**32)))
    h = rng.standard_normal((4, 3))
    np.testing.assert_array_equal(r(torch.from_numpy(h)), r(h))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_log_probs_stable_for_huge_logits(dtype, rng):
    r = rg.Readout(2, 3, dtype=dtype)
    r.load_state_dict({"weight": np.array([[1e4, 0.0], [-1e4, 0.0], [0.0, 1e4]]),
                       "bias": np.array([0.0, 1e4, -1e4])})
    h = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0], [1.0, 1.0]], dtype=dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise"):   # underflow is fine
        logp = r.log_probs(h)
        p = r(h)
    assert np.isfinite(logp).all(), logp
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)
    want = torch.log_softmax(_torch_linear(r)(torch.from_numpy(h.astype(np.float64))), -1)
    np.testing.assert_allclose(logp, want.detach().numpy(), rtol=1e-6, atol=1e-3)
    # h=(1,0): logits (1e4, 0, -1e4) -> log p = (0, -1e4, -2e4) up to rounding
    np.testing.assert_allclose(logp[0], [0.0, -1e4, -2e4], atol=1e-3)
    targets = np.array([1, 2, 0, 0])
    loss, dh, grads = r.loss_and_grads(h, targets)
    assert np.isfinite(loss) and np.isfinite(dh).all()
    assert all(np.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("shape", [(6,), (3, 4), (2, 3, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_loss_and_grads_match_torch(shape, bias, rng):
    H, C = 5, 6
    r = rg.Readout(H, C, bias=bias, dtype="float64", seed=int(rng.integers(2**32)))
    h = rng.standard_normal(shape + (H,))
    targets = rng.integers(0, C, size=shape)
    loss, dh, grads = r.loss_and_grads(h, targets)

    lin = _torch_linear(r)
    ht = torch.from_numpy(h).requires_grad_(True)
    logits = lin(ht)
    want = F.cross_entropy(logits.reshape(-1, C), torch.from_numpy(targets).reshape(-1))
    want.backward()
    assert isinstance(loss, float)
    np.testing.assert_allclose(loss, want.item(), rtol=1e-12)
    assert dh.shape == h.shape
    np.testing.assert_allclose(dh, ht.grad.numpy(), rtol=1e-10, atol=1e-14)
    assert set(grads) == ({"weight", "bias"} if bias else {"weight"})
    np.testing.assert_allclose(grads["weight"], lin.weight.grad.numpy(), rtol=1e-10,
                               atol=1e-14)
    if bias:
        np.testing.assert_allclose(grads["bias"], lin.bias.grad.numpy(), rtol=1e-10,
                                   atol=1e-14)


def test_loss_gradient_finite_differences(rng):
    r = rg.Readout(4, 3, dtype="float64", seed=int(rng.integers(2**32)))
    h = rng.standard_normal((5, 4))
    t = rng.integers(0, 3, size=5)
    _, dh, grads = r.loss_and_grads(h, t)
    eps = 1e-6
    for idx in [(0, 0), (3, 2), (4, 3)]:
        hp, hm = h.copy(), h.copy()
        hp[idx] += eps
        hm[idx] -= eps
        fd = (r.loss_and_grads(hp, t)[0] - r.loss_and_grads(hm, t)[0]) / (2 * eps)
        assert abs(fd - dh[idx]) < 1e-8
    w = r.parameters()["weight"]
    old = w[1, 2]
    w[1, 2] = old + eps
    lp = r.loss_and_grads(h, t)[0]
    w[1, 2] = old - eps
    lm = r.loss_and_grads(h, t)[0]
    w[1, 2] = old
    assert abs((lp - lm) / (2 * eps) - grads["weight"][1, 2]) < 1e-8


def test_readout_on_layer_outputs(rng):
    """The seed's model: TwoStageRNN then Readout on every step."""
    m = rg.TwoStageRNN(3, 5, dtype="float64", seed=int(rng.integers(2**32)))
    r = rg.Readout(5, 4, dtype="float64", seed=int(rng.integers(2**32)))
    y, _ = m(rng.standard_normal((6, 2, 3)))
    p = r(y)
    assert p.shape == (6, 2, 4)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-12)


def test_readout_errors():
    r = rg.Readout(4, 3)
    with pytest.raises(ValueError, match=r"h: expected last dimension hidden_size=4, got shape "
                       r"\(2, 5\)"):
        r(np.zeros((2, 5), np.float32))
    with pytest.raises(TypeError, match=r"h: expected a NumPy array, CuPy array or torch "
                       r"tensor, got list"):
        r([[0.0] * 4])
    h = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match=r"targets: expected shape \(2,\) .*got \(3,\)"):
        r.loss_and_grads(h, np.zeros(3, np.int64))
    with pytest.raises(TypeError, match=r"targets: expected integer class indices, got dtype "
                       r"float64"):
        r.loss_and_grads(h, np.zeros(2))
    with pytest.raises(ValueError, match=r"targets: expected classes in \[0, 3\), got min 0 "
                       r"max 3"):
        r.loss_and_grads(h, np.array([0, 3]))
    with pytest.raises(ValueError, match=r"targets: expected classes in \[0, 3\), got min -1"):
        r.loss_and_grads(h, np.array([-1, 0]))
    with pytest.raises(ValueError, match=r"dtype: Readout computes in NumPy, expected float32 or "
                       r"float64, got float16"):
        rg.Readout(4, 3, dtype="float16")
    with pytest.raises(ValueError, match=r"num_classes: expected an int >= 1, got 0"):
        rg.Readout(4, 0)
    with pytest.raises(KeyError, match=r"missing keys \['bias'\]"):
        r.load_state_dict({"weight": np.zeros((3, 4))})
    with pytest.raises(ValueError, match=r"state_dict\['weight'\]: expected shape \(3, 4\), got "
                       r"\(4, 3\)"):
        r.load_state_dict({"weight": np.zeros((4, 3)), "bias": np.zeros(3)})
